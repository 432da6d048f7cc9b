package twin

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// gateSyncFS holds every WAL sync while its gate is closed: the steps
// applied meanwhile are in the store but not durable.
type gateSyncFS struct {
	vfs.FS
	g *syncGate
}

type syncGate struct {
	mu   sync.Mutex
	open chan struct{} // closed while syncs may proceed
}

func newSyncGate() *syncGate {
	g := &syncGate{open: make(chan struct{})}
	close(g.open)
	return g
}

func (g *syncGate) hold() {
	g.mu.Lock()
	g.open = make(chan struct{})
	g.mu.Unlock()
}

func (g *syncGate) release() {
	g.mu.Lock()
	close(g.open)
	g.mu.Unlock()
}

func (g *syncGate) wait() {
	g.mu.Lock()
	ch := g.open
	g.mu.Unlock()
	<-ch
}

type gateSyncFile struct {
	vfs.File
	g *syncGate
}

func (f gateSyncFile) Sync() error     { f.g.wait(); return f.File.Sync() }
func (f gateSyncFile) SyncData() error { f.g.wait(); return f.File.SyncData() }
func (f gateSyncFile) SyncTo(n int64) (bool, error) {
	f.g.wait()
	return f.File.SyncTo(n)
}

func (f gateSyncFS) wrap(name string, file vfs.File, err error) (vfs.File, error) {
	if err != nil || filepath.Ext(name) != ".log" {
		return file, err
	}
	return gateSyncFile{file, f.g}, nil
}

func (f gateSyncFS) Create(name string, c vfs.DiskWriteCategory) (vfs.File, error) {
	file, err := f.FS.Create(name, c)
	return f.wrap(name, file, err)
}

func (f gateSyncFS) ReuseForWrite(oldname, newname string, c vfs.DiskWriteCategory) (vfs.File, error) {
	file, err := f.FS.ReuseForWrite(oldname, newname, c)
	return f.wrap(newname, file, err)
}

func (f gateSyncFS) OpenReadWrite(name string, c vfs.DiskWriteCategory, opts ...vfs.OpenOption) (vfs.File, error) {
	file, err := f.FS.OpenReadWrite(name, c, opts...)
	return f.wrap(name, file, err)
}

