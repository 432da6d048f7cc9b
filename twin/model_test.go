package twin

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

var modelSeed = flag.Uint64("model.seed", 0, "seed of TestEngineModel; 0 picks one (also TWIND_MODEL_SEED)")

// The engine's options in the model test: few workers for many twins, so
// that each worker step holds the ops of many twins; small limits, so that
// pruning and full queues happen.
const (
	modelHistoryLimit = 6
	modelRetention    = 4
	modelQueueLimit   = 5
)

// TestEngineModel runs rounds of random operations against the engine and
// against a simple model of what each should do, and compares the two.
//
// Each twin id has one goroutine that issues its operations in bursts: a
// burst's operations are all handed to the engine before any is waited for,
// so that they share worker steps (a delete among reports, a re-create after
// a delete, a command after a connect). The goroutines of many ids run at
// once on two workers, so that steps batch across twins too. As each id's
// operations are ordered, the model knows each answer exactly, errors
// included, and the state each twin must end in: twins, history, the watch
// log, commands (with those that rules send), rule states, presence and
// what each device stream was told. After each round the engine is closed,
// the store is checked with Check and compared with the model, and the
// engine is reopened a minute later (commands with a short ttl expire,
// devices that were connected are disconnected) and compared again.
//
// The test logs its seed; -model.seed=N or TWIND_MODEL_SEED=N replays it
// (the answers and end states of a seed are the same on every run; only how
// steps batch varies). TWIND_MODEL_OPS=N runs about N operations instead of
// the default 5,760 (-short: 1,920).
func TestEngineModel(t *testing.T) {
	seed := *modelSeed
	if s := os.Getenv("TWIND_MODEL_SEED"); s != "" && seed == 0 {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("TWIND_MODEL_SEED=%q: %v", s, err)
		}
		seed = n
	}
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (replay with -model.seed=%d or TWIND_MODEL_SEED=%d)", seed, seed, seed)
	// Each round, every twin gets opsPerTwin ops: 16 x 60 x 6 = 5,760 ops
	// by default.
	const nIDs, opsPerTwin = 16, 60
	rounds := 6
	if testing.Short() {
		rounds = 2
	}
	if s := os.Getenv("TWIND_MODEL_OPS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("TWIND_MODEL_OPS=%q is not a positive number", s)
		}
		rounds = max(n/(nIDs*opsPerTwin), 1)
	}

	ctx := context.Background()
	fs := vfs.NewMem()
	clock := &modelClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	opts := Options{Dir: "db", FS: fs, Clock: clock.Now, Workers: 2, VShards: 8, HistoryLimit: modelHistoryLimit,
		CommandRetention: modelRetention, CommandQueueLimit: modelQueueLimit, Logger: quietSlog(),
		// A twin cache of a few twins per worker: twins are evicted and
		// read back from the store all the time.
		CacheBytes: 16 << 10,
		// Devices connected when the engine closed are disconnected by
		// the first step after a restart.
		PresenceGrace: time.Nanosecond}
	e, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	e.SetEvaluator(modelRules{})
	defer func() {
		if e != nil {
			e.Close()
		}
	}()
	m := make([]*mTwin, nIDs)
	for i := range m {
		m[i] = &mTwin{id: fmt.Sprintf("d%02d", i), clock: clock}
	}
	var watched int64 // the revision up to which the watch log was compared
	for round := range rounds {
		var wg sync.WaitGroup
		errs := make([]error, nIDs)
		for i, mt := range m {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, uint64(round*nIDs+i)))
				errs[i] = mt.run(ctx, e, rng, opsPerTwin)
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("seed %d round %d: answers differ from the model:\n%v", seed, round, err)
		}
		st := e.Stats()
		t.Logf("round %d: %d changes in %d commits", round, st.Changes, st.Commits)
		if err := compareEngine(e, m); err != nil {
			t.Fatalf("seed %d round %d: the engine differs from the model:\n%v", seed, round, err)
		}
		if err := compareWatch(e, m, watched); err != nil {
			t.Fatalf("seed %d round %d: the watch log differs from the model:\n%v", seed, round, err)
		}
		watched = e.Revision()

		// Restart: what is in the store is what the model says.
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		var problems []string
		for _, w := range e.workers {
			for _, mt := range m {
				if ent := w.cache.m[mt.id]; e.workerFor(mt.id) == w && ent != nil && ent.statesLoaded {
					if got, want := slices.Sorted(maps.Keys(ent.states)), mt.ruleStates(); !slices.Equal(got, want) {
						problems = append(problems, fmt.Sprintf("twin %s: rule states in memory %q; model %q", mt.id, got, want))
					}
				}
			}
		}
		e = nil
		vs, err := Check(opts)
		if err != nil {
			t.Fatal(err)
		}
		// The same without the checker's copy of the log.
		maxCachedLog = 0
		vs2, err := Check(opts)
		maxCachedLog = 1 << 22
		if err != nil || !slices.EqualFunc(vs, vs2, func(a, b Violation) bool { return a.String() == b.String() }) {
			problems = append(problems, fmt.Sprintf("Check without its copy of the log = %q, %v; with it %q", vs2, err, vs))
		}
		for _, v := range vs {
			problems = append(problems, "Check: "+v.String())
		}
		stored, err := storedRuleStates(opts)
		if err != nil {
			t.Fatal(err)
		}
		for _, mt := range m {
			if got, want := stored[mt.id], mt.ruleStates(); !slices.Equal(got, want) {
				problems = append(problems, fmt.Sprintf("twin %s: rule states in the store %q; model %q", mt.id, got, want))
			}
		}
		if len(problems) > 0 {
			t.Fatalf("seed %d round %d: after close:\n%s", seed, round, strings.Join(problems, "\n"))
		}
		for _, mt := range m {
			mt.restart()
		}
		opts.Workers = 1 + int((seed+uint64(round))%3)
		if e, err = Open(opts); err != nil {
			t.Fatal(err)
		}
		e.SetEvaluator(modelRules{})
		// A minute later: commands with a short ttl expire, and devices
		// that were connected are disconnected.
		clock.Advance(time.Minute)
		expired := 0
		for _, mt := range m {
			expired += mt.expire(clock.Now())
		}
		t.Logf("round %d: restarted; %d commands expire", round, expired)
		if err := e.RunTimers(ctx); err != nil {
			t.Fatal(err)
		}
		if err := compareEngine(e, m); err != nil {
			t.Fatalf("seed %d round %d: after a restart, the engine differs from the model:\n%v", seed, round, err)
		}
	}
}

