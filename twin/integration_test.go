package twin

import (
	"context"
	"errors"
	"fmt"

	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"

	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// reviewVConsistent closes e, runs Check, reopens the store and checks
// that the index, the counts and the reads agree with a full scan.
func reviewVConsistent(t *testing.T, e *Engine, fs vfs.FS, opts Options, when string) *Engine {
	t.Helper()
	if err := e.Close(); err != nil {
		t.Fatalf("%s: Close: %v", when, err)
	}
	vs, err := Check(Options{FS: fs, Dir: "db"})
	if err != nil {
		t.Fatalf("%s: Check: %v", when, err)
	}
	for _, v := range vs {
		t.Errorf("%s: Check: %v", when, v)
	}
	e = openMem(t, fs, opts)
	n := 0
	if _, err := e.List(context.Background(), "", func(*Twin) bool { n++; return true }); err != nil {
		t.Fatal(err)
	}
	if e.Len() != n {
		t.Errorf("%s: Len() = %d; List finds %d", when, e.Len(), n)
	}
	compareIndexed(t, e, rand.New(rand.NewPCG(1, 2)), when)
	for _, typ := range []string{"car", "fridge", "planter"} {
		pin := Pin{Types: []string{typ}}
		if diff := cmp.Diff(scanIDs(t, e, pin, ""), listIDs(t, e, pin, "")); diff != "" {
			t.Errorf("%s: ListIndexed(type %s) differs from the scan (-scan +indexed):\n%s", when, typ, diff)
		}
	}
	return e
}

// TestImportConsistency: imports with and without upsert and
// keep_versions, over twins that are connected, have a seen key, open
// commands, pending rule states, a deleted predecessor, or change type,
// and duplicates within a batch, each leave a store that Check accepts,
// whose counts, index and commands agree with the reads, before and after
// a restart, and whose export restores into a store that Check accepts
// and that reads the same.
func TestImportConsistency(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	opts := Options{Workers: 2, VShards: 8, CacheBytes: 1 << 20}
	e := openMem(t, fs, opts)
	for _, id := range []string{"a", "b", "c", "d"} {
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "fridge", Labels: map[string]string{"site": "berlin"},
			Reported: doc(t, `{"temp_c":3}`)}); err != nil {
			t.Fatal(err)
		}
	}
	old, err := e.SendCommand(ctx, CommandRequest{DeviceID: "a", Name: "defrost"})
	if err != nil {
		t.Fatal(err)
	}
	s := newRecSink()
	if _, err := e.Connect(ctx, "b", s); err != nil {
		t.Fatal(err)
	}
	// A report that changes nothing but last_seen: a seen key.
	if _, err := e.Report(ctx, PatchRequest{ID: "b", Patch: doc(t, `{"temp_c":3}`), Source: SourceDevice, Stream: s}); err != nil {
		t.Fatal(err)
	}
	if err := e.Delete(ctx, "c", 0); err != nil {
		t.Fatal(err)
	}
	pending := RuleState{Gen: 1, Active: true, PendingSince: time.Now().UTC().Add(-time.Second).Truncate(time.Millisecond)}
	if errs, err := e.Import(ctx, []ImportItem{{Twin: &Twin{ID: "p", Type: "planter"},
		RuleStates: map[string]RuleState{"r": pending}}}, ImportOptions{}); err != nil || len(errs) != 0 {
		t.Fatal(errs, err)
	}
	e = reviewVConsistent(t, e, fs, opts, "before the imports")

	// Upsert with keep_versions: a changes type and labels and gets a
	// new command, b (connected before the restart) is replaced, c
	// comes back after its deletion, e comes twice in one batch.
	car := func(id string, version int64) ImportItem {
		return ImportItem{Twin: &Twin{ID: id, Type: "car", Labels: map[string]string{"site": "paris"},
			Reported: doc(t, `{"fuel":0.5}`), Version: version}}
	}
	a := car("a", 10)
	a.Commands = []*Command{{Seq: 5, Name: "honk", State: CommandQueued}}
	items := []ImportItem{a, car("b", 20), car("c", 30), car("e", 3), car("e", 4), car("p", 9)}
	errs, err := e.Import(ctx, items, ImportOptions{Upsert: true, KeepVersions: true})
	if err != nil || len(errs) != 0 {
		t.Fatalf("import with upsert and keep_versions = %v, %v", errs, err)
	}
	for id, want := range map[string]int64{"a": 10, "b": 20, "c": 30, "e": 4, "p": 9} {
		if tw, err := e.Get(id); err != nil || tw.Version != want || tw.Type != "car" || tw.Presence.Connected {
			t.Errorf("Get(%s) after import = %+v, %v; want a disconnected car at version %d", id, tw, err, want)
		}
	}
	if _, err := e.GetCommand(old.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetCommand(%s) of the replaced twin = %v; want not found", old.ID, err)
	}
	e = reviewVConsistent(t, e, fs, opts, "after the upsert with keep_versions")
	if _, err := e.GetCommand(old.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("after restart: GetCommand(%s) of the replaced twin = %v; want not found", old.ID, err)
	}
	if cmds, _, err := e.ListCommands("a", nil, 0, 10); err != nil || len(cmds) != 1 || cmds[0].ID != "a~5" {
		t.Errorf("after restart: ListCommands(a) = %v, %v; want a~5 alone", cmds, err)
	}

	// Without upsert, existing ids are refused and nothing of them
	// changes; without keep_versions the versions follow.
	errs, err = e.Import(ctx, []ImportItem{car("a", 1), car("f", 1)}, ImportOptions{})
	if err != nil || len(errs) != 1 || errs[0].Index != 0 || !errors.Is(errs[0], ErrAlreadyExists) {
		t.Fatalf("import without upsert = %v, %v; want item 0 refused", errs, err)
	}
	f := fridgeItem(t, "a")
	errs, err = e.Import(ctx, []ImportItem{f, fridgeItem(t, "p"), fridgeItem(t, "d")}, ImportOptions{Upsert: true})
	if err != nil || len(errs) != 0 {
		t.Fatalf("upsert = %v, %v", errs, err)
	}
	if tw, _ := e.Get("a"); tw.Version != 11 || tw.Type != "fridge" {
		t.Errorf("upserted a = %+v; want a fridge at version 11", tw)
	}
	if cmds, _, err := e.ListCommands("a", nil, 0, 10); err != nil || len(cmds) != 0 {
		t.Errorf("ListCommands(a) after an upsert without commands = %v, %v; want none", cmds, err)
	}
	e = reviewVConsistent(t, e, fs, opts, "after the upsert without keep_versions")

	// Export, restore into a new store, compare.
	x, err := e.Export(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var restore []ImportItem
	want := map[string]*Twin{}
	if err := x.Each(ctx, func(it *ExportItem) error {
		if it.Twin != nil {
			restore = append(restore, ImportItem{Twin: it.Twin, Commands: it.Commands, RuleStates: it.RuleStates})
			want[it.Twin.ID] = it.Twin.clone()
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	x.Close()
	e.Close()
	fs2 := vfs.NewMem()
	r := openMem(t, fs2, Options{Workers: 3, VShards: 16})
	if errs, err := r.Import(ctx, restore, ImportOptions{KeepVersions: true}); err != nil || len(errs) != 0 {
		t.Fatal(errs, err)
	}
	r = reviewVConsistent(t, r, fs2, Options{Workers: 3, VShards: 16}, "after the restore")
	defer r.Close()
	for id, w := range want {
		got, err := r.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(w, got, cmpopts.IgnoreFields(Twin{}, "Revision", "Presence"), cmpopts.EquateEmpty()); diff != "" {
			t.Errorf("restored %q (-exported +restored):\n%s", id, diff)
		}
	}
	if got := r.Len(); got != len(want) {
		t.Errorf("restored Len = %d; want %d", got, len(want))
	}
	_ = fmt.Sprint
}

// logRecorder keeps the messages of the records it handles.
type logRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	r.msgs = append(r.msgs, rec.Message)
	r.mu.Unlock()
	return nil
}
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *logRecorder) WithGroup(string) slog.Handler      { return r }

// TestNewStoreBuildsNoIndex: a new store is not taken for one
// written before the index existed (load writes every shard's count
// before ensureIndex looks for keys): Open neither builds an index nor
// logs that it does.
func TestNewStoreBuildsNoIndex(t *testing.T) {
	rec := &logRecorder{}
	fs := vfs.NewMem()
	for range 2 {
		e := openMem(t, fs, Options{VShards: 8, Logger: slog.New(rec)})
		e.Close()
	}
	for _, m := range rec.msgs {
		if strings.Contains(m, "building the index") {
			t.Errorf("Open of a new store logged %q; want no index build", m)
		}
	}
	checkClean(t, fs)
}

// TestUpsertWakesCommandWaiters: an import that replaces a twin
// drops its commands, as a deletion does; a WaitCommand on one of them
// learns it then (not found), not only when its own deadline passes.
func TestUpsertWakesCommandWaiters(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{Workers: 1, VShards: 4})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "f", Type: "fridge"}); err != nil {
		t.Fatal(err)
	}
	cmd, err := e.SendCommand(ctx, CommandRequest{DeviceID: "f", Name: "defrost"})
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		cmd *Command
		err error
	}
	done := make(chan result, 1)
	waiting := make(chan struct{})
	go func() {
		// Registered before the import: WaitCommand reads the command
		// after it registers.
		close(waiting)
		c, err := e.WaitCommand(wctx, cmd.ID)
		done <- result{c, err}
	}()
	<-waiting
	// The waiter is registered once the engine lists it.
	for deadline := time.Now().Add(10 * time.Second); ; {
		e.waitMu.Lock()
		n := len(e.waiters[cmd.ID])
		e.waitMu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("WaitCommand never registered")
		}
		time.Sleep(time.Millisecond)
	}
	if errs, err := e.Import(ctx, []ImportItem{fridgeItem(t, "f")}, ImportOptions{Upsert: true}); err != nil || len(errs) != 0 {
		t.Fatal(errs, err)
	}
	select {
	case r := <-done:
		if !errors.Is(r.err, ErrNotFound) {
			t.Errorf("WaitCommand(%s) after the upsert = %v, %v; want not found", cmd.ID, r.cmd, r.err)
		}
	case <-time.After(10 * time.Second):
		cancel()
		r := <-done
		t.Errorf("WaitCommand(%s) still waited 10s after an upsert dropped the command (then: %v, %v)", cmd.ID, r.cmd, r.err)
	}
}

