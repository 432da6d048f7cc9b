package twin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/twind-io/twind/twin/vfstest"
)

// funcEvaluator is an Evaluator made of a function, for tests that script
// what rules do.
type funcEvaluator struct {
	eval  func(prev, next *Twin, states map[string]RuleState, now time.Time, timer bool) Evaluation
	ticks bool
}

func (f funcEvaluator) Evaluate(prev, next *Twin, states map[string]RuleState, now time.Time, timer bool) Evaluation {
	return f.eval(prev, next, states, now, timer)
}
func (f funcEvaluator) Ticks(string) bool           { return f.ticks }
func (f funcEvaluator) TickTypes() ([]string, bool) { return nil, f.ticks }
func (f funcEvaluator) Watches(string) bool         { return true }

// blockingEvaluator stalls the worker inside a step until released, so that
// a test can queue several requests for the worker's next step.
type blockingEvaluator struct {
	entered chan struct{}
	release chan struct{}
	once    sync.Once
	then    func(prev, next *Twin, states map[string]RuleState, now time.Time, timer bool) Evaluation
}

func (b *blockingEvaluator) Evaluate(prev, next *Twin, states map[string]RuleState, now time.Time, timer bool) Evaluation {
	if next.Labels["block"] == "yes" {
		b.once.Do(func() {
			close(b.entered)
			<-b.release
		})
	}
	if b.then != nil {
		return b.then(prev, next, states, now, timer)
	}
	return Evaluation{}
}
func (b *blockingEvaluator) Ticks(string) bool           { return false }
func (b *blockingEvaluator) TickTypes() ([]string, bool) { return nil, false }
func (b *blockingEvaluator) Watches(string) bool         { return true }

