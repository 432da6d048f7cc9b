package twin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestCacheBounded: a fleet many times the twin cache is served from the
// store: every twin reads back as written, the cache stays within its
// budget, and a restart knows the fleet's size and lists it in order
// without reading it into memory.
func TestCacheBounded(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	opts := Options{Workers: 2, VShards: 16, CacheBytes: 256 << 10}
	e := openMem(t, fs, opts)
	const n = 2000
	ids := make([]string, n)
	for i := range n {
		ids[i] = fmt.Sprintf("fridge-%04d", i)
		if _, err := e.Create(ctx, CreateRequest{ID: ids[i], Type: "fridge",
			Reported: Document{"temp_c": float64(i), "door": "closed", "fw": "1.2.3"}}); err != nil {
			t.Fatal(err)
		}
	}
	// Change every twin again, in another order: most are not cached.
	for i := n - 1; i >= 0; i-- {
		if _, err := e.Report(ctx, PatchRequest{ID: ids[i], Patch: Document{"temp_c": float64(-i - 1)}}); err != nil {
			t.Fatal(err)
		}
	}
	check := func(e *Engine, when string) {
		t.Helper()
		for i, id := range ids {
			tw, err := e.Get(id)
			if err != nil {
				t.Fatalf("%s: Get(%s): %v", when, id, err)
			}
			if tw.Version != 2 || tw.Reported["temp_c"] != float64(-i-1) || tw.Reported["door"] != "closed" {
				t.Fatalf("%s: %s = version %d, reported %v; want version 2, temp_c %d, door closed", when, id, tw.Version, tw.Reported, -i-1)
			}
		}
		if got := e.Len(); got != n {
			t.Errorf("%s: Len = %d; want %d", when, got, n)
		}
		var listed []string
		if _, err := e.List(ctx, "", func(tw *Twin) bool { listed = append(listed, tw.ID); return true }); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(listed, ids) {
			t.Errorf("%s: List returned %d twins (first %q); want all %d in id order", when, len(listed), listed[:min(3, len(listed))], n)
		}
		for _, w := range e.workers {
			if b, limit := w.cacheBytes(), w.cache.limit; b > limit {
				t.Errorf("%s: a worker's cache holds %d bytes; want at most its budget, %d", when, b, limit)
			}
		}
	}
	check(e, "before restart")
	st := e.Stats()
	if st.CacheMisses < n || st.CachedTwins >= n {
		t.Errorf("stats: %d misses, %d twins cached; want at least %d misses and fewer than %d cached", st.CacheMisses, st.CachedTwins, n, n)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openMem(t, fs, opts)
	defer e.Close()
	if st := e.Stats(); st.CachedTwins != 0 {
		t.Errorf("after restart, %d twins cached before any request; want 0 (start-up reads no twin)", st.CachedTwins)
	}
	check(e, "after restart")
	// Deleting and listing agree, whether the twin is cached or not.
	for _, id := range ids[:n/2] {
		if err := e.Delete(ctx, id, 0); err != nil {
			t.Fatal(err)
		}
	}
	var listed int
	if _, err := e.List(ctx, ids[n/2-1], func(*Twin) bool { listed++; return true }); err != nil {
		t.Fatal(err)
	}
	if listed != n/2 || e.Len() != n/2 {
		t.Errorf("after deleting half: listed %d after %s, Len %d; want %d", listed, ids[n/2-1], e.Len(), n/2)
	}
}

// TestSeenOnlyReport: a device report that changes nothing moves the twin's
// last_seen by writing its seen key, not its record; readers, lists and a
// restart see the new last_seen, and the next real change folds it back into
// the record.
func TestSeenOnlyReport(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	opts := Options{Workers: 1, VShards: 4, Clock: clock.Now, CacheBytes: 16 << 10}
	e := openMem(t, fs, opts)
	const id = "fridge-1"
	if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "fridge", Reported: Document{"temp_c": 4.0}}); err != nil {
		t.Fatal(err)
	}
	record := func(e *Engine) []byte {
		t.Helper()
		v, closer, err := e.db.Get(twinKey(e.VShard(id), id))
		if err != nil {
			t.Fatal(err)
		}
		defer closer.Close()
		return slices.Clone(v)
	}
	before := record(e)
	clock.Advance(time.Minute)
	seen := clock.Now().UTC()
	tw, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{"temp_c": 4.0}, Source: SourceDevice})
	if err != nil {
		t.Fatal(err)
	}
	if tw.Version != 1 || !tw.Presence.LastSeen.Equal(seen) {
		t.Errorf("report that changes nothing = version %d, last_seen %v; want version 1, last_seen %v", tw.Version, tw.Presence.LastSeen, seen)
	}
	if after := record(e); !bytes.Equal(after, before) {
		t.Errorf("the report rewrote the twin's record")
	}
	if _, closer, err := e.db.Get(seenKey(e.VShard(id), id)); err != nil {
		t.Errorf("no seen key after the report: %v", err)
	} else {
		closer.Close()
	}
	checkSeen := func(e *Engine, when string) {
		t.Helper()
		tw, err := e.Get(id)
		if err != nil || !tw.Presence.LastSeen.Equal(seen) {
			t.Errorf("%s: Get = last_seen %v, %v; want %v", when, tw.Presence.LastSeen, err, seen)
		}
		var listed *Twin
		if _, err := e.List(ctx, "", func(tw *Twin) bool { listed = tw; return false }); err != nil || listed == nil || !listed.Presence.LastSeen.Equal(seen) {
			t.Errorf("%s: List = %+v, %v; want the twin with last_seen %v", when, listed, err, seen)
		}
	}
	checkSeen(e, "before restart")
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openMem(t, fs, opts) // nothing cached: read from the store
	checkSeen(e, "after restart")
	// A real change writes the record, with last_seen, and drops the seen key.
	clock.Advance(time.Minute)
	seen = clock.Now().UTC()
	if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{"temp_c": 5.0}, Source: SourceDevice}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.db.Get(seenKey(e.VShard(id), id)); !errors.Is(err, pebble.ErrNotFound) {
		t.Errorf("seen key after a change that wrote the record: %v; want none", err)
	}
	checkSeen(e, "after a change")
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if vs, err := Check(Options{FS: fs, Dir: "db"}); err != nil || len(vs) > 0 {
		t.Errorf("Check = %v, %v; want no violations", vs, err)
	}
}