// TestTickTypeChangeDuringScan: a tick's scan walks the index of
// twins by type; a twin whose type changes (UpdateTwin) between two
// ticking types while the scan is under way is evaluated once by that
// tick, whether some types tick or all do. (The scan walked one type's
// range after another's: a twin moved from a range it had walked to one it
// had not was evaluated twice, and one moved the other way not at all.)
func TestTickTypeChangeDuringScan(t *testing.T) {
	for _, all := range []bool{false, true} {
		t.Run(fmt.Sprintf("all=%v", all), func(t *testing.T) { testTickTypeChangeDuringScan(t, all) })
	}
}

// allTicker is a typeTicker whose rules all read now, whatever the type.
type allTicker struct{ typeTicker }

func (allTicker) Ticks(string) bool           { return true }
func (allTicker) TickTypes() ([]string, bool) { return nil, true }

func testTickTypeChangeDuringScan(t *testing.T, all bool) {
	ctx := context.Background()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	opts := Options{Workers: 1, VShards: 1, Clock: clock.Now, RuleTick: 10 * time.Second}
	e := openMem(t, vfs.NewMem(), opts)
	defer e.Close()
	ids := []string{"a-planter"}
	if _, err := e.Create(ctx, CreateRequest{ID: "a-planter", Type: "planter"}); err != nil {
		t.Fatal(err)
	}
	for i := range 300 {
		for _, typ := range []string{"car", "planter"} {
			id := fmt.Sprintf("%s-%03d", typ, i)
			ids = append(ids, id)
			if _, err := e.Create(ctx, CreateRequest{ID: id, Type: typ}); err != nil {
				t.Fatal(err)
			}
		}
	}
	var mu sync.Mutex
	evals := map[string]int{}
	var ev Evaluator = typeTicker{types: []string{"car", "planter"}, eval: func(next *Twin) {
		mu.Lock()
		evals[next.ID]++
		mu.Unlock()
	}}
	if all {
		ev = allTicker{ev.(typeTicker)}
	}
	e.SetEvaluator(ev)
	if err := e.RunTimers(ctx); err != nil { // starts the ticking
		t.Fatal(err)
	}
	clock.Advance(10 * time.Second) // a tick: its first chunk walks car-000 to car-255
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	first := evals["car-000"]
	mu.Unlock()
	if first != 1 {
		t.Fatalf("the tick's first chunk evaluated car-000 %d times; want 1 (the test expects it walked first)", first)
	}
	planter, car := "planter", "car"
	if _, err := e.Update(ctx, UpdateRequest{ID: "car-000", Type: &planter}); err != nil { // walked, into a range ahead
		t.Fatal(err)
	}
	if _, err := e.Update(ctx, UpdateRequest{ID: "a-planter", Type: &car}); err != nil { // ahead, into the walked part
		t.Fatal(err)
	}
	clock.Advance(9 * time.Second) // past the scan's pace, before the next tick
	for range 6 {
		if err := e.RunTimers(ctx); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for _, id := range ids {
		if evals[id] != 1 {
			t.Errorf("one tick evaluated %s %d times; want once", id, evals[id])
		}
	}
}

// TestWaitCommandOfTwinNotCached: after a restart, with a cache too
// small for the fleet, GetCommand, ListCommands and WaitCommand of twins
// that are not cached read their commands from the store, and a waiter is
// woken when the device finishes the command (which reads the twin back).
func TestWaitCommandOfTwinNotCached(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	opts := Options{Workers: 1, VShards: 4, CacheBytes: 64 << 10}
	e := openMem(t, fs, opts)
	const n = 200
	for i := range n {
		id := fmt.Sprintf("f-%03d", i)
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "fridge", Reported: doc(t, `{"temp_c":3,"door":"closed","power_w":80}`)}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: id, Name: "defrost"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openMem(t, fs, opts)
	defer e.Close()
	for i := range n {
		id := fmt.Sprintf("f-%03d", i)
		cmds, _, err := e.ListCommands(id, nil, 0, 10)
		if err != nil || len(cmds) != 1 || cmds[0].ID != id+"~1" || cmds[0].State != CommandQueued {
			t.Fatalf("ListCommands(%s) = %v, %v; want its queued defrost", id, cmds, err)
		}
	}
	// Waiters on commands of twins the cache cannot all hold.
	type result struct {
		cmd *Command
		err error
	}
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	results := make(chan result, n)
	for i := range n {
		go func() {
			c, err := e.WaitCommand(wctx, fmt.Sprintf("f-%03d~1", i))
			results <- result{c, err}
		}()
	}
	for i := range n {
		id := fmt.Sprintf("f-%03d", i)
		if _, err := e.UpdateCommand(ctx, id, CommandUpdate{ID: id + "~1", State: CommandSucceeded}); err != nil {
			t.Fatal(err)
		}
	}
	for range n {
		r := <-results
		if r.err != nil || r.cmd.State != CommandSucceeded {
			t.Errorf("WaitCommand = %v, %v; want SUCCEEDED", r.cmd, r.err)
		}
	}
	if st := e.Stats(); st.CachedTwins >= n {
		t.Errorf("the cache held %d twins of %d; the test wants a cache smaller than the fleet", st.CachedTwins, n)
	}
}

// TestListIndexedReportsReadErrors: a twin record that cannot be
// read fails ListIndexed, as it fails List, rather than vanishing from
// the answer.
func TestListIndexedReportsReadErrors(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	opts := Options{Workers: 1, VShards: 4, Logger: quiet}
	e := openMem(t, fs, opts)
	for _, id := range []string{"car-1", "car-2", "car-3"} {
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "car"}); err != nil {
			t.Fatal(err)
		}
	}
	e.Close()
	e = openMem(t, fs, opts) // nothing cached
	defer e.Close()
	if err := e.db.Set(twinKey(e.VShard("car-2"), "car-2"), []byte{0x01, 0xff, 0xff}, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	_, listErr := e.List(ctx, "", func(*Twin) bool { return true })
	var ids []string
	_, err := e.ListIndexed(ctx, Pin{Types: []string{"car"}}, "", func(tw *Twin) bool { ids = append(ids, tw.ID); return true })
	if listErr == nil {
		t.Fatalf("List over a corrupt record = nil error; the test expects it to fail")
	}
	if err == nil {
		t.Errorf("ListIndexed over a corrupt record = %v, nil error; want an error, as List gives (%v)", ids, listErr)
	}
}
