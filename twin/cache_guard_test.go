package twin

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// tickCounter is an evaluator whose rules read now for every type; it
// counts the worker steps that consult it (TickTypes is asked once per step
// with rules).
type tickCounter struct{ steps atomic.Int64 }

func (c *tickCounter) Evaluate(_, _ *Twin, _ map[string]RuleState, _ time.Time, _ bool) Evaluation {
	return Evaluation{}
}
func (c *tickCounter) Ticks(string) bool { return true }
func (c *tickCounter) TickTypes() ([]string, bool) {
	c.steps.Add(1)
	return nil, true
}
func (c *tickCounter) Watches(string) bool { return true }

// TestTickScanNoSpinWhenFleetGrows shows that a tick scan which walks
// more twins than the fleet held when the tick began (twins created during
// the scan, ahead of its cursor) makes the worker spin: tickScan.next
// returns the scan's start (long past) once walked >= total, so the worker
// is due at once, again and again, while quota keeps returning 0 until the
// pace's span has passed. With a real clock the worker burns a core (and
// opens an iterator per spin) for up to the rest of the span; with this
// test's fixed clock it spins forever.
func TestTickScanNoSpinWhenFleetGrows(t *testing.T) {
	ctx := context.Background()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	e := openMem(t, vfs.NewMem(), Options{Workers: 1, VShards: 2, Clock: clock.Now, RuleTick: 10 * time.Second})
	defer e.Close()
	for i := range 300 {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprintf("p-%04d", i), Type: "planter"}); err != nil {
			t.Fatal(err)
		}
	}
	ev := &tickCounter{}
	e.SetEvaluator(ev)
	if err := e.RunTimers(ctx); err != nil { // starts the ticking
		t.Fatal(err)
	}
	clock.Advance(10 * time.Second)
	if err := e.RunTimers(ctx); err != nil { // the tick: scan of 300, first chunk
		t.Fatal(err)
	}
	// The fleet grows during the scan, partly ahead of its cursor.
	for i := range 300 {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprintf("z-%04d", i), Type: "planter"}); err != nil {
			t.Fatal(err)
		}
	}
	clock.Advance(3750 * time.Millisecond) // half of the pace's span
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	before := ev.steps.Load()
	time.Sleep(300 * time.Millisecond) // nothing to do: the clock stands still
	if n := ev.steps.Load() - before; n > 5 {
		t.Errorf("an idle worker ran %d steps in 300ms with the clock standing still; want none (it spins on a tick scan that walked more twins than its total)", n)
	}
}

// TestTimerOnCachedTwinIsNoMiss shows that a rule wake-up of a twin
// that is cached counts as a cache miss: timedRules hands every due twin to
// fetch, which skips the cached ones but counts them all as misses (and
// opens a store iterator even when nothing misses, in every step with rules,
// due twins or not).
func TestTimerOnCachedTwinIsNoMiss(t *testing.T) {
	ctx := context.Background()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	e := openMem(t, vfs.NewMem(), Options{Workers: 1, VShards: 2, Clock: clock.Now})
	defer e.Close()
	var timers atomic.Int64
	e.SetEvaluator(funcEvaluator{eval: func(_, _ *Twin, _ map[string]RuleState, now time.Time, timer bool) Evaluation {
		if timer {
			timers.Add(1)
			return Evaluation{}
		}
		return Evaluation{Wake: now.Add(time.Second)}
	}})
	if _, err := e.Create(ctx, CreateRequest{ID: "fridge-1", Type: "fridge"}); err != nil {
		t.Fatal(err)
	}
	before := e.Stats()
	clock.Advance(2 * time.Second)
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	if timers.Load() != 1 {
		t.Fatalf("the wake-up evaluated the rules %d times; want 1", timers.Load())
	}
	after := e.Stats()
	if after.CachedTwins != 1 {
		t.Fatalf("%d twins cached; want 1", after.CachedTwins)
	}
	if d := after.CacheMisses - before.CacheMisses; d != 0 {
		t.Errorf("the wake-up of a cached twin counted %d cache misses; want 0", d)
	}
}