// TestTickPaced: a rule tick over a fleet walks it a chunk at a time, paced
// to end by three quarters of the tick interval, instead of evaluating every
// twin in one step; each twin is evaluated once per tick.
func TestTickPaced(t *testing.T) {
	ctx := context.Background()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	e := openMem(t, vfs.NewMem(), Options{Workers: 1, VShards: 2, Clock: clock.Now, RuleTick: 10 * time.Second})
	defer e.Close()
	const n = 1000
	for i := range n {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprintf("p-%04d", i), Type: "planter"}); err != nil {
			t.Fatal(err)
		}
	}
	var mu sync.Mutex
	evals := map[string]int{}
	e.SetEvaluator(funcEvaluator{ticks: true, eval: func(_, next *Twin, _ map[string]RuleState, _ time.Time, timer bool) Evaluation {
		if timer {
			mu.Lock()
			evals[next.ID]++
			mu.Unlock()
		}
		return Evaluation{}
	}})
	count := func() (twins, total int) {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range evals {
			total += c
		}
		return len(evals), total
	}
	if err := e.RunTimers(ctx); err != nil { // starts the ticking
		t.Fatal(err)
	}
	clock.Advance(10 * time.Second)
	for range 3 {
		if err := e.RunTimers(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if twins, _ := count(); twins != tickChunk {
		t.Errorf("at the tick, steps evaluated %d twins; want one chunk, %d, until time passes", twins, tickChunk)
	}
	clock.Advance(3750 * time.Millisecond) // half of the pace's span
	for range 3 {
		if err := e.RunTimers(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if twins, _ := count(); twins < n/2 || twins > n/2+2*tickChunk {
		t.Errorf("halfway through the span, %d twins evaluated; want about %d", twins, n/2+tickChunk)
	}
	clock.Advance(3750 * time.Millisecond)
	for range 8 {
		if err := e.RunTimers(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if twins, total := count(); twins != n || total != n {
		t.Errorf("by the end of the span: %d twins evaluated %d times; want all %d, once each", twins, total, n)
	}
}

// BenchmarkListScan measures List over a fleet of fridge twins, read from
// the store (a cache of a few twins) or from the cache: ns/op is per twin.
func BenchmarkListScan(b *testing.B) {
	for _, bc := range []struct {
		name  string
		cache int64
	}{{"from-store", 64 << 10}, {"cached", 0}} {
		b.Run(bc.name, func(b *testing.B) {
			e, err := Open(Options{Dir: b.TempDir(), CacheBytes: bc.cache, Logger: quietSlog()})
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			ctx := context.Background()
			const twins = 20_000
			for i := range twins {
				if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("fridge-", i), Type: "fridge", Labels: map[string]string{"site": "berlin"},
					Reported: Document{"temp_c": 2.3, "door": "closed", "power_w": 80.0, "compressor": false, "target_c": 4.0,
						"eco": true, "fw": "1.2.3", "site": map[string]any{"city": "berlin", "floor": 3.0}},
					Desired: Document{"target_c": 4.0, "eco": true}}); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for listed := 0; listed < b.N; {
				if _, err := e.List(ctx, "", func(*Twin) bool { listed++; return listed < b.N }); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestCommandsCachedWithTheirTwin: a device's retained commands are read
// with its twin, not at start-up: a restart holds no finished command in
// memory, only the expiry of open ones, and the commands still read back,
// from the store or the cache, and keep working (update, expiry).
func TestCommandsCachedWithTheirTwin(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	opts := Options{Workers: 1, VShards: 4, CacheBytes: 16 << 10, Clock: clock.Now}
	e := openMem(t, fs, opts)
	const n = 200
	ids := make([]string, n)
	open := make([]string, n) // the id of each device's open command
	for i := range n {
		ids[i] = fmt.Sprintf("fridge-%04d", i)
		if _, err := e.Create(ctx, CreateRequest{ID: ids[i], Type: "fridge"}); err != nil {
			t.Fatal(err)
		}
		cmd, err := e.SendCommand(ctx, CommandRequest{DeviceID: ids[i], Name: "defrost"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.UpdateCommand(ctx, ids[i], CommandUpdate{ID: cmd.ID, State: CommandSucceeded}); err != nil {
			t.Fatal(err)
		}
		cmd, err = e.SendCommand(ctx, CommandRequest{DeviceID: ids[i], Name: "eco", TTL: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		open[i] = cmd.ID
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openMem(t, fs, opts)
	defer e.Close()
	if st := e.Stats(); st.CachedTwins != 0 {
		t.Errorf("start-up cached %d twins; want 0", st.CachedTwins)
	}
	if got := e.workers[0].expiries.Len(); got != n {
		t.Errorf("start-up scheduled %d expiries; want %d, one per open command", got, n)
	}
	for i, id := range ids {
		cmds, _, err := e.ListCommands(id, nil, 0, 10)
		if err != nil || len(cmds) != 2 || cmds[0].State != CommandSucceeded || cmds[1].State != CommandQueued {
			t.Fatalf("ListCommands(%s) = %v, %v; want the finished and the open command", id, cmds, err)
		}
		if got, err := e.GetCommand(open[i]); err != nil || got.Name != "eco" {
			t.Fatalf("GetCommand(%s) = %v, %v", open[i], got, err)
		}
	}
	// Half the open commands finish; the others expire, twins cached or not.
	for i := range n / 2 {
		if _, err := e.UpdateCommand(ctx, ids[i], CommandUpdate{ID: open[i], State: CommandRejected}); err != nil {
			t.Fatal(err)
		}
	}
	clock.Advance(2 * time.Minute)
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	for i, id := range open {
		want := CommandExpired
		if i < n/2 {
			want = CommandRejected
		}
		if got, err := e.GetCommand(id); err != nil || got.State != want {
			t.Fatalf("GetCommand(%s) = %v, %v; want %s", id, got, err, want)
		}
	}
}

// typeTicker ticks the rules of some types only.
type typeTicker struct {
	types []string
	eval  func(next *Twin)
}

func (e typeTicker) Evaluate(_, next *Twin, _ map[string]RuleState, _ time.Time, timer bool) Evaluation {
	if timer {
		e.eval(next)
	}
	return Evaluation{}
}
func (e typeTicker) Ticks(typ string) bool       { return slices.Contains(e.types, typ) }
func (e typeTicker) TickTypes() ([]string, bool) { return e.types, false }
func (e typeTicker) Watches(string) bool         { return true }

// TestTickWalksOnlyTickingTypes: a tick walks the index of twins by type:
// twins of types whose rules do not read now are neither evaluated nor read
// from the store.
func TestTickWalksOnlyTickingTypes(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	opts := Options{Workers: 1, VShards: 4, Clock: clock.Now, RuleTick: 10 * time.Second}
	e := openMem(t, fs, opts)
	const n = 300
	for i := range n {
		for _, typ := range []string{"planter", "car"} {
			if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprintf("%s-%03d", typ, i), Type: typ}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openMem(t, fs, opts) // nothing cached
	defer e.Close()
	var mu sync.Mutex
	evals := map[string]int{}
	e.SetEvaluator(typeTicker{types: []string{"planter"}, eval: func(next *Twin) {
		mu.Lock()
		evals[next.Type]++
		mu.Unlock()
	}})
	if err := e.RunTimers(ctx); err != nil { // starts the ticking
		t.Fatal(err)
	}
	clock.Advance(10 * time.Second) // a tick
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	clock.Advance(10 * time.Second) // past its pace
	for range 4 {
		if err := e.RunTimers(ctx); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if evals["planter"] != n || evals["car"] != 0 {
		t.Errorf("a tick of planter rules evaluated %v; want %d planters and no car", evals, n)
	}
	if misses := e.Stats().CacheMisses; misses != n {
		t.Errorf("the tick read %d twins from the store; want the %d planters only", misses, n)
	}
}

// TestSeenOnlyReportsInSteps: device reports that change nothing but
// last_seen, mixed in the same steps with reports that do change their twin,
// across many twins at once, leave every twin's last_seen durable: a
// restart with a cache of a few twins reads it back from the store.
func TestSeenOnlyReportsInSteps(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	opts := Options{Workers: 2, VShards: 8, Clock: clock.Now, CacheBytes: 16 << 10}
	e := openMem(t, fs, opts)
	const n = 60
	for i := range n {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprintf("p-%02d", i), Reported: Document{"on": true}}); err != nil {
			t.Fatal(err)
		}
	}
	clock.Advance(time.Minute)
	seen := clock.Now().UTC()
	// Every twin gets a report that changes nothing; a third also a real
	// change, after it, and then one more that changes nothing: all
	// handed to the workers before any is answered.
	var pending []Pending
	report := func(id string, on bool) {
		p, err := e.StartReport(ctx, PatchRequest{ID: id, Patch: Document{"on": on}, Source: SourceDevice})
		if err != nil {
			t.Fatal(err)
		}
		pending = append(pending, p)
	}
	for i := range n {
		id := fmt.Sprintf("p-%02d", i)
		report(id, true)
		if i%3 == 0 {
			report(id, false)
			report(id, false)
		}
	}
	for _, p := range pending {
		if r := <-p.Done(); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openMem(t, fs, opts)
	for i := range n {
		id := fmt.Sprintf("p-%02d", i)
		tw, err := e.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		wantVersion := int64(1)
		if i%3 == 0 {
			wantVersion = 2
		}
		if !tw.Presence.LastSeen.Equal(seen) || tw.Version != wantVersion {
			t.Errorf("%s after a restart: last_seen %v, version %d; want %v, version %d", id, tw.Presence.LastSeen, tw.Version, seen, wantVersion)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if vs, err := Check(Options{FS: fs, Dir: "db"}); err != nil || len(vs) > 0 {
		t.Errorf("Check = %v, %v; want no violations", vs, err)
	}
}