// modelClock is the engine's clock in the model test: it stands still
// during a round, so that the model knows when each command expires, and
// moves on between rounds.
type modelClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *modelClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *modelClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// modelRules is the Evaluator of the model test, three rules:
//
//	r1: RISING reported.x > 5: commands c1 {x} and c2, desired {y: null, z: 1}
//	r2: on connecting: command hello
//	r3: while desired.z == 1 and desired.w != "on": desired {w: "on"}
//
// r1 keeps a rule state while its condition holds.
type modelRules struct{}

func (modelRules) Ticks(string) bool           { return false }
func (modelRules) TickTypes() ([]string, bool) { return nil, false }
func (modelRules) Watches(string) bool         { return true }

func (modelRules) Evaluate(prev, next *Twin, states map[string]RuleState, now time.Time, timer bool) Evaluation {
	var ev Evaluation
	x, _ := next.Reported["x"].(float64)
	_, active := states["r1"]
	switch cond := x > 5; {
	case cond && !active:
		ev.States = map[string]*RuleState{"r1": {Gen: 1, Active: true, Fired: true, LastFired: now}}
		ev.Firings = append(ev.Firings, Firing{RuleID: "r1",
			Commands:       []RuleCommand{{Name: "c1", Params: Document{"x": x}}, {Name: "c2"}},
			DesiredPatches: []Document{{"y": nil, "z": 1.0}}})
	case !cond && active:
		ev.States = map[string]*RuleState{"r1": nil}
	}
	if next.Presence.Connected && (prev == nil || !prev.Presence.Connected) {
		ev.Firings = append(ev.Firings, Firing{RuleID: "r2", Commands: []RuleCommand{{Name: "hello"}}})
	}
	if next.Desired["z"] == 1.0 && next.Desired["w"] != "on" {
		ev.Firings = append(ev.Firings, Firing{RuleID: "r3", DesiredPatches: []Document{{"w": "on"}}})
	}
	return ev
}

// mTwin is the model of one twin id, and of the device streams connected
// to it. Only its goroutine uses it during a round.
type mTwin struct {
	id      string
	exists  bool
	version int64 // also the last version of a deleted twin
	typ     string
	labels  map[string]string
	rep     Document
	des     Document
	tomb    map[string]int64
	acked   int64
	token   []byte
	cmdSeq  int64
	cmds    []*mCmd // retained, by sequence
	r1      bool    // rule r1's state exists
	hist    []mVersion
	// lastSeen is when the device was last seen, as the engine answered
	// it last: the model checks that it survives restarts (a report that
	// changes nothing else writes it apart from the record).
	lastSeen time.Time
	sink     *mSink // the connected stream
	sinks    []*mSink
	trace    []string // the ops and their answers
	clock    *modelClock
	// events are the watch events of the twin since the last round was
	// compared, presence changes aside.
	events []string
}

type mCmd struct {
	seq       int64
	name      string
	state     CommandState
	source    Source
	requestID string
	expires   time.Time
}

type mVersion struct {
	version  int64
	kind     EventKind
	rep, des Document
}

// mSink is a device stream: what the engine told it, and what the model
// says it must have been told.
type mSink struct {
	name string

	mu        sync.Mutex
	welcomes  int
	got       map[string]bool // ids of the commands delivered
	closedErr error
	closes    int
	// desired is the desired state as the device knows it: the welcome's,
	// with every desired update's patch applied; version is the twin
	// version it last heard of.
	desired Document
	version int64
	errs    []string

	// The model's expectations; only the twin's goroutine uses them.
	wantWelcome bool
	want        map[string]bool
	wantClosed  error
	detached    bool // from before a restart: nothing more is expected
}