// TestRuleCommandsAllKept: every command of every rule that fires on one
// change is stored, delivered and survives a restart (item 2), and a command
// fired by a connect's presence change joins the welcome's backlog.
func TestRuleCommandsAllKept(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	ev := funcEvaluator{eval: func(prev, next *Twin, _ map[string]RuleState, _ time.Time, _ bool) Evaluation {
		var fs []Firing
		if prev != nil && next.Reported["hot"] == true && prev.Reported["hot"] != true {
			fs = append(fs,
				Firing{RuleID: "r1", Commands: []RuleCommand{{Name: "a"}, {Name: "b"}}},
				Firing{RuleID: "r2", Commands: []RuleCommand{{Name: "c"}}})
		}
		if prev != nil && next.Presence.Connected && !prev.Presence.Connected {
			fs = append(fs, Firing{RuleID: "hello", Commands: []RuleCommand{{Name: "sync"}}})
		}
		return Evaluation{Firings: fs}
	}}
	e := openMem(t, fs, Options{})
	e.SetEvaluator(ev)
	if _, err := e.Create(ctx, CreateRequest{ID: "f1", Type: "fridge"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: "f1", Name: "queued"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "f1", Patch: Document{"hot": true}}); err != nil {
		t.Fatal(err)
	}
	names := func(e *Engine) []string {
		cmds, _, err := e.ListCommands("f1", nil, 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, c := range cmds {
			out = append(out, c.Name+":"+c.State.String())
		}
		return out
	}
	want := []string{"queued:QUEUED", "a:QUEUED", "b:QUEUED", "c:QUEUED"}
	if got := names(e); !slices.Equal(got, want) {
		t.Errorf("commands = %v; want %v", got, want)
	}
	e.Close()
	e = openMem(t, fs, Options{})
	defer e.Close()
	e.SetEvaluator(ev)
	if got := names(e); !slices.Equal(got, want) {
		t.Errorf("commands after restart = %v; want %v", got, want)
	}
	sink := newRecSink()
	if _, err := e.Connect(ctx, "f1", sink); err != nil {
		t.Fatal(err)
	}
	got := sink.wait(t, 1)[0]
	wantWelcome := "welcome v2 f1~1:SENT f1~2:SENT f1~3:SENT f1~4:SENT f1~5:SENT"
	if got != wantWelcome {
		t.Errorf("welcome = %q; want %q (the backlog and the command of the connect's rule)", got, wantWelcome)
	}
}

// TestDeleteInStepWithReports: a delete that shares a worker step with
// reports before it and a re-creation after it leaves nothing of the old
// twin behind: no history, no rule states, also after a restart (item 8).
func TestDeleteInStepWithReports(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	b := &blockingEvaluator{entered: make(chan struct{}), release: make(chan struct{}),
		then: func(prev, next *Twin, _ map[string]RuleState, now time.Time, _ bool) Evaluation {
			return Evaluation{States: map[string]*RuleState{"r": {Gen: next.Version, Active: true}}}
		}}
	e := openMem(t, fs, Options{Workers: 1, VShards: 1})
	e.SetEvaluator(b)
	if _, err := e.Create(ctx, CreateRequest{ID: "p1", Type: "planter"}); err != nil {
		t.Fatal(err)
	}
	// Stall the worker on another twin, queue reports, a delete and a
	// re-creation of p1 behind it, then let them go as one step.
	blocked := make(chan error, 1)
	go func() {
		_, err := e.Create(ctx, CreateRequest{ID: "blocker", Type: "planter", Labels: map[string]string{"block": "yes"}})
		blocked <- err
	}()
	<-b.entered
	var pend []Pending
	for i := range 3 {
		p, err := e.StartReport(ctx, PatchRequest{ID: "p1", Patch: Document{"n": float64(i)}})
		if err != nil {
			t.Fatal(err)
		}
		pend = append(pend, p)
	}
	del := make(chan error, 1)
	go func() { del <- e.Delete(ctx, "p1", 0) }()
	for len(e.workers[0].inbox) < 4 {
		time.Sleep(time.Millisecond) // until the delete is queued behind the reports
	}
	rec := make(chan error, 1)
	go func() {
		_, err := e.Create(ctx, CreateRequest{ID: "p1", Type: "planter"})
		rec <- err
	}()
	for len(e.workers[0].inbox) < 5 {
		time.Sleep(time.Millisecond)
	}
	close(b.release)
	for _, p := range pend {
		if r := <-p.Done(); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	if err := <-del; err != nil {
		t.Fatal(err)
	}
	if err := <-rec; err != nil {
		t.Fatal(err)
	}
	if err := <-blocked; err != nil {
		t.Fatal(err)
	}
	check := func(e *Engine, when string) {
		tw, err := e.Get("p1")
		if err != nil {
			t.Fatal(err)
		}
		evs, err := e.History("p1", 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		var vs []int64
		for _, ev := range evs {
			vs = append(vs, ev.Twin.Version)
		}
		if want := []int64{tw.Version}; !slices.Equal(vs, want) {
			t.Errorf("%s: history of the re-created twin has versions %v; want %v", when, vs, want)
		}
		st := storeRuleStates(t, e, "p1")
		if s, ok := st["r"]; !ok || s.Gen != tw.Version {
			t.Errorf("%s: rule state of the re-created twin = %+v; want generation %d (the old twin's states are gone)", when, st, tw.Version)
		}
	}
	check(e, "before restart")
	e.Close()
	e = openMem(t, fs, Options{Workers: 1, VShards: 1})
	defer e.Close()
	check(e, "after restart")
}

// TestRulePatchesKeepNulls: a rule's null removes a desired key, also when
// several rules patch desired on one change (item 15).
func TestRulePatchesKeepNulls(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	e.SetEvaluator(funcEvaluator{eval: func(prev, next *Twin, _ map[string]RuleState, _ time.Time, _ bool) Evaluation {
		if prev == nil || next.Reported["go"] != true || prev.Reported["go"] == true {
			return Evaluation{}
		}
		return Evaluation{Firings: []Firing{
			{RuleID: "a", DesiredPatches: []Document{{"pump": nil, "fan": "on"}}},
			{RuleID: "b", DesiredPatches: []Document{{"lamp": "on"}}},
			{RuleID: "c", DesiredPatches: []Document{{"lamp": nil, "mode": map[string]any{"x": nil, "y": 1.0}}}},
		}}
	}})
	if _, err := e.Create(ctx, CreateRequest{ID: "p", Type: "planter",
		Desired: Document{"pump": "on", "mode": map[string]any{"x": 1.0}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "p", Patch: Document{"go": true}}); err != nil {
		t.Fatal(err)
	}
	tw, _ := e.Get("p")
	want := Document{"fan": "on", "mode": map[string]any{"y": 1.0}}
	if !jsonEqual(map[string]any(tw.Desired), map[string]any(want)) {
		t.Errorf("desired = %v; want %v", tw.Desired, want)
	}
}

// TestFailuresAnsweredWhenDurable: an error computed from state that is not
// yet durable is not answered before that state is (item 17), and history
// shows no version that is not durable (item 16).
func TestFailuresAnsweredWhenDurable(t *testing.T) {
	ctx := context.Background()
	g := vfstest.NewGate(vfs.NewMem())
	e := openMem(t, g, Options{})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "f", Type: "fridge"}); err != nil {
		t.Fatal(err)
	}
	g.Hold()
	defer g.Release() // before Close, if the test fails early
	report := make(chan error, 1)
	go func() {
		_, err := e.Report(ctx, PatchRequest{ID: "f", Patch: Document{"temp_c": 3.0}})
		report <- err
	}()
	g.AwaitHeld(t)

	// Version 2 is in the store but not durable: history must not show it.
	evs, err := e.History("f", 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 1 || evs[0].Twin.Version != 1 {
		var vs []int64
		for _, ev := range evs {
			vs = append(vs, ev.Twin.Version)
		}
		t.Errorf("history while version 2 is not durable = versions %v; want [1]", vs)
	}

	// A write expecting version 2 fails because of that report: the
	// failure must wait for it to be durable.
	answered := make(chan error, 1)
	go func() {
		_, err := e.UpdateDesired(ctx, PatchRequest{ID: "f", Patch: Document{"x": 1.0}, ExpectedVersion: 1})
		answered <- err
	}()
	select {
	case err := <-answered:
		t.Fatalf("UpdateDesired answered %v while the report it conflicts with was not durable", err)
	case <-time.After(200 * time.Millisecond):
	}
	g.Release()
	if err := <-report; err != nil {
		t.Fatal(err)
	}
	if err := <-answered; !errors.Is(err, ErrVersionMismatch) {
		t.Errorf("UpdateDesired = %v; want ErrVersionMismatch", err)
	}
}

// TestTimeRulesAfterRestart runs on the real clock: a rule that reads `now`
// fires after a restart with no write at all (item 4).
func TestTimeRulesAfterRestart(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{RuleTick: 20 * time.Millisecond})
	if _, err := e.Create(ctx, CreateRequest{ID: "c", Type: "car"}); err != nil {
		t.Fatal(err)
	}
	e.Close()

	fired := make(chan FiringEvent, 16)
	e = openMem(t, fs, Options{RuleTick: 20 * time.Millisecond, OnFirings: func(evs []FiringEvent) {
		for _, ev := range evs {
			select {
			case fired <- ev:
			default:
			}
		}
	}})
	defer e.Close()
	// The workers go to sleep with nothing to do before the rules are
	// installed, as in twind, which loads them after opening the store.
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	e.SetEvaluator(funcEvaluator{ticks: true, eval: func(prev, next *Twin, st map[string]RuleState, now time.Time, timer bool) Evaluation {
		if !timer || st["idle"].Fired || now.Sub(start) < 50*time.Millisecond {
			return Evaluation{}
		}
		return Evaluation{States: map[string]*RuleState{"idle": {Fired: true}},
			Firings: []Firing{{RuleID: "idle", Emits: []Emit{{Message: "idle"}}}}}
	}})
	select {
	case ev := <-fired:
		if ev.RuleID != "idle" || ev.TwinID != "c" {
			t.Errorf("firing = %s on %s; want idle on c", ev.RuleID, ev.TwinID)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the time rule did not fire after the restart with no write")
	}
}

// TestRuleLoopStops: rules that keep changing desired state stop after
// maxRuleDepth applied changes; only applied firings count as firings, and
// the stop is an error of the rule (item 11).
func TestRuleLoopStops(t *testing.T) {
	ctx := context.Background()
	var mu sync.Mutex
	var got []FiringEvent
	e := openMem(t, vfs.NewMem(), Options{OnFirings: func(evs []FiringEvent) {
		mu.Lock()
		got = append(got, evs...)
		mu.Unlock()
	}})
	defer e.Close()
	e.SetEvaluator(funcEvaluator{eval: func(prev, next *Twin, _ map[string]RuleState, _ time.Time, _ bool) Evaluation {
		n, _ := next.Desired["n"].(float64)
		return Evaluation{Firings: []Firing{{RuleID: "count", DesiredPatches: []Document{{"n": n + 1}}}}}
	}})
	if _, err := e.Create(ctx, CreateRequest{ID: "x", Type: "t"}); err != nil {
		t.Fatal(err)
	}
	if err := e.RunTimers(ctx); err != nil { // everything published
		t.Fatal(err)
	}
	tw, _ := e.Get("x")
	if n := tw.Desired["n"]; n != float64(maxRuleDepth) {
		t.Errorf("desired n = %v; want %d", n, maxRuleDepth)
	}
	mu.Lock()
	defer mu.Unlock()
	var applied, loops int
	for _, f := range got {
		switch {
		case errors.Is(f.Err, ErrRuleLoop) && f.RuleID == "count":
			loops++
		case f.Err == nil:
			applied++
		default:
			t.Errorf("unexpected firing %+v", f)
		}
	}
	if applied != maxRuleDepth || loops != 1 {
		t.Errorf("firings: %d applied, %d loop errors; want %d and 1", applied, loops, maxRuleDepth)
	}
}

// TestTimedWorkBounded: finished commands leave the expiry heap, and a
// twin has at most one pending rule wake-up however often it changes
// (item 18).
func TestTimedWorkBounded(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{Workers: 1, VShards: 1})
	defer e.Close()
	e.SetEvaluator(funcEvaluator{eval: func(_, next *Twin, _ map[string]RuleState, now time.Time, _ bool) Evaluation {
		return Evaluation{Wake: now.Add(time.Hour)} // hold_for running
	}})
	if _, err := e.Create(ctx, CreateRequest{ID: "d", Type: "t"}); err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		cmd, err := e.SendCommand(ctx, CommandRequest{DeviceID: "d", Name: "go", TTL: 24 * time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.UpdateCommand(ctx, "d", CommandUpdate{ID: cmd.ID, State: CommandSucceeded}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Report(ctx, PatchRequest{ID: "d", Patch: Document{"i": float64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	w := e.workers[0]
	// The worker is idle: RunTimers returned after its step.
	if n := w.expiries.Len(); n != 0 {
		t.Errorf("expiry heap holds %d entries with no open command; want 0", n)
	}
	if n := w.ruleTimers.Len(); n > 1 {
		t.Errorf("rule timer heap holds %d entries for one twin; want 1", n)
	}
}

// TestCommandLimits: params, results and messages are bounded (item 5).
func TestCommandLimits(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "d", Type: "t"}); err != nil {
		t.Fatal(err)
	}
	big := Document{"blob": strings.Repeat("x", 17<<10)}
	if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: "d", Name: "go", Params: big}); !errors.Is(err, ErrLimit) {
		t.Errorf("SendCommand with 17 KiB of params = %v; want ErrLimit", err)
	}
	cmd, err := e.SendCommand(ctx, CommandRequest{DeviceID: "d", Name: "go", Params: Document{"ok": true}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.UpdateCommand(ctx, "d", CommandUpdate{ID: cmd.ID, State: CommandSucceeded, Result: big}); !errors.Is(err, ErrLimit) {
		t.Errorf("UpdateCommand with 17 KiB of result = %v; want ErrLimit", err)
	}
	if _, err := e.UpdateCommand(ctx, "d", CommandUpdate{ID: cmd.ID, State: CommandFailed, Message: strings.Repeat("m", 2000)}); !errors.Is(err, ErrLimit) {
		t.Errorf("UpdateCommand with a 2000-byte message = %v; want ErrLimit", err)
	}
	if got, _ := e.GetCommand(cmd.ID); got.State != CommandQueued {
		t.Errorf("command after refused updates is %s; want QUEUED", got.State)
	}
}

// TestPresenceAfterRestart: a device connected when the process stopped is
// marked disconnected after the grace period unless it came back, and rules
// watching presence see it go (item 3).
func TestPresenceAfterRestart(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{})
	for _, id := range []string{"gone", "back"} {
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "car"}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Connect(ctx, id, newRecSink()); err != nil {
			t.Fatal(err)
		}
	}
	e.Close() // as a crash would: no disconnects recorded

	offline := make(chan string, 4)
	e = openMem(t, fs, Options{PresenceGrace: 100 * time.Millisecond, OnFirings: func(evs []FiringEvent) {
		for _, ev := range evs {
			offline <- ev.TwinID
		}
	}})
	defer e.Close()
	e.SetEvaluator(funcEvaluator{eval: func(prev, next *Twin, _ map[string]RuleState, _ time.Time, _ bool) Evaluation {
		if prev != nil && prev.Presence.Connected && !next.Presence.Connected {
			return Evaluation{Firings: []Firing{{RuleID: "offline"}}}
		}
		return Evaluation{}
	}})
	if _, err := e.Connect(ctx, "back", newRecSink()); err != nil {
		t.Fatal(err)
	}
	select {
	case id := <-offline:
		if id != "gone" {
			t.Errorf("offline rule fired for %q; want gone", id)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the offline rule did not fire for the device that did not come back")
	}
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]bool{"gone": false, "back": true} {
		tw, _ := e.Get(id)
		if tw.Presence.Connected != want {
			t.Errorf("%s: connected = %v; want %v", id, tw.Presence.Connected, want)
		}
	}
	select {
	case id := <-offline:
		t.Errorf("offline rule fired again, for %q", id)
	default:
	}
	// A clean restart now finds only "back" connected.
	e.Close()
	e2 := openMem(t, fs, Options{})
	defer e2.Close()
	n := 0
	for _, w := range e2.workers {
		n += len(w.lost)
	}
	if n != 1 {
		t.Errorf("after a restart %d devices are presumed lost; want 1", n)
	}
}

// TestHistoryLimitLowered: after the history limit is lowered, a twin's next
// change trims its history to the new limit (item 18).
func TestHistoryLimitLowered(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{HistoryLimit: 10})
	if _, err := e.Create(ctx, CreateRequest{ID: "h", Type: "t"}); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if _, err := e.Report(ctx, PatchRequest{ID: "h", Patch: Document{"i": float64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	e.Close()
	for _, limit := range []int{3, 3, 10} { // lowered, the same again, raised
		e = openMem(t, fs, Options{HistoryLimit: limit})
		if _, err := e.Report(ctx, PatchRequest{ID: "h", Patch: Document{"limit": float64(limit)}}); err != nil {
			t.Fatal(err)
		}
		keys := 0
		vs := e.VShard("h")
		it, _ := e.db.NewIter(nil)
		lower := historyPrefix(vs, "h")
		for it.SeekGE(lower); it.Valid() && strings.HasPrefix(string(it.Key()), string(lower)); it.Next() {
			keys++
		}
		it.Close()
		if want := min(limit, 3); limit == 3 && keys != want {
			t.Errorf("history limit %d: %d history keys; want %d", limit, keys, want)
		} else if limit == 10 && keys != 4 {
			t.Errorf("history limit raised to 10: %d history keys; want 4 (3 kept, 1 new)", keys)
		}
		e.Close()
	}
}

// TestStepCostBudget: a tick over many twins stops once the step has spent
// its CEL budget and leaves the rest due at once, for the next step (item
// 10's per-step budget).
func TestStepCostBudget(t *testing.T) {
	e := openMem(t, vfs.NewMem(), Options{StepCostBudget: 2_500_000, Workers: 1, VShards: 1})
	defer e.Close()
	for i := range 10 {
		if _, err := e.Create(context.Background(), CreateRequest{ID: fmt.Sprintf("t%d", i), Type: "t"}); err != nil {
			t.Fatal(err)
		}
	}
	// A worker of its own over the store's shards, not running, so that
	// the test can step it.
	w := &worker{e: e, cache: twinCache{m: map[string]*entry{}, limit: 1 << 30}, counts: map[uint16]int64{},
		sinks: map[string]Sink{}, ruleWake: map[string]time.Time{}}
	evals := 0
	ev := funcEvaluator{ticks: true, eval: func(_, _ *Twin, _ map[string]RuleState, _ time.Time, _ bool) Evaluation {
		evals++
		return Evaluation{Cost: 1_000_000}
	}}
	now := time.Now()
	w.timedRules(ev, now, true)
	if evals != 3 {
		t.Errorf("a tick with a budget of 2.5M evaluated %d twins at 1M each; want 3", evals)
	}
	if len(w.timedBacklog) != 7 {
		t.Errorf("%d twins left due for the next step; want 7", len(w.timedBacklog))
	}
	for step := 0; len(w.timedBacklog) > 0 && step < 10; step++ {
		w.stepCost = 0
		w.timedRules(ev, now, false)
	}
	if evals != 10 || len(w.timedBacklog) != 0 {
		t.Errorf("after more steps: %d evaluations, %d twins due; want 10 and 0", evals, len(w.timedBacklog))
	}
}

// TestRevokedStreamCannotWrite: once a device's token is replaced, the
// stream that authenticated with the old one is closed and its reports and
// command updates are refused (item 6).
func TestRevokedStreamCannotWrite(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "d", Type: "t"}); err != nil {
		t.Fatal(err)
	}
	if err := e.SetTokenHash(ctx, "d", []byte("old")); err != nil {
		t.Fatal(err)
	}
	old := newRecSink()
	if _, err := e.Connect(ctx, "d", old); err != nil {
		t.Fatal(err)
	}
	cmd, err := e.SendCommand(ctx, CommandRequest{DeviceID: "d", Name: "go"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "d", Patch: Document{"a": 1.0}, Stream: old}); err != nil {
		t.Fatalf("report on the current stream: %v", err)
	}
	if err := e.SetTokenHash(ctx, "d", []byte("new")); err != nil {
		t.Fatal(err)
	}
	old.wait(t, 3) // welcome, command, closed
	old.mu.Lock()
	closed := old.closed
	old.mu.Unlock()
	if !errors.Is(closed, ErrTokenRevoked) {
		t.Errorf("old stream closed with %v; want ErrTokenRevoked", closed)
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "d", Patch: Document{"a": 2.0}, Stream: old}); !errors.Is(err, ErrStreamClosed) {
		t.Errorf("report on the revoked stream = %v; want ErrStreamClosed", err)
	}
	if _, err := e.UpdateCommand(ctx, "d", CommandUpdate{ID: cmd.ID, State: CommandSucceeded, Stream: old}); !errors.Is(err, ErrStreamClosed) {
		t.Errorf("command update on the revoked stream = %v; want ErrStreamClosed", err)
	}
	tw, _ := e.Get("d")
	if tw.Reported["a"] != 1.0 {
		t.Errorf("reported a = %v; want 1 (the revoked stream's report refused)", tw.Reported["a"])
	}
	if tw.Presence.Connected {
		t.Errorf("the twin is connected after its only stream was revoked")
	}
	// The revoked stream's own disconnect changes nothing more.
	if err := e.Disconnect(ctx, "d", old); err != nil {
		t.Fatal(err)
	}
}

// TestNewcomerAnswers: answers that say what happened (issue 13): a
// request_id reused for another command, cancelling a finished command, an
// id made of dots, a store held by another process.
func TestNewcomerAnswers(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	e, err := Open(Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if _, err := Open(Options{Dir: dir}); err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Errorf("opening a store twice = %v; want an error saying another process holds it", err)
	}
	for _, id := range []string{".", "..", "..."} {
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "t"}); !errors.Is(err, ErrInvalidID) {
			t.Errorf("Create(%q) = %v; want ErrInvalidID", id, err)
		}
	}
	if _, err := e.Create(ctx, CreateRequest{ID: "a.b", Type: "t"}); err != nil {
		t.Errorf("Create(a.b) = %v", err)
	}
	first, err := e.SendCommand(ctx, CommandRequest{DeviceID: "a.b", Name: "honk", RequestID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	if again, err := e.SendCommand(ctx, CommandRequest{DeviceID: "a.b", Name: "honk", RequestID: "r1"}); err != nil || again.ID != first.ID {
		t.Errorf("repeated request = %v, %v; want the first command %s", again, err, first.ID)
	}
	if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: "a.b", Name: "navigate", RequestID: "r1"}); !errors.Is(err, ErrAlreadyExists) {
		t.Errorf("request_id reused for another command = %v; want ErrAlreadyExists", err)
	}
	if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: "a.b", Name: "honk", Params: Document{"n": 2.0}, RequestID: "r1"}); !errors.Is(err, ErrAlreadyExists) {
		t.Errorf("request_id reused with other params = %v; want ErrAlreadyExists", err)
	}
	if _, err := e.CancelCommand(ctx, first.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := e.CancelCommand(ctx, first.ID); err == nil || !strings.Contains(err.Error(), "already finished") {
		t.Errorf("cancelling a finished command = %v; want an error saying it already finished", err)
	}
}

