package twin

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

// TestIdleWorkerSnapshotPinsStore: a worker that takes no step keeps the
// snapshot it took at Open (or at its last step) for good, so the store can
// never drop what was overwritten or deleted after it: every pruned watch
// log entry and every overwritten twin record of the busy workers stays on
// disk. A standing snapshot must not outlive the moment when the worker has
// nothing in flight.
func TestIdleWorkerSnapshotPinsStore(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	opts := Options{Workers: 2, LogRetention: 64}
	e := openMem(t, fs, opts)
	// One twin on worker 0, none on worker 1: worker 1 stays idle.
	var id string
	for i := 0; ; i++ {
		id = fmt.Sprint("busy", i)
		if e.workerFor(id) == e.workers[0] {
			break
		}
	}
	if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "fridge"}); err != nil {
		t.Fatal(err)
	}
	const n = 3000
	report := func() {
		for i := range n {
			if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{"temp_c": float64(i), "pad": fmt.Sprintf("%0512d", i)}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The log holds 3,000 events when the store is opened again.
	e.opts.LogRetention = 1 << 20
	report()
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openMem(t, fs, opts)
	defer e.Close()
	idle := e.workers[1]
	report()
	if err := e.RunTimers(ctx); err != nil { // every step published
		t.Fatal(err)
	}
	// A worker with nothing in flight holds no snapshot: nothing pins what
	// the busy worker's changes made obsolete.
	for i, w := range e.workers {
		w.mu.RLock()
		held := w.snap != nil
		w.mu.RUnlock()
		if held {
			t.Errorf("worker %d holds a snapshot with nothing in flight (idle worker: %v)", i, w == idle)
		}
	}
	// And History still reads the durable state.
	if evs, err := e.History(id, 0, 5); err != nil || len(evs) != 5 {
		t.Errorf("History = %d events, %v; want 5", len(evs), err)
	}
}

// TestCloseAfterFatalWALErrorLeaksNoSnapshot: groups in flight when the WAL
// fails, with History readers holding snapshots meanwhile; Close then
// closes every snapshot exactly once (Pebble reports leaked ones).
func TestCloseAfterFatalWALErrorLeaksNoSnapshot(t *testing.T) {
	ctx := context.Background()
	var on atomic.Bool
	fs := errorfs.Wrap(vfs.NewMem(), errorfs.InjectorFunc(func(op errorfs.Op) error {
		// One failed sync is enough to fail the engine; failing every
		// later one too would make Pebble panic when it rotates the WAL.
		if (op.Kind == errorfs.OpFileSync || op.Kind == errorfs.OpFileSyncData || op.Kind == errorfs.OpFileSyncTo) &&
			strings.HasSuffix(op.Path, ".log") && on.CompareAndSwap(true, false) {
			return errorfs.ErrInjected
		}
		return nil
	}))
	e := openMem(t, fs, Options{Workers: 2})
	for i := range 10 {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("car-", i), Type: "car"}); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Few writes in all: Pebble's first memtable is small, and
			// a WAL rotation after a failed sync panics in Pebble (its
			// crash-only answer), which would kill the test binary.
			for i := range 30 {
				id := fmt.Sprint("car-", (g+i)%10)
				if i%3 == 0 {
					e.History(id, 0, 5)
					continue
				}
				if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{"n": float64(i)}}); err != nil {
					return
				}
				if g == 0 && i == 5 {
					on.Store(true)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("health after the injected sync failure: %+v", e.Health())
	// Every group has been answered: at most the workers' installed
	// snapshots are open (none for a worker that went idle).
	deadline := time.Now().Add(5 * time.Second)
	for n := e.db.Metrics().Snapshots.Count; n > len(e.workers); n = e.db.Metrics().Snapshots.Count {
		if time.Now().After(deadline) {
			t.Errorf("%d snapshots open with nothing in flight; want at most %d (one per worker)", n, len(e.workers))
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	err := e.Close()
	if err != nil && strings.Contains(err.Error(), "snapshot") {
		t.Errorf("Close: %v", err)
	}
	t.Logf("Close: %v", err)
}