// TestReadsWhileStepsNotDurable: with the WAL's syncs held, a tiny
// twin cache and steps applied but not durable (changes, deletions,
// re-creations), no reader (Get, List, History, Len) sees any of them;
// once the syncs go through, every reader sees them all.
func TestReadsWhileStepsNotDurable(t *testing.T) {
	ctx := context.Background()
	gate := newSyncGate()
	fs := gateSyncFS{vfs.NewMem(), gate}
	e := openMem(t, fs, Options{Workers: 1, VShards: 4, CacheBytes: 8 << 10})
	defer e.Close()
	const n = 40
	id := func(i int) string { return fmt.Sprintf("fridge-%03d", i) }
	for i := range n {
		if _, err := e.Create(ctx, CreateRequest{ID: id(i), Type: "fridge", Reported: Document{"temp_c": 4.0}}); err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 { // a seen key for half of them
			if _, err := e.Report(ctx, PatchRequest{ID: id(i), Patch: Document{"temp_c": 4.0}, Source: SourceDevice}); err != nil {
				t.Fatal(err)
			}
		}
	}
	gate.hold()
	var pend []Pending
	var dels []chan error
	for i := range n {
		switch i % 3 {
		case 0, 1:
			p, err := e.StartReport(ctx, PatchRequest{ID: id(i), Patch: Document{"temp_c": 9.0}})
			if err != nil {
				t.Fatal(err)
			}
			pend = append(pend, p)
		case 2:
			ch := make(chan error, 1)
			go func(id string) {
				err := e.Delete(ctx, id, 0)
				if err == nil {
					_, err = e.Create(ctx, CreateRequest{ID: id, Type: "fridge", Reported: Document{"temp_c": 20.0}})
				}
				ch <- err
			}(id(i))
			dels = append(dels, ch)
		}
	}
	time.Sleep(100 * time.Millisecond) // the worker applies what it can
	check := func(tw *Twin, where string) {
		t.Helper()
		if tw.Version != 1 || tw.Reported["temp_c"] != 4.0 {
			t.Errorf("%s: %s at version %d with %v while nothing since its creation is durable", where, tw.ID, tw.Version, tw.Reported)
		}
	}
	for round := range 3 {
		for i := range n {
			tw, err := e.Get(id(i))
			if err != nil {
				t.Errorf("round %d: Get(%s): %v", round, id(i), err)
				continue
			}
			check(tw, "Get")
			evs, err := e.History(id(i), 0, 10)
			if err != nil || len(evs) == 0 || evs[0].Twin.Version != 1 {
				t.Errorf("round %d: History(%s) = %d events, %v; want its creation first", round, id(i), len(evs), err)
			}
		}
		listed := 0
		if _, err := e.List(ctx, "", func(tw *Twin) bool { check(tw, "List"); listed++; return true }); err != nil {
			t.Fatal(err)
		}
		if listed != n || e.Len() != n {
			t.Errorf("round %d: List passed %d twins, Len %d; want %d", round, listed, e.Len(), n)
		}
	}
	gate.release()
	for _, p := range pend {
		if r := <-p.Done(); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	for _, ch := range dels {
		if err := <-ch; err != nil {
			t.Fatal(err)
		}
	}
	listed := 0
	if _, err := e.List(ctx, "", func(tw *Twin) bool {
		listed++
		if tw.Reported["temp_c"] == 4.0 {
			t.Errorf("after the syncs: %s still reads %v", tw.ID, tw.Reported)
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if listed != n || e.Len() != n {
		t.Errorf("after the syncs: List passed %d twins, Len %d; want %d", listed, e.Len(), n)
	}
	for i := range n {
		tw, err := e.Get(id(i))
		if err != nil || tw.Reported["temp_c"] == 4.0 {
			t.Errorf("after the syncs: Get(%s) = %v, %v", id(i), tw, err)
		}
	}
}

// TestListPagingWithSeenKeys: List from every `after` (existing ids,
// ids between, deleted ids) returns exactly the live twins sorted after it,
// with ids that prefix one another, seen keys on some, across shards,
// cached or not.
func TestListPagingWithSeenKeys(t *testing.T) {
	ctx := context.Background()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	e := openMem(t, vfs.NewMem(), Options{Workers: 2, VShards: 8, Clock: clock.Now, CacheBytes: 8 << 10})
	defer e.Close()
	var ids []string
	for _, base := range []string{"a", "a-", "a-1", "a.", "a.b", "a:", "b", "b-b", "ba"} {
		for _, suffix := range []string{"", "-x", "0"} {
			ids = append(ids, base+suffix)
		}
	}
	live := map[string]bool{}
	for i, id := range ids {
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "t"}); err != nil {
			t.Fatal(err)
		}
		live[id] = true
		clock.Advance(time.Second)
		if i%2 == 0 {
			if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{}, Source: SourceDevice}); err != nil {
				t.Fatal(err)
			}
		}
		if i%7 == 3 {
			if err := e.Delete(ctx, id, 0); err != nil {
				t.Fatal(err)
			}
			live[id] = false
		}
	}
	sorted := slices.Sorted(maps.Keys(live))
	for _, after := range append([]string{"", "a-0", "a/", "zz"}, sorted...) {
		var want, got []string
		for _, id := range sorted {
			if live[id] && id > after {
				want = append(want, id)
			}
		}
		if _, err := e.List(ctx, after, func(tw *Twin) bool { got = append(got, tw.ID); return true }); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) {
			t.Errorf("List after %q = %q; want %q", after, got, want)
		}
	}
}

// TestCacheBytesAddUp: after creations, changes, seen-only reports,
// deletions and re-creations with a cache that evicts all the time, each
// worker's byte count is the sum of its entries' sizes, and within budget.
func TestCacheBytesAddUp(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{Workers: 2, VShards: 4, CacheBytes: 32 << 10})
	defer e.Close()
	for round := range 4 {
		for i := range 60 {
			id := fmt.Sprintf("t-%02d", i)
			switch (i + round) % 4 {
			case 0:
				if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "t", Reported: Document{"big": string(make([]byte, 50*i))}}); err != nil && !errors.Is(err, ErrAlreadyExists) {
					t.Fatal(err)
				}
			case 1:
				if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{"n": float64(round)}}); err != nil && !errors.Is(err, ErrNotFound) {
					t.Fatal(err)
				}
			case 2:
				if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{}, Source: SourceDevice}); err != nil && !errors.Is(err, ErrNotFound) {
					t.Fatal(err)
				}
			case 3:
				if err := e.Delete(ctx, id, 0); err != nil && !errors.Is(err, ErrNotFound) {
					t.Fatal(err)
				}
			}
		}
	}
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	for i, w := range e.workers {
		w.mu.RLock()
		var sum int64
		for _, ent := range w.cache.m {
			sum += ent.size
		}
		n := len(w.cache.m)
		w.mu.RUnlock()
		if b := w.cache.bytes.Load(); b != sum || b > w.cache.limit {
			t.Errorf("worker %d: cache bytes %d; its %d entries' sizes add up to %d; budget %d", i, b, n, sum, w.cache.limit)
		}
	}
}