// TestDeletedTwinsHoldNoMemory: what a deleted twin leaves behind (its last
// version and command sequence, so that a re-created twin reuses neither)
// lives in the store, not in memory (item 18).
func TestDeletedTwinsHoldNoMemory(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{Workers: 1, VShards: 1, CacheBytes: 16 << 10})
	for i := range 100 {
		id := fmt.Sprint("d", i)
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "t"}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: id, Name: "go"}); err != nil {
			t.Fatal(err)
		}
		if err := e.Delete(ctx, id, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.RunTimers(ctx); err != nil { // a step after the last delete
		t.Fatal(err)
	}
	if n := e.workers[0].cacheBytes(); n > e.opts.twinCacheBytes() {
		t.Errorf("the worker's cache holds %d bytes; want at most its budget, %d", n, e.opts.twinCacheBytes())
	}
	e.Close()
	e = openMem(t, fs, Options{Workers: 1, VShards: 1})
	defer e.Close()
	tw, err := e.Create(ctx, CreateRequest{ID: "d7", Type: "t"})
	if err != nil {
		t.Fatal(err)
	}
	cmd, err := e.SendCommand(ctx, CommandRequest{DeviceID: "d7", Name: "go"})
	if err != nil {
		t.Fatal(err)
	}
	if tw.Version != 2 || cmd.ID != "d7~2" {
		t.Errorf("re-created twin at version %d with command %s; want version 2 and d7~2 (nothing reused)", tw.Version, cmd.ID)
	}
}