func (s *mSink) Welcome(t *Twin, cmds []*Command) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.welcomes++
	for _, c := range cmds {
		s.got[c.ID] = true
	}
	s.desired, s.version = t.Desired, t.Version
}

func (s *mSink) DesiredChanged(t *Twin, patch Document) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.welcomes == 0 {
		s.errs = append(s.errs, fmt.Sprintf("desired update at version %d before the welcome", t.Version))
	}
	if t.Version < s.version {
		s.errs = append(s.errs, fmt.Sprintf("desired update at version %d after version %d", t.Version, s.version))
	}
	s.version = t.Version
	s.desired, _ = MergePatch(s.desired, patch)
	if !cmp.Equal(s.desired, t.Desired, cmpopts.EquateEmpty()) {
		s.errs = append(s.errs, fmt.Sprintf("desired updates add up to %v at version %d; the twin has %v", s.desired, t.Version, t.Desired))
	}
}

func (s *mSink) Commands(cmds []*Command) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range cmds {
		s.got[c.ID] = true
	}
}

func (s *mSink) Close(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closedErr = err
	s.closes++
}

// check compares what the sink was told with the model. desired is the
// twin's desired state if the sink is the device's current stream.
func (s *mSink) check(desired Document, current bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	errs := slices.Clone(s.errs)
	if current && !cmp.Equal(s.desired, desired, cmpopts.EquateEmpty()) {
		errs = append(errs, fmt.Sprintf("knows desired %v; the model has %v", s.desired, desired))
	}
	if want := map[bool]int{false: 0, true: 1}[s.wantWelcome]; s.welcomes != want {
		errs = append(errs, fmt.Sprintf("welcomed %d times; want %d", s.welcomes, want))
	}
	if got, want := slices.Sorted(maps.Keys(s.got)), slices.Sorted(maps.Keys(s.want)); !slices.Equal(got, want) {
		errs = append(errs, fmt.Sprintf("was sent commands %q; want %q", got, want))
	}
	switch {
	case s.wantClosed == nil && s.closes > 0:
		errs = append(errs, fmt.Sprintf("was closed (%v); want open", s.closedErr))
	case s.wantClosed != nil && (s.closes != 1 || !errors.Is(s.closedErr, s.wantClosed)):
		errs = append(errs, fmt.Sprintf("was closed %d times, with %v; want once, with %v", s.closes, s.closedErr, s.wantClosed))
	}
	if len(errs) > 0 {
		return fmt.Errorf("stream %s: %s", s.name, strings.Join(errs, "; "))
	}
	return nil
}

// want is the answer the model expects to an op.
type want struct {
	err      error // a sentinel, or nil
	version  int64 // of the twin answered, if not 0
	cmdID    string
	cmdState CommandState
	// connected is the presence of the twin answered, if one is
	connected bool
}

// run issues n random ops for the twin, in bursts, and checks each answer.
func (mt *mTwin) run(ctx context.Context, e *Engine, rng *rand.Rand, n int) error {
	for n > 0 {
		size := min(1+rng.IntN(6), n)
		n -= size
		ops := make([]*op, size)
		wants := make([]want, size)
		for i := range ops {
			ops[i] = mt.randomOp(rng)
		}
		// The model applies each op in order when building the burst
		// and when checking it alike, so build all first: the engine
		// gets the whole burst before it answers any.
		models := make([]string, size)
		for i, o := range ops {
			wants[i] = mt.apply(o)
			wants[i].connected = mt.sink != nil
			models[i] = fmt.Sprintf("v%d cmdseq %d", mt.version, mt.cmdSeq)
			if err := e.start(ctx, o); err != nil {
				return fmt.Errorf("twin %s: start %s: %v", mt.id, describe(o), err)
			}
		}
		mt.trace = append(mt.trace, fmt.Sprintf("-- burst of %d", len(ops)))
		for i, o := range ops {
			r := <-o.done
			mt.trace = append(mt.trace, fmt.Sprintf("%s: %s (model after: %s)", describe(o), answer(r), models[i]))
			if err := checkAnswer(r, wants[i]); err != nil {
				return fmt.Errorf("twin %s: %s: %v\n%s", mt.id, describe(o), err, mt.lastTrace())
			}
			if r.Err == nil && r.Twin != nil {
				mt.lastSeen = r.Twin.Presence.LastSeen
			}
		}
	}
	return nil
}

// lastTrace returns the last ops of the twin and their answers.
func (mt *mTwin) lastTrace() string {
	const n = 40
	tr := mt.trace[max(len(mt.trace)-n, 0):]
	return "  last ops of " + mt.id + ":\n    " + strings.Join(tr, "\n    ")
}

func answer(r Result) string {
	switch {
	case r.Err != nil:
		return r.Err.Error()
	case r.Command != nil:
		return r.Command.ID + " " + r.Command.State.String()
	case r.Twin != nil:
		return fmt.Sprintf("v%d rep %v des %v cmdseq %d", r.Twin.Version, r.Twin.Reported, r.Twin.Desired, r.Twin.CommandSeq)
	}
	return "ok"
}

