// Package vfstest holds filesystems for tests of code that keeps its data in
// Pebble. Gate holds every WAL sync while it is closed, so that a test can
// look at a store whose last commit is applied (visible to Pebble's reads)
// but not yet durable, which is where durability bugs hide.
package vfstest

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// Gate is a vfs.FS whose WAL files (*.log) wait in Sync, SyncData and SyncTo
// while the gate is held. It is safe for concurrent use.
type Gate struct {
	vfs.FS

	mu     sync.Mutex
	held   bool          // protected by mu
	open   chan struct{} // protected by mu; closed when the gate opens
	waited chan struct{} // signalled when a sync waits at the gate
}

// NewGate wraps fs with an open gate.
func NewGate(fs vfs.FS) *Gate {
	return &Gate{FS: fs, open: make(chan struct{}), waited: make(chan struct{}, 1)}
}

// Hold makes WAL syncs wait until Release.
func (g *Gate) Hold() {
	g.mu.Lock()
	if !g.held {
		g.held, g.open = true, make(chan struct{})
	}
	g.mu.Unlock()
}

// Release lets the waiting syncs go, and every later one.
func (g *Gate) Release() {
	g.mu.Lock()
	if g.held {
		g.held = false
		close(g.open)
	}
	g.mu.Unlock()
}

// AwaitHeld waits until a WAL sync waits at the held gate, or fails t after
// 10 seconds.
func (g *Gate) AwaitHeld(t testing.TB) {
	t.Helper()
	select {
	case <-g.waited:
	case <-time.After(10 * time.Second):
		t.Fatal("no WAL sync reached the gate within 10s")
	}
}

func (g *Gate) wait() {
	g.mu.Lock()
	held, open := g.held, g.open
	g.mu.Unlock()
	if held {
		select {
		case g.waited <- struct{}{}:
		default:
		}
		<-open
	}
}

func (g *Gate) wrap(f vfs.File, name string, err error) (vfs.File, error) {
	if err != nil || !strings.HasSuffix(name, ".log") {
		return f, err
	}
	return &gateFile{File: f, g: g}, nil
}

// Create implements vfs.FS.
func (g *Gate) Create(name string, c vfs.DiskWriteCategory) (vfs.File, error) {
	f, err := g.FS.Create(name, c)
	return g.wrap(f, name, err)
}

// ReuseForWrite implements vfs.FS.
func (g *Gate) ReuseForWrite(old, name string, c vfs.DiskWriteCategory) (vfs.File, error) {
	f, err := g.FS.ReuseForWrite(old, name, c)
	return g.wrap(f, name, err)
}

type gateFile struct {
	vfs.File
	g *Gate
}

func (f *gateFile) Sync() error     { f.g.wait(); return f.File.Sync() }
func (f *gateFile) SyncData() error { f.g.wait(); return f.File.SyncData() }
func (f *gateFile) SyncTo(n int64) (bool, error) {
	f.g.wait()
	return f.File.SyncTo(n)
}