// TestRecentEventsAreTheLog: the events watchers that keep up get from
// memory are exactly what a watcher far behind decodes from the log.
func TestRecentEventsAreTheLog(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	e.SetEvaluator(funcEvaluator{eval: func(prev, next *Twin, _ map[string]RuleState, _ time.Time, _ bool) Evaluation {
		if prev != nil && next.Reported["hot"] == true && prev.Reported["hot"] != true {
			return Evaluation{Firings: []Firing{{RuleID: "cool", DesiredPatches: []Document{{"fan": "on", "lamp": nil}}, Commands: []RuleCommand{{Name: "defrost"}}}}}
		}
		return Evaluation{}
	}})
	for i := range 20 {
		id := fmt.Sprint("f", i%5)
		e.Create(ctx, CreateRequest{ID: id, Type: "fridge", Desired: Document{"lamp": "on"}})
		e.Report(ctx, PatchRequest{ID: id, Patch: Document{"hot": i%2 == 0, "t": float64(i)}})
		if i%7 == 0 {
			e.Connect(ctx, id, newRecSink())
		}
		if i%4 == 3 {
			e.Delete(ctx, id, 0)
		}
	}
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	stored, _, err := e.readLog(newLogReader(e.db), nil, 1, e.Revision())
	if err != nil {
		t.Fatal(err)
	}
	recent, _ := e.readRecent(nil, 1, e.Revision())
	if len(stored) == 0 || len(recent) != len(stored) {
		t.Fatalf("%d recent events, %d in the log; want the same, more than 0", len(recent), len(stored))
	}
	for i := range stored {
		want, _ := json.Marshal(stored[i])
		got, _ := json.Marshal(recent[i])
		var w, g any // compared as values: the encoding does not sort keys
		json.Unmarshal(want, &w)
		json.Unmarshal(got, &g)
		if !reflect.DeepEqual(g, w) {
			t.Errorf("revision %d in memory:\n%s\nin the log:\n%s", stored[i].Revision, got, want)
		}
	}
}

