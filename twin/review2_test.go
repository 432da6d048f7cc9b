package twin

import (
	"context"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
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
	idle.mu.RLock()
	atOpen := idle.snap
	idle.mu.RUnlock()
	report()
	idle.mu.RLock()
	still := idle.snap == atOpen
	snap := idle.snap.acquire()
	idle.mu.RUnlock()
	defer snap.release()
	// What the snapshot still sees the store cannot reclaim.
	it, err := snap.s.NewIter(&pebble.IterOptions{LowerBound: logKey(0), UpperBound: logKey(e.oldest.Load())})
	if err != nil {
		t.Fatal(err)
	}
	pinned, bytes := 0, 0
	for it.First(); it.Valid(); it.Next() {
		pinned++
		bytes += len(it.Value())
	}
	it.Close()
	t.Logf("revision %d, oldest log revision %d; pruned log entries the idle worker's snapshot keeps: %d (%d bytes)", e.Revision(), e.oldest.Load(), pinned, bytes)
	if still || pinned > 0 {
		t.Errorf("after %d steps of worker 0, idle worker 1 still holds its snapshot from Open (%v), which keeps %d pruned watch log entries (%d bytes) from being reclaimed",
			n, still, pinned, bytes)
	}
}

// TestComposePatchReplacesObject: a rule whose set_desired actions first
// remove (or set to a scalar) a desired object and then set it to a new
// object leaves the old object's other keys in desired, where applying the
// two patches in turn does not: composing without the target cannot say
// "replace", so the rule's actions should be applied in turn to desired
// (or the firing should keep its patches as a list).
func TestComposePatchReplacesObject(t *testing.T) {
	desired := Document{"cfg": map[string]any{"mode": "boost", "fan": "high"}}
	for _, first := range []any{nil, "off"} {
		a := Document{"cfg": first}
		b := Document{"cfg": map[string]any{"mode": "eco"}}
		inTurn, _ := MergePatch(desired, a)
		inTurn, _ = MergePatch(inTurn, b)
		composed, _ := MergePatch(desired, ComposePatch(a, b))
		if !reflect.DeepEqual(composed, inTurn) {
			t.Errorf("cfg %v then {mode: eco}: composed gives %v; in turn %v", first, composed, inTurn)
		}
	}
}

// TestCloseAfterFatalWALErrorLeaksNoSnapshot: groups in flight when the WAL
// fails, with History readers holding snapshots meanwhile; Close then
// closes every snapshot exactly once (Pebble reports leaked ones).
func TestCloseAfterFatalWALErrorLeaksNoSnapshot(t *testing.T) {
	ctx := context.Background()
	var on atomic.Bool
	fs := errorfs.Wrap(vfs.NewMem(), errorfs.InjectorFunc(func(op errorfs.Op) error {
		if on.Load() && (op.Kind == errorfs.OpFileSync || op.Kind == errorfs.OpFileSyncData || op.Kind == errorfs.OpFileSyncTo) && strings.HasSuffix(op.Path, ".log") {
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
			for i := range 200 {
				id := fmt.Sprint("car-", (g+i)%10)
				if i%3 == 0 {
					e.History(id, 0, 5)
					continue
				}
				if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{"n": float64(i)}}); err != nil {
					return
				}
				if g == 0 && i == 50 {
					on.Store(true)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("health after the injected sync failure: %+v", e.Health())
	// Every group has been answered: only the workers' installed
	// snapshots are open.
	deadline := time.Now().Add(5 * time.Second)
	for n := e.db.Metrics().Snapshots.Count; n != len(e.workers); n = e.db.Metrics().Snapshots.Count {
		if time.Now().After(deadline) {
			t.Errorf("%d snapshots open with nothing in flight; want %d (one per worker)", n, len(e.workers))
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