func checkAnswer(r Result, w want) error {
	switch {
	case w.err != nil:
		if !errors.Is(r.Err, w.err) {
			return fmt.Errorf("answered %v; model %v", r.Err, w.err)
		}
		return nil
	case r.Err != nil:
		return fmt.Errorf("answered %v; model success", r.Err)
	case w.version != 0 && (r.Twin == nil || r.Twin.Version != w.version):
		v := int64(-1)
		if r.Twin != nil {
			v = r.Twin.Version
		}
		return fmt.Errorf("answered version %d; model %d", v, w.version)
	case r.Twin != nil && r.Twin.Presence.Connected != w.connected:
		return fmt.Errorf("answered a twin with connected %v; model %v", r.Twin.Presence.Connected, w.connected)
	case w.cmdID != "" && (r.Command == nil || r.Command.ID != w.cmdID || r.Command.State != w.cmdState):
		return fmt.Errorf("answered command %+v; model %s %s", r.Command, w.cmdID, w.cmdState)
	}
	return nil
}

func describe(o *op) string {
	switch o.kind {
	case opCreate:
		return fmt.Sprintf("create %v %v", o.create.Reported, o.create.Desired)
	case opReport:
		stream := ""
		if o.patch.Stream != nil {
			stream = " from " + o.patch.Stream.(*mSink).name
		}
		return fmt.Sprintf("report %v expect %d ack %d%s", o.patch.Patch, o.patch.ExpectedVersion, o.patch.DesiredAckedVersion, stream)
	case opDesired:
		return fmt.Sprintf("desired %v expect %d", o.patch.Patch, o.patch.ExpectedVersion)
	case opUpdate:
		return fmt.Sprintf("update type %v labels %v remove %v", o.update.Type, o.update.Labels, o.update.RemoveLabels)
	case opDelete:
		return fmt.Sprintf("delete expect %d", o.expect)
	case opToken:
		return fmt.Sprintf("token %x", o.token)
	case opConnect:
		return "connect " + o.sink.(*mSink).name
	case opDisconnect:
		return "disconnect " + o.sink.(*mSink).name
	case opSendCommand:
		return fmt.Sprintf("send command %s request %q", o.cmdReq.Name, o.cmdReq.RequestID)
	case opUpdateCommand:
		return fmt.Sprintf("update command %s to %s", o.cmdUpd.ID, o.cmdUpd.State)
	case opCancelCommand:
		return fmt.Sprintf("cancel command %s", CommandID(o.id, o.seq))
	}
	return fmt.Sprint("op ", o.kind)
}