// TestMetadataBounded: a document within the size, depth and key limits but
// with thousands of leaves under long keys nested deep is refused, because
// its metadata (a JSON Pointer per leaf) would make the twin too large to
// read; nothing is written.
func TestMetadataBounded(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "m", Type: "t"}); err != nil {
		t.Fatal(err)
	}
	bomb := Document{}
	for i := range 6500 {
		bomb[fmt.Sprint(i)] = 0.0
	}
	for l := range 14 {
		bomb = Document{fmt.Sprintf("k%02d", l) + strings.Repeat("x", 250): bomb}
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "m", Patch: bomb}); !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "metadata") {
		t.Errorf("report of 6,500 leaves under 14 keys of 253 bytes = %v; want ErrLimit naming the metadata", err)
	}
	if tw, _ := e.Get("m"); tw.Version != 1 {
		t.Errorf("twin at version %d after a refused report; want 1", tw.Version)
	}
	// The same leaves without the long nesting are fine.
	flat := Document{}
	for i := range 6500 {
		flat[fmt.Sprint(i)] = 0.0
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "m", Patch: flat}); err != nil {
		t.Errorf("report of 6,500 flat leaves: %v", err)
	}
}

// TestNegativeDesiredAckRefused: a negative desired_acked_version is a
// mistake of the device, not an acknowledgement (issue 13).
func TestNegativeDesiredAckRefused(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "d", Type: "t"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "d", Patch: Document{}, DesiredAckedVersion: -2}); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("report with desired_acked_version -2 = %v; want ErrInvalidArgument", err)
	}
}

