package vfstest

import (
	"strings"
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

// FailWrites returns a filesystem over fs whose writes (and syncs) to files
// whose names end in suffix fail with errorfs.ErrInjected while on is set:
// a full disk, say, for the store's tables (".sst").
func FailWrites(fs vfs.FS, suffix string, on *atomic.Bool) vfs.FS {
	return errorfs.Wrap(fs, errorfs.InjectorFunc(func(op errorfs.Op) error {
		if on.Load() && op.Kind.ReadOrWrite() == errorfs.OpIsWrite && strings.HasSuffix(op.Path, suffix) {
			return errorfs.ErrInjected
		}
		return nil
	}))
}

// FailOneWrite returns a filesystem over fs whose first write (or sync) to
// a file whose name ends in suffix after armed is set fails with
// errorfs.ErrInjected, and that disarms it. One failure is what a WAL test
// needs (".log"): failing every later write too makes Pebble panic when it
// next rotates the WAL, killing the test binary.
func FailOneWrite(fs vfs.FS, suffix string, armed *atomic.Bool) vfs.FS {
	return errorfs.Wrap(fs, errorfs.InjectorFunc(func(op errorfs.Op) error {
		if op.Kind.ReadOrWrite() == errorfs.OpIsWrite && strings.HasSuffix(op.Path, suffix) && armed.CompareAndSwap(true, false) {
			return errorfs.ErrInjected
		}
		return nil
	}))
}