// randomOp makes a random op for the twin, with a bias towards what
// changes it.
func (mt *mTwin) randomOp(rng *rand.Rand) *op {
	id := mt.id
	o := &op{id: id}
	val := func() any {
		switch rng.IntN(6) {
		case 0:
			return nil
		case 1:
			return "on"
		default:
			return float64(rng.IntN(3))
		}
	}
	patch := func(keys ...string) Document {
		p := Document{}
		for range 1 + rng.IntN(2) {
			p[keys[rng.IntN(len(keys))]] = val()
		}
		return p
	}
	expect := func() int64 {
		if rng.IntN(5) == 0 {
			return mt.version + int64(rng.IntN(2))
		}
		return 0
	}
	pickCmd := func() int64 {
		if len(mt.cmds) == 0 || rng.IntN(6) == 0 {
			return 1 + rng.Int64N(mt.cmdSeq+2)
		}
		return mt.cmds[rng.IntN(len(mt.cmds))].seq
	}
	r := rng.IntN(100)
	if !mt.exists && rng.IntN(2) == 0 {
		r = 0 // mostly create a missing twin, rather than fail on it
	}
	switch {
	case r < 10:
		o.kind = opCreate
		o.create = &CreateRequest{ID: id, Type: []string{"a", "b"}[rng.IntN(2)], Source: SourceAPI}
		if rng.IntN(2) == 0 {
			o.create.Reported = Document{"x": float64(rng.IntN(10)), "y": val()}
		}
		if rng.IntN(2) == 0 {
			o.create.Desired = patch("y", "z", "w")
		}
	case r < 40:
		o.kind = opReport
		p := patch("y", "z", "w")
		if rng.IntN(2) == 0 {
			p["x"] = float64(rng.IntN(10))
		}
		o.patch = &PatchRequest{ID: id, Patch: p, ExpectedVersion: expect(), Source: SourceDevice}
		if rng.IntN(4) == 0 {
			o.patch.DesiredAckedVersion = mt.version
		}
		if rng.IntN(3) == 0 && len(mt.sinks) > 0 {
			// From a stream: the current one, mostly.
			if s := mt.current(); s != nil && rng.IntN(4) != 0 {
				o.patch.Stream = s
			} else {
				o.patch.Stream = mt.sinks[rng.IntN(len(mt.sinks))]
			}
		}
	case r < 52:
		o.kind = opDesired
		o.patch = &PatchRequest{ID: id, Patch: patch("y", "z", "w"), ExpectedVersion: expect(), Source: SourceAPI}
	case r < 56:
		o.kind = opUpdate
		o.update = &UpdateRequest{ID: id, ExpectedVersion: expect(), Source: SourceAPI}
		if rng.IntN(2) == 0 {
			typ := []string{"a", "b"}[rng.IntN(2)]
			o.update.Type = &typ
		}
		if rng.IntN(2) == 0 {
			o.update.Labels = map[string]string{"site": []string{"berlin", "paris"}[rng.IntN(2)]}
		} else {
			o.update.RemoveLabels = []string{"site"}
		}
	case r < 64:
		o.kind = opDelete
		o.expect = expect()
	case r < 66:
		o.kind = opToken
		o.token = []byte{byte(rng.IntN(256))}
	case r < 73:
		o.kind = opConnect
		s := &mSink{name: fmt.Sprintf("%s/s%d", id, len(mt.sinks)), got: map[string]bool{}, want: map[string]bool{}}
		mt.sinks = append(mt.sinks, s)
		o.sink = s
	case r < 78:
		o.kind = opDisconnect
		if mt.sink != nil && rng.IntN(4) != 0 {
			o.sink = mt.sink
		} else if len(mt.sinks) > 0 {
			o.sink = mt.sinks[rng.IntN(len(mt.sinks))]
		} else {
			o.sink = &mSink{name: id + "/never-connected", got: map[string]bool{}, want: map[string]bool{}}
		}
	case r < 88:
		o.kind = opSendCommand
		ttl := []time.Duration{30 * time.Second, time.Hour}[rng.IntN(2)]
		o.cmdReq = &CommandRequest{DeviceID: id, Name: fmt.Sprint("op", rng.IntN(3)), TTL: ttl, Source: SourceAPI}
		if rng.IntN(3) == 0 {
			o.cmdReq.RequestID = fmt.Sprint("req", rng.IntN(3))
		}
	case r < 95:
		o.kind = opUpdateCommand
		states := []CommandState{CommandAccepted, CommandSucceeded, CommandFailed, CommandRejected}
		o.cmdUpd = &CommandUpdate{ID: CommandID(id, pickCmd()), State: states[rng.IntN(len(states))]}
	default:
		o.kind = opCancelCommand
		o.seq = pickCmd()
	}
	return o
}