// TestPresenceWithoutMarks: a store written before presence marks existed
// (a twin connected when the process stopped, with no mark) still gets its
// device marked disconnected after the grace period.
func TestPresenceWithoutMarks(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{})
	if _, err := e.Create(ctx, CreateRequest{ID: "old", Type: "car"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Connect(ctx, "old", newRecSink()); err != nil {
		t.Fatal(err)
	}
	e.Close()
	// Remove the mark, and the shard's twin count, as a store of the
	// earlier format would lack them.
	db, err := pebble.Open("db", &pebble.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	vs := uint16(vshardOf("old", 256))
	if err := errors.Join(db.Delete(presenceKey(vs, "old"), pebble.Sync), db.Delete(countKey(vs), pebble.Sync)); err != nil {
		t.Fatal(err)
	}
	db.Close()
	// A clock that stands still until the test moves it past the grace:
	// with a grace of a nanosecond the worker could mark the device
	// disconnected before the first look at the count.
	clock := &modelClock{t: time.Now()}
	e = openMem(t, fs, Options{PresenceGrace: time.Second, Clock: clock.Now})
	defer e.Close()
	if n := e.Stats().ConnectedDevices; n != 1 {
		t.Errorf("ConnectedDevices at start = %d; want 1 (the twin says connected)", n)
	}
	clock.Advance(2 * time.Second)
	waitFor := time.Now().Add(10 * time.Second)
	for {
		if err := e.RunTimers(ctx); err != nil {
			t.Fatal(err)
		}
		if tw, _ := e.Get("old"); !tw.Presence.Connected {
			break
		}
		if time.Now().After(waitFor) {
			t.Fatal("the device connected before the restart is still connected")
		}
	}
	if n := e.Stats().ConnectedDevices; n != 0 {
		t.Errorf("ConnectedDevices = %d after it was marked disconnected; want 0", n)
	}
}

// TestPresenceAcrossPowerLoss: devices connect and disconnect while the
// machine loses power at a random moment (Pebble's crashable filesystem,
// keeping some of the unsynced data). The crashed store passes Check (a
// presence mark exactly where a twin says connected), every device whose
// connect was acknowledged and not undone is presumed lost at start, and
// after the grace period no twin says connected: nobody is.
func TestPresenceAcrossPowerLoss(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	ctx := context.Background()
	for round := range 4 {
		mem := vfs.NewCrashableMem()
		opts := Options{FS: mem, Dir: "db", Workers: 2, VShards: 8}
		e, err := Open(opts)
		if err != nil {
			t.Fatal(err)
		}
		const devices = 24
		for i := range devices {
			if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("d", i), Type: "car"}); err != nil {
				t.Fatal(err)
			}
		}
		// Each device connects and disconnects a few times without
		// waiting for its twin's previous change, so steps batch.
		var wg sync.WaitGroup
		stop := make(chan struct{})
		for i := range devices {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id := fmt.Sprint("d", i)
				for {
					s := newRecSink()
					if _, err := e.Connect(ctx, id, s); err != nil {
						return
					}
					select {
					case <-stop:
						return // leave it connected, as a crash would
					default:
					}
					if err := e.Disconnect(ctx, id, s); err != nil {
						return
					}
				}
			}()
		}
		for e.Stats().Changes < int64(devices+50+rng.IntN(400)) {
			time.Sleep(time.Millisecond)
		}
		clone := mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: rng.IntN(101), RNG: rand.New(rand.NewPCG(rng.Uint64(), 2))})
		close(stop)
		wg.Wait()
		e.Close()

		opts.FS = clone
		violations, err := Check(opts)
		if err != nil {
			t.Fatalf("round %d: Check: %v", round, err)
		}
		for _, v := range violations {
			t.Errorf("seed %d round %d: Check: %v", seed, round, v)
		}
		opts.PresenceGrace = time.Nanosecond
		e, err = Open(opts)
		if err != nil {
			t.Fatalf("round %d: reopen: %v", round, err)
		}
		if err := e.RunTimers(ctx); err != nil {
			t.Fatal(err)
		}
		for i := range devices {
			if tw, err := e.Get(fmt.Sprint("d", i)); err != nil || tw.Presence.Connected {
				t.Errorf("seed %d round %d: d%d after the crash and the grace period: %v, %v; want disconnected", seed, round, i, tw, err)
			}
		}
		if n := e.Stats().ConnectedDevices; n != 0 {
			t.Errorf("seed %d round %d: ConnectedDevices = %d; want 0", seed, round, n)
		}
		e.Close()
		if violations, _ := Check(opts); len(violations) > 0 {
			t.Errorf("seed %d round %d: Check after recovery: %v", seed, round, violations)
		}
	}
}