// TestTwinSizeEstimate measures the heap a decoded fridge twin (the
// fields DESIGN.md lists, with labels, desired state and a token) really
// holds, against twinSize's estimate from its record: the cache's budget is
// only as good as this estimate.
func TestTwinSizeEstimate(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{Workers: 1, VShards: 2})
	defer e.Close()
	const id = "fridge-000001"
	if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "fridge",
		Labels:   map[string]string{"site": "berlin-3", "model": "FX-200"},
		Reported: Document{"temp_c": 4.5, "door": "closed", "power_w": 120.0, "compressor": true},
		Desired:  Document{"target_c": 4.0, "eco": false}}); err != nil {
		t.Fatal(err)
	}
	if err := e.SetTokenHash(ctx, id, make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	v, closer, err := e.db.Get(twinKey(e.VShard(id), id))
	if err != nil {
		t.Fatal(err)
	}
	rec := append([]byte(nil), v...)
	closer.Close()
	const n = 2000
	keep := make([]*Twin, n)
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	for i := range keep {
		r, err := decodeRecord(rec)
		if err != nil {
			t.Fatal(err)
		}
		keep[i] = r.Twin
	}
	runtime.GC()
	runtime.ReadMemStats(&m1)
	real := int64(m1.HeapAlloc-m0.HeapAlloc) / n
	est := twinSize(len(rec))
	runtime.KeepAlive(keep)
	t.Logf("record %d bytes; decoded twin holds about %d bytes; twinSize estimates %d", len(rec), real, est)
	if real > est*3/2 || real < est/3 {
		t.Errorf("a decoded fridge twin holds about %d bytes; twinSize estimates %d from its %d-byte record: off by more than 1.5x", real, est, len(rec))
	}
}

// TestTickScanNoSpinWithDeletedTwins: deleted twins leave deletion
// markers in the twin section, which the tick scan walks and counts while
// the tick's total counts live twins only; so the scan reaches walked >=
// total before its end, and (before the fix to tickScan.quota) the worker
// spun as in TestTickScanNoSpinWhenFleetGrows, without any twin being
// created during the scan.
func TestTickScanNoSpinWithDeletedTwins(t *testing.T) {
	ctx := context.Background()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	e := openMem(t, vfs.NewMem(), Options{Workers: 1, VShards: 2, Clock: clock.Now, RuleTick: 10 * time.Second})
	defer e.Close()
	for i := range 600 {
		id := fmt.Sprintf("p-%04d", i)
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "planter"}); err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			if err := e.Delete(ctx, id, 0); err != nil {
				t.Fatal(err)
			}
		}
	}
	ev := &tickCounter{}
	e.SetEvaluator(ev)
	if err := e.RunTimers(ctx); err != nil { // starts the ticking
		t.Fatal(err)
	}
	clock.Advance(10 * time.Second)
	if err := e.RunTimers(ctx); err != nil { // the tick: 300 live twins, 600 records
		t.Fatal(err)
	}
	clock.Advance(3750 * time.Millisecond) // half of the pace's span
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	before := ev.steps.Load()
	time.Sleep(300 * time.Millisecond)
	if n := ev.steps.Load() - before; n > 5 {
		t.Errorf("an idle worker ran %d steps in 300ms with the clock standing still; want none", n)
	}
}

// countSyncFS counts the syncs of WAL files.
type countSyncFS struct {
	vfs.FS
	syncs *atomic.Int64
}

type countSyncFile struct {
	vfs.File
	syncs *atomic.Int64
}

func (f countSyncFile) Sync() error     { f.syncs.Add(1); return f.File.Sync() }
func (f countSyncFile) SyncData() error { f.syncs.Add(1); return f.File.SyncData() }
func (f countSyncFile) SyncTo(n int64) (bool, error) {
	f.syncs.Add(1)
	return f.File.SyncTo(n)
}

func (f countSyncFS) wrap(name string, file vfs.File, err error) (vfs.File, error) {
	if err != nil || filepath.Ext(name) != ".log" {
		return file, err
	}
	return countSyncFile{file, f.syncs}, nil
}

func (f countSyncFS) Create(name string, c vfs.DiskWriteCategory) (vfs.File, error) {
	file, err := f.FS.Create(name, c)
	return f.wrap(name, file, err)
}

func (f countSyncFS) ReuseForWrite(oldname, newname string, c vfs.DiskWriteCategory) (vfs.File, error) {
	file, err := f.FS.ReuseForWrite(oldname, newname, c)
	return f.wrap(newname, file, err)
}

func (f countSyncFS) OpenReadWrite(name string, c vfs.DiskWriteCategory, opts ...vfs.OpenOption) (vfs.File, error) {
	file, err := f.FS.OpenReadWrite(name, c, opts...)
	return f.wrap(name, file, err)
}

// TestCreateStoreSyncsOnce shows that creating a store synced the WAL
// once per virtual shard (259 times with the default 256 shards): a new
// store had no twin counts, so load took upgradeShard's path for every
// shard, each with a synced commit of its own. The upgrade of all shards
// is now one batch, one sync.
func TestCreateStoreSyncsOnce(t *testing.T) {
	var syncs atomic.Int64
	fs := countSyncFS{vfs.NewMem(), &syncs}
	e := openMem(t, fs, Options{})
	defer e.Close()
	if n := syncs.Load(); n > 8 {
		t.Errorf("creating a store synced the WAL %d times; want a few", n)
	}
}