// apply applies an op to the model and returns the answer it expects.
func (mt *mTwin) apply(o *op) want {
	if !mt.exists && o.kind != opCreate {
		return want{err: ErrNotFound}
	}
	switch o.kind {
	case opCreate:
		if mt.exists {
			return want{err: ErrAlreadyExists}
		}
		mt.exists = true
		mt.version++
		mt.typ, mt.labels = o.create.Type, nil
		mt.rep, _ = MergePatch(nil, o.create.Reported)
		mt.des, _ = MergePatch(nil, o.create.Desired)
		mt.tomb, mt.acked, mt.token, mt.r1, mt.hist = nil, 0, nil, false, nil
		mt.addHistory(KindCreated)
		w := want{version: mt.version}
		mt.runRules(false)
		return w
	case opReport, opDesired:
		p := o.patch
		if p.Stream != nil && p.Stream != mt.current() {
			return want{err: ErrStreamClosed}
		}
		if p.ExpectedVersion != 0 && p.ExpectedVersion != mt.version {
			return want{err: ErrVersionMismatch}
		}
		prevConnected := mt.sink != nil
		if o.kind == opDesired {
			if !mt.patchDesired(p.Patch) {
				return want{version: mt.version}
			}
			mt.addHistory(KindDesired)
		} else {
			next, changed := MergePatch(mt.rep, p.Patch)
			ack := p.DesiredAckedVersion > mt.acked
			if !changed && !ack {
				return want{version: mt.version}
			}
			mt.rep = next
			if ack {
				mt.acked = max(min(p.DesiredAckedVersion, mt.version), mt.acked)
				for k, v := range mt.tomb {
					if v <= mt.acked {
						delete(mt.tomb, k)
					}
				}
			}
			mt.version++
			mt.addHistory(KindReported)
		}
		w := want{version: mt.version}
		mt.runRules(prevConnected)
		return w
	case opUpdate:
		u := o.update
		if u.ExpectedVersion != 0 && u.ExpectedVersion != mt.version {
			return want{err: ErrVersionMismatch}
		}
		typ := mt.typ
		if u.Type != nil {
			typ = *u.Type
		}
		labels := cloneLabels(mt.labels, u.Labels, u.RemoveLabels)
		if typ == mt.typ && maps.Equal(labels, mt.labels) {
			return want{version: mt.version}
		}
		mt.typ, mt.labels = typ, labels
		mt.version++
		mt.addHistory(KindUpdated)
		w := want{version: mt.version}
		mt.runRules(mt.sink != nil)
		return w
	case opDelete:
		if o.expect != 0 && o.expect != mt.version {
			return want{err: ErrVersionMismatch}
		}
		mt.events = append(mt.events, fmt.Sprintf("v%d %s rep %v des %v", mt.version, KindDeleted, docOrEmpty(mt.rep), docOrEmpty(mt.des)))
		mt.exists, mt.cmds, mt.r1, mt.hist = false, nil, false, nil
		if mt.sink != nil {
			mt.sink.wantClosed = ErrNotFound
			mt.sink = nil
		}
		return want{}
	case opToken:
		// The stream that authenticated with the old token ends: the
		// device is no longer connected.
		mt.token = o.token
		if mt.sink != nil {
			mt.sink.wantClosed = ErrTokenRevoked
			mt.sink = nil
			mt.runRules(true)
		}
		return want{version: mt.version}
	case opConnect:
		s := o.sink.(*mSink)
		if mt.sink != nil {
			mt.sink.wantClosed = ErrReplaced
		}
		prevConnected := mt.sink != nil
		mt.sink = s
		s.wantWelcome = true
		for _, c := range mt.cmds {
			if !c.state.Final() {
				if c.state == CommandQueued {
					c.state = CommandSent
				}
				s.want[CommandID(mt.id, c.seq)] = true
			}
		}
		mt.runRules(prevConnected)
		return want{version: mt.version}
	case opDisconnect:
		if o.sink.(*mSink) != mt.sink {
			return want{version: mt.version}
		}
		mt.sink = nil
		mt.runRules(true)
		return want{version: mt.version}
	case opSendCommand:
		c, err := mt.sendCommand(o.cmdReq.Name, o.cmdReq.RequestID, SourceAPI, o.cmdReq.TTL)
		if err != nil {
			return want{err: err}
		}
		return want{cmdID: CommandID(mt.id, c.seq), cmdState: c.state}
	case opUpdateCommand:
		_, seq, _ := ParseCommandID(o.cmdUpd.ID)
		c := mt.findCmd(seq)
		switch {
		case c == nil:
			return want{err: ErrNotFound}
		case c.state == CommandAccepted && o.cmdUpd.State == CommandAccepted:
			return want{cmdID: o.cmdUpd.ID, cmdState: c.state}
		case !validTransition(c.state, o.cmdUpd.State):
			return want{err: ErrVersionMismatch}
		}
		c.state = o.cmdUpd.State
		mt.pruneCmds()
		return want{cmdID: o.cmdUpd.ID, cmdState: c.state}
	case opCancelCommand:
		c := mt.findCmd(o.seq)
		switch {
		case c == nil:
			return want{err: ErrNotFound}
		case c.state.Final():
			return want{err: ErrFinished}
		}
		c.state = CommandCanceled
		if mt.sink != nil {
			mt.sink.want[CommandID(mt.id, c.seq)] = true
		}
		mt.pruneCmds()
		return want{cmdID: CommandID(mt.id, o.seq), cmdState: CommandCanceled}
	}
	panic(fmt.Sprint("model: unknown op ", o.kind))
}

// patchDesired merges a flat patch into desired and reports whether it
// changed anything, which bumps the version.
func (mt *mTwin) patchDesired(p Document) bool {
	next, changed := MergePatch(mt.des, p)
	if !changed {
		return false
	}
	mt.version++
	for k, v := range p {
		_, had := mt.des[k]
		switch {
		case v == nil && had:
			if mt.tomb == nil {
				mt.tomb = map[string]int64{}
			}
			mt.tomb["/"+k] = mt.version
		case v != nil:
			delete(mt.tomb, "/"+k)
		}
	}
	mt.des = next
	return true
}

// runRules applies what modelRules do after a change of the twin, as the
// engine must: commands join the queue, desired patches are further changes,
// until the rules change nothing more.
func (mt *mTwin) runRules(prevConnected bool) {
	for depth := 0; ; depth++ {
		var patch Document
		x, _ := mt.rep["x"].(float64)
		var cmds []string
		switch cond := x > 5; {
		case cond && !mt.r1:
			mt.r1 = true
			cmds = append(cmds, "c1", "c2")
			patch = Document{"y": nil, "z": 1.0}
		case !cond && mt.r1:
			mt.r1 = false
		}
		if mt.sink != nil && !prevConnected {
			cmds = append(cmds, "hello")
		}
		if mt.des["z"] == 1.0 && mt.des["w"] != "on" {
			if patch == nil {
				patch = Document{}
			}
			patch["w"] = "on"
		}
		for _, name := range cmds {
			mt.sendCommand(name, "", "rule", time.Hour) // a full queue fails the firing, not the change
		}
		if patch == nil || depth == maxRuleDepth {
			return
		}
		if !mt.patchDesired(patch) {
			return
		}
		mt.addHistory(KindDesired)
		prevConnected = mt.sink != nil
	}
}