// TestSnapshotFollowsDurableSteps: with two steps of a worker in flight,
// readers see the store as of the first step once it is published (not the
// second, applied but not durable), and the store itself once both are.
func TestSnapshotFollowsDurableSteps(t *testing.T) {
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	// A worker of its own, not running, so that the test steps it.
	w := &worker{e: e}
	k := []byte("k")
	set := func(v string) {
		if err := e.db.Set(k, []byte(v), pebble.NoSync); err != nil {
			t.Fatal(err)
		}
	}
	seen := func() string {
		if w.snap == nil {
			return "<store>"
		}
		v, closer, err := w.snap.s.Get(k)
		if err != nil {
			t.Fatal(err)
		}
		defer closer.Close()
		return string(v)
	}
	set("durable")
	first := w.beforeApply()
	set("step 1")
	second := w.beforeApply()
	set("step 2")
	if got := seen(); got != "durable" {
		t.Errorf("with steps 1 and 2 in flight, readers see %q; want %q", got, "durable")
	}
	w.afterPublish(first)
	if got := seen(); got != "step 1" {
		t.Errorf("with step 1 published and step 2 in flight, readers see %q; want %q", got, "step 1")
	}
	w.afterPublish(second)
	if got := seen(); got != "<store>" {
		t.Errorf("with nothing in flight, readers see %q; want the store itself", got)
	}
}

// storeRuleStates reads a twin's rule states from the store.
func storeRuleStates(t *testing.T, e *Engine, id string) map[string]RuleState {
	t.Helper()
	it, err := e.db.NewIter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	st, err := readRuleStates(it, e.VShard(id), id)
	if err != nil {
		t.Fatal(err)
	}
	return st
}