func (mt *mTwin) sendCommand(name, requestID string, source Source, ttl time.Duration) (*mCmd, error) {
	if requestID != "" {
		for _, c := range mt.cmds {
			switch {
			case c.requestID != requestID:
			case c.name != name:
				return nil, ErrAlreadyExists // another command's request id
			default:
				return c, nil
			}
		}
	}
	open := 0
	for _, c := range mt.cmds {
		if !c.state.Final() {
			open++
		}
	}
	if open >= modelQueueLimit {
		return nil, ErrOverloaded
	}
	mt.cmdSeq++
	c := &mCmd{seq: mt.cmdSeq, name: name, state: CommandQueued, source: source, requestID: requestID,
		expires: mt.clock.Now().Add(ttl)}
	if mt.sink != nil {
		c.state = CommandSent
		mt.sink.want[CommandID(mt.id, c.seq)] = true
	}
	mt.cmds = append(mt.cmds, c)
	return c, nil
}

func (mt *mTwin) findCmd(seq int64) *mCmd {
	for _, c := range mt.cmds {
		if c.seq == seq {
			return c
		}
	}
	return nil
}

// pruneCmds drops the oldest finished commands beyond the retention.
func (mt *mTwin) pruneCmds() {
	final := 0
	for _, c := range mt.cmds {
		if c.state.Final() {
			final++
		}
	}
	mt.cmds = slices.DeleteFunc(mt.cmds, func(c *mCmd) bool {
		if final > modelRetention && c.state.Final() {
			final--
			return true
		}
		return false
	})
}

func (mt *mTwin) addHistory(kind EventKind) {
	mt.events = append(mt.events, fmt.Sprintf("v%d %s rep %v des %v", mt.version, kind, docOrEmpty(mt.rep), docOrEmpty(mt.des)))
	mt.hist = append(mt.hist, mVersion{version: mt.version, kind: kind, rep: mt.rep, des: mt.des})
	if len(mt.hist) > modelHistoryLimit {
		mt.hist = mt.hist[1:]
	}
}

// current returns the device's current stream, if any.
func (mt *mTwin) current() Sink {
	if mt.sink == nil {
		return nil
	}
	return mt.sink
}

// ruleStates returns the ids of the rules with a state for the twin.
func (mt *mTwin) ruleStates() []string {
	if mt.r1 {
		return []string{"r1"}
	}
	return nil
}

// delta is the delta of the model's flat documents.
func (mt *mTwin) delta() Document {
	d := Document{}
	for k, v := range mt.des {
		if r, ok := mt.rep[k]; !ok || r != v {
			d[k] = v
		}
	}
	for p := range mt.tomb {
		if _, ok := d[p[1:]]; !ok {
			d[p[1:]] = nil
		}
	}
	return d
}

// expire expires the open commands whose ttl has passed by now.
func (mt *mTwin) expire(now time.Time) int {
	n := 0
	for _, c := range mt.cmds {
		if !c.state.Final() && !c.expires.After(now) {
			c.state = CommandExpired
			n++
		}
	}
	mt.pruneCmds()
	return n
}

// restart is what a restart does to the model: no device is connected.
func (mt *mTwin) restart() {
	mt.sink = nil
	for _, s := range mt.sinks {
		s.detached = true
	}
}

// compareEngine compares what the engine answers with the model.
func compareEngine(e *Engine, m []*mTwin) error {
	var all []error
	opt := cmpopts.EquateEmpty()
	for _, mt := range m {
		var errs []error
		for _, s := range mt.sinks {
			if !s.detached {
				if err := s.check(mt.des, s == mt.sink); err != nil {
					errs = append(errs, err)
				}
			}
		}
		errs = append(errs, compareTwin(e, mt, opt)...)
		if len(errs) > 0 {
			all = append(all, fmt.Errorf("%w\n%s", errors.Join(errs...), mt.lastTrace()))
		}
	}
	var gotIDs, wantIDs []string
	if _, err := e.List(context.Background(), "", func(tw *Twin) bool {
		gotIDs = append(gotIDs, tw.ID)
		return true
	}); err != nil {
		all = append(all, fmt.Errorf("List: %v", err))
	}
	for _, mt := range m {
		if mt.exists {
			wantIDs = append(wantIDs, mt.id)
		}
	}
	if !slices.Equal(gotIDs, wantIDs) {
		all = append(all, fmt.Errorf("List = %q; model %q", gotIDs, wantIDs))
	}
	return errors.Join(all...)
}

// compareTwin compares one twin of the engine with the model.
func compareTwin(e *Engine, mt *mTwin, opt cmp.Option) []error {
	var errs []error
	{
		tw, err := e.Get(mt.id)
		if !mt.exists {
			if !errors.Is(err, ErrNotFound) {
				errs = append(errs, fmt.Errorf("twin %s: Get = %v; the model has it deleted", mt.id, err))
			}
			return errs
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("twin %s: Get: %v", mt.id, err))
			return errs
		}
		type view struct {
			Version             int64
			Type                string
			Labels              map[string]string
			Reported, Desired   Document
			Delta               Document
			Connected           bool
			TokenHash           []byte
			CommandSeq          int64
			DesiredAckedVersion int64
			LastSeen            time.Time
		}
		got := view{tw.Version, tw.Type, tw.Labels, tw.Reported, tw.Desired, tw.Delta, tw.Presence.Connected, tw.TokenHash, tw.CommandSeq, tw.DesiredAckedVersion, tw.Presence.LastSeen}
		want := view{mt.version, mt.typ, mt.labels, mt.rep, mt.des, mt.delta(), mt.sink != nil, mt.token, mt.cmdSeq, mt.acked, mt.lastSeen}
		if diff := cmp.Diff(want, got, opt); diff != "" {
			errs = append(errs, fmt.Errorf("twin %s (-model +engine):\n%s", mt.id, diff))
		}

		evs, err := e.History(mt.id, 0, 100)
		if err != nil {
			errs = append(errs, fmt.Errorf("twin %s: History: %v", mt.id, err))
		}
		var gotHist, wantHist []string
		for _, ev := range evs {
			gotHist = append(gotHist, fmt.Sprintf("v%d %s rep %v des %v", ev.Twin.Version, ev.Kind, ev.Twin.Reported, ev.Twin.Desired))
		}
		for i := len(mt.hist) - 1; i >= 0; i-- {
			h := mt.hist[i]
			rep, des := h.rep, h.des
			if rep == nil {
				rep = Document{}
			}
			if des == nil {
				des = Document{}
			}
			wantHist = append(wantHist, fmt.Sprintf("v%d %s rep %v des %v", h.version, h.kind, rep, des))
		}
		if diff := cmp.Diff(wantHist, gotHist, opt); diff != "" {
			errs = append(errs, fmt.Errorf("twin %s: history, newest first (-model +engine):\n%s", mt.id, diff))
		}

		cmds, _, err := e.ListCommands(mt.id, nil, 0, 1000)
		if err != nil {
			errs = append(errs, fmt.Errorf("twin %s: ListCommands: %v", mt.id, err))
		}
		var gotCmds, wantCmds []string
		for _, c := range cmds {
			gotCmds = append(gotCmds, fmt.Sprintf("%s %s %s %s %q", c.ID, c.Name, c.State, c.Source, c.RequestID))
		}
		for _, c := range mt.cmds {
			source := c.source
			if source == "rule" {
				source = RuleSource(map[string]string{"c1": "r1", "c2": "r1", "hello": "r2"}[c.name])
			}
			wantCmds = append(wantCmds, fmt.Sprintf("%s %s %s %s %q", CommandID(mt.id, c.seq), c.name, c.state, source, c.requestID))
		}
		if diff := cmp.Diff(wantCmds, gotCmds, opt); diff != "" {
			errs = append(errs, fmt.Errorf("twin %s: commands (-model +engine):\n%s", mt.id, diff))
		}
	}
	return errs
}

// compareWatch compares the watch log's events after revision from with
// the events the model expects of each twin, presence changes aside, and
// forgets those.
func compareWatch(e *Engine, m []*mTwin, from int64) error {
	upto := e.Revision()
	got := map[string][]string{}
	if upto > from {
		errDone := errors.New("done")
		err := e.Watch(context.Background(), from+1, func(ev *Event) error {
			if ev.Kind != KindPresence {
				got[ev.Twin.ID] = append(got[ev.Twin.ID], fmt.Sprintf("v%d %s rep %v des %v", ev.Twin.Version, ev.Kind, ev.Twin.Reported, ev.Twin.Desired))
			}
			if ev.Revision >= upto {
				return errDone
			}
			return nil
		})
		if !errors.Is(err, errDone) {
			return fmt.Errorf("Watch from %d: %v", from+1, err)
		}
	}
	var errs []error
	for _, mt := range m {
		if diff := cmp.Diff(mt.events, got[mt.id], cmpopts.EquateEmpty()); diff != "" {
			errs = append(errs, fmt.Errorf("twin %s: events after revision %d (-model +engine):\n%s\n%s", mt.id, from, diff, mt.lastTrace()))
		}
		mt.events = nil
	}
	return errors.Join(errs...)
}

func docOrEmpty(d Document) Document {
	if d == nil {
		return Document{}
	}
	return d
}

// quietSlog logs only warnings and errors.
func quietSlog() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// storedRuleStates reads the rule states in a closed store, as rule ids
// by twin id.
func storedRuleStates(opts Options) (map[string][]string, error) {
	db, err := pebble.Open(opts.Dir, &pebble.Options{FS: opts.FS, ReadOnly: true, Logger: pebbleLogger{quietSlog()}})
	if err != nil {
		return nil, err
	}
	defer db.Close()
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: prefixShards, UpperBound: prefixEnd(prefixShards)})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	out := map[string][]string{}
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		if len(k) < 7 || k[5] != 'x' {
			continue
		}
		id, rule, ok := bytes.Cut(k[7:], []byte{0})
		if !ok {
			return nil, fmt.Errorf("rule state key %q", k)
		}
		if _, err := decodeRuleState(it.Value()); err != nil {
			return nil, err
		}
		out[string(id)] = append(out[string(id)], string(rule))
	}
	for _, rules := range out {
		sort.Strings(rules)
	}
	return out, it.Error()
}
