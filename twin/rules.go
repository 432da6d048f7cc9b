package twin

import (
	"bytes"
	"container/heap"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// Evaluator decides what rules do when a twin changes. The rules package
// implements it; the engine calls it from its workers, inside the change, so
// that every effect of a firing commits in the same batch as the change
// that caused it. Implementations must be safe for concurrent use and must
// not block.
type Evaluator interface {
	// Evaluate evaluates the rules that apply to next, given prev (the twin
	// before the change; nil for a new twin) and the twin's rule states.
	// timer is true when the engine calls because of a wake-up time the
	// evaluator asked for, or a periodic tick, rather than a change. It
	// returns the states that changed (a nil state deletes it), what fired,
	// and the earliest time it wants to be called again for this twin
	// without a change (zero for never).
	Evaluate(prev, next *Twin, states map[string]RuleState, now time.Time, timer bool) Evaluation
	// Ticks reports whether rules of a device type read `now`, so that
	// their twins must be re-evaluated periodically.
	Ticks(typ string) bool
	// TickTypes returns the device types with rules that read `now`, or
	// all: a rule for every type does. A periodic tick walks the twins of
	// these types only, and with none there is no tick at all.
	TickTypes() (types []string, all bool)
	// Watches reports whether any rule watches twins of a device type.
	// The rule states of a twin whose type no rule watches are not read:
	// no rule would use them.
	Watches(typ string) bool
}

// Evaluation is the outcome of evaluating the rules of one change.
type Evaluation struct {
	States  map[string]*RuleState
	Firings []Firing
	Wake    time.Time
	// Cost is the CEL cost the evaluation spent. A worker step stops
	// evaluating timed rules once its steps' costs pass a budget, and
	// carries on with them in its next step, so that rules never stall the
	// changes waiting behind them.
	Cost uint64
}

// RuleState is a twin's state for one rule. It is stored with the twin, in
// the same batch as the change that set it, so that hold_for and cooldown
// survive restarts.
type RuleState struct {
	// Gen is the generation of the rule the state belongs to; a state of
	// an older generation is void.
	Gen int64 `json:"g"`
	// Active says the condition held at the last evaluation.
	Active bool `json:"a,omitempty"`
	// PendingSince is when the condition started to hold, while hold_for
	// runs.
	PendingSince time.Time `json:"p,omitzero"`
	// Fired says the rule fired in the current active period.
	Fired bool `json:"f,omitempty"`
	// LastFired is when the rule last fired for the twin.
	LastFired time.Time `json:"l,omitzero"`
}

// Firing is what one rule does for one change, or the error it hit.
type Firing struct {
	RuleID string
	// DesiredPatches are merged in turn into desired, after the patches
	// of the rules that fired before this one, as one change of its own
	// with the next version, in the same batch.
	DesiredPatches []Document
	Commands       []RuleCommand
	Emits          []Emit
	// Err is an evaluation error: nothing else is set.
	Err error
}

// RuleCommand is a command a firing sends to the twin's device.
type RuleCommand struct {
	Name   string
	Params Document
}

// Emit is an event a firing emits.
type Emit struct {
	Severity int
	Message  string
}

// FiringEvent is a firing as published after its commit.
type FiringEvent struct {
	Firing
	TwinID      string
	TwinVersion int64
	Time        time.Time
}

// maxRuleDepth bounds how many times rules may change a twin's desired state
// in a row because of their own changes: a rule that re-fires itself forever
// stops there, with an error.
const maxRuleDepth = 8

// ErrRuleLoop is recorded for a rule whose effects keep re-firing rules.
var ErrRuleLoop = fmt.Errorf("twin: rules changed desired state %d times in a row for one change; stopped", maxRuleDepth)

// SetEvaluator installs the rules evaluated from now on. It takes effect
// atomically: each worker step uses one evaluator throughout.
func (e *Engine) SetEvaluator(ev Evaluator) {
	e.evaluator.Store(&evaluatorBox{ev})
	// A worker asleep with no timed work must start ticking now, not at
	// its next request: after a restart, an idle fleet is exactly when a
	// rule such as "no report for 10 minutes" must fire.
	for _, w := range e.workers {
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
}

type evaluatorBox struct{ Evaluator }

func (e *Engine) currentEvaluator() Evaluator {
	if b := e.evaluator.Load(); b != nil {
		return b.Evaluator
	}
	return nil
}

// runRules evaluates the rules on a change and folds their effects into it:
// state writes and commands in c, desired patches as further changes of the
// same twin, which it returns.
//
// The set_desired patches of all the rules that fire on one change are
// applied in rule order to the twin's desired state, as one change. When
// that change makes rules fire again, they are evaluated on it in turn, at
// most maxRuleDepth times: the round after the last one applies nothing, and
// each of its firings is recorded as an ErrRuleLoop error of its rule.
func (w *worker) runRules(ev Evaluator, c *change, now time.Time, timer bool) []*change {
	var extra []*change
	for depth := 0; ; depth++ {
		if c.next == nil {
			return extra
		}
		id := c.next.ID
		if !ev.Watches(c.next.Type) {
			return extra // no rule for the type: nothing to evaluate
		}
		ent, err := w.withStates(id)
		if err != nil {
			w.e.fail(err)
			return extra
		}
		res := ev.Evaluate(c.prev, c.next, ent.states, now, timer)
		timer = false
		w.stepCost += res.Cost
		if len(res.States) > 0 {
			st := maps.Clone(ent.states)
			if st == nil {
				st = map[string]RuleState{}
			}
			for r, s := range res.States {
				if s == nil {
					delete(st, r)
				} else {
					st[r] = *s
				}
				if c.ruleWrites == nil {
					c.ruleWrites = map[string]*RuleState{}
				}
				c.ruleWrites[r] = s
			}
			if len(st) == 0 {
				st = nil
			}
			ent.states = st
			w.touch(ent)
		}
		if !res.Wake.IsZero() {
			w.wakeRules(id, res.Wake)
		}
		if depth == maxRuleDepth {
			// The rules keep changing desired state in response to their
			// own changes: nothing of this round applies.
			for _, f := range res.Firings {
				if f.Err == nil {
					f = Firing{RuleID: f.RuleID, Err: ErrRuleLoop}
				}
				c.firings = append(c.firings, f)
			}
			return extra
		}
		desired := c.next.Desired
		var source Source
		var patched []int // the firings in c.firings whose patch is in desired
		for _, f := range res.Firings {
			if f.Err == nil && len(f.DesiredPatches) > 0 {
				patched = append(patched, len(c.firings))
			}
			c.firings = append(c.firings, f)
			if f.Err != nil {
				continue
			}
			for _, cmd := range f.Commands {
				next, err := w.sendCommand(c, c.next, &CommandRequest{DeviceID: id, Name: cmd.Name, Params: cmd.Params,
					TTL: w.e.opts.DefaultCommandTTL, Source: RuleSource(f.RuleID)}, now)
				if err != nil {
					c.firings = append(c.firings, Firing{RuleID: f.RuleID, Err: fmt.Errorf("command %s: %w", cmd.Name, err)})
					continue
				}
				w.setWorking(c, next)
			}
			if len(f.DesiredPatches) > 0 {
				// Applied in turn, so that one rule's null removes what
				// another's patch or the twin has.
				for _, p := range f.DesiredPatches {
					desired, _ = MergePatch(desired, p)
				}
				if source == "" {
					source = RuleSource(f.RuleID)
				}
			}
		}
		if source == "" {
			return extra
		}
		patch := DiffPatch(c.next.Desired, desired)
		if len(patch) == 0 {
			return extra // the patches changed nothing
		}
		o := &op{kind: opDesired, id: id, patch: &PatchRequest{ID: id, Patch: patch, Source: source}, done: make(chan Result, 1)}
		nc, err := w.apply(o, now)
		if err != nil {
			// The patches did not apply (over a limit, say): each firing
			// that made one is an error of its rule, not a firing.
			for _, i := range patched {
				c.firings[i] = Firing{RuleID: c.firings[i].RuleID, Err: fmt.Errorf("set_desired: %w", err)}
			}
			return extra
		}
		if nc.next == nc.prev {
			return extra // the patch changed nothing
		}
		extra = append(extra, nc)
		c = nc
	}
}

// setWorking replaces the twin a change produced, before the change is
// written.
func (w *worker) setWorking(c *change, next *Twin) {
	if c.event != nil && c.event.Twin == c.next {
		c.event.Twin = next
	}
	c.next = next
	ent := w.cached(next.ID) // cached: the change read it
	ent.work = next
	w.touch(ent)
}

// withStates returns a twin's entry with its rule states read.
func (w *worker) withStates(id string) (*entry, error) {
	ent, err := w.entry(id)
	if err != nil || ent.statesLoaded {
		return ent, err
	}
	it, err := w.e.db.NewIter(nil)
	if err != nil {
		return nil, err
	}
	states, err := readRuleStates(it, w.e.VShard(id), id)
	if err := errors.Join(err, it.Close()); err != nil {
		return nil, err
	}
	ent.states, ent.statesLoaded = states, true
	return ent, nil
}

// hasPending reports whether a twin's rule states wait for a hold_for to
// run out: the twin's pending mark (pendingKey) says so in the store, so
// that a restart knows to evaluate it again without reading every twin.
func hasPending(states map[string]RuleState) bool {
	for _, s := range states {
		if !s.PendingSince.IsZero() {
			return true
		}
	}
	return false
}

// ruleTimer asks for a twin's rules to be evaluated at a time.
type ruleTimer struct {
	at time.Time
	id string
}

type ruleTimerHeap []ruleTimer

func (h ruleTimerHeap) Len() int           { return len(h) }
func (h ruleTimerHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h ruleTimerHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *ruleTimerHeap) Push(x any)        { *h = append(*h, x.(ruleTimer)) }
func (h *ruleTimerHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// timedRules evaluates the rules of the twins whose wake-up time has come,
// and, a chunk per step, of every twin whose type has time-dependent rules
// (the periodic tick's scan, tickScan). Once the step has spent its CEL
// budget, the twins left over are due again at once and wait for the next
// step, behind the requests that arrived meanwhile.
func (w *worker) timedRules(ev Evaluator, now time.Time, tick bool) []*change {
	// What the last step left over goes first.
	due := w.timedBacklog
	w.timedBacklog = nil
	for w.ruleTimers.Len() > 0 && !w.ruleTimers[0].at.After(now) {
		t := heap.Pop(&w.ruleTimers).(ruleTimer)
		if at, ok := w.ruleWake[t.id]; !ok || !at.Equal(t.at) {
			continue // superseded by an earlier wake-up, which ran
		}
		delete(w.ruleWake, t.id)
		due = append(due, t.id)
	}
	if types, all := ev.TickTypes(); tick && w.scan == nil && (all || len(types) > 0) {
		// A scan still running from the last tick goes on instead: the
		// twins it has yet to reach are evaluated once, not twice.
		w.scan = &tickScan{start: now}
		for _, n := range w.counts {
			w.scan.total += n
		}
	}
	if w.scan != nil {
		if n := w.scan.quota(now, w.e.opts.RuleTick); n > 0 {
			ids, err := w.scanTick(ev, n)
			if err != nil {
				w.e.fail(fmt.Errorf("rule tick: %w", err))
				return nil
			}
			due = append(due, ids...)
		}
	}
	if err := w.fetch(slices.Clone(due)); err != nil {
		w.e.fail(fmt.Errorf("rule tick: %w", err))
		return nil
	}
	var out []*change
	for i, id := range due {
		if w.stepCost >= w.e.opts.StepCostBudget {
			w.timedBacklog = due[i:]
			break
		}
		cur := w.current(id)
		if cur == nil {
			continue
		}
		o := &op{kind: opRuleTimer, id: id, done: make(chan Result, 1)}
		c := &change{op: o, prev: cur, next: cur, sink: w.sinks[id]}
		extra := w.runRules(ev, c, now, true)
		if c.ruleWrites == nil && len(c.writeCmds) == 0 && len(c.firings) == 0 && len(extra) == 0 && c.next == cur {
			continue // nothing happened
		}
		out = append(out, c)
		out = append(out, extra...)
	}
	return out
}

// tickChunk bounds how many twins one step walks of a tick's scan, so that
// a tick over a large fleet is spread over many short steps, with the
// requests that arrive meanwhile in between.
const tickChunk = 256

// tickScan is a periodic tick's walk over the worker's twins of the types
// whose rules read `now`, through the index of twins by type, shard by
// shard and in key order. It is paced to end by three quarters of the tick
// interval, a chunk at a time, rather than at once: the cost of a tick over
// a million twins is spread over the interval instead of stalling the
// worker's requests, and twins of other types cost nothing.
type tickScan struct {
	// shard is where the walk is (an index into the worker's shards),
	// and after the last twin id it walked there.
	shard int
	after []byte
	start time.Time
	// walked counts the twins walked; total is how many the worker had
	// when the tick began, all types.
	walked, total int64
}

// quota returns how many twins the scan may walk now to keep its pace.
func (s *tickScan) quota(now time.Time, interval time.Duration) int {
	span := interval * 3 / 4
	elapsed := now.Sub(s.start)
	if elapsed >= span || s.walked >= s.total {
		// Behind, or past the fleet's size at the tick (twins created
		// since, ahead of the scan): as fast as steps allow. next says
		// such a scan is due at once, so a quota of 0 here would spin.
		return tickChunk
	}
	target := int64(float64(s.total)*float64(elapsed)/float64(span)) + tickChunk
	return int(min(max(target-s.walked, 0), tickChunk))
}

// next returns when the scan's next chunk is due.
func (s *tickScan) next(interval time.Duration) time.Time {
	if s.total == 0 || s.walked >= s.total {
		return s.start
	}
	span := interval * 3 / 4
	return s.start.Add(time.Duration(float64(span) * float64(s.walked) / float64(s.total)))
}

// scanTick walks up to n more twins of the tick's scan, whose types have
// rules that read now, and returns their ids. Within a virtual shard it
// merges the ranges of the ticking types in id order and goes on after the
// last id it walked, so that a twin whose type changes from one ticking
// type to another while the scan is under way keeps its place: it is
// walked once, neither twice nor not at all. It reads only index keys: no
// twin is decoded to learn its type.
func (w *worker) scanTick(ev Evaluator, n int) ([]string, error) {
	types, all := ev.TickTypes()
	shards := w.shards()
	var ids []string
	for w.scan.shard < len(shards) && len(ids) < n {
		got, done, err := w.scanShard(shards[w.scan.shard], types, all, n-len(ids))
		if err != nil {
			return nil, err
		}
		ids = append(ids, got...)
		switch {
		case done:
			w.scan.shard, w.scan.after = w.scan.shard+1, nil
		case len(got) > 0:
			w.scan.after = []byte(got[len(got)-1])
		}
	}
	w.scan.walked += int64(len(ids))
	if w.scan.shard == len(shards) {
		w.scan = nil
	}
	return ids, nil
}

// scanShard returns up to n ids, in order, after w.scan.after, of the twins
// of virtual shard vs whose types are types (all: any), from the index of
// twins by type, and whether it reached the shard's end.
func (w *worker) scanShard(vs uint16, types []string, all bool, n int) (ids []string, done bool, err error) {
	db := w.e.db
	if all {
		if types, err = indexedTypes(db, vs); err != nil {
			return nil, false, err
		}
	}
	type cursor struct {
		it   *pebble.Iterator
		head int // the length of the key before the id
		ok   bool
	}
	cs := make([]cursor, 0, len(types))
	defer func() {
		for _, c := range cs {
			err = errors.Join(err, c.it.Error(), c.it.Close())
		}
	}()
	for _, typ := range types {
		p := typeIndexPrefix(vs, typ)
		it, err := db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
		if err != nil {
			return nil, false, err
		}
		c := cursor{it: it, head: len(p)}
		if w.scan.after == nil {
			c.ok = it.First()
		} else {
			c.ok = it.SeekGE(append(append(p[:len(p):len(p)], w.scan.after...), 0))
		}
		cs = append(cs, c)
	}
	id := func(c cursor) []byte { return c.it.Key()[c.head:] }
	for len(ids) < n {
		best := -1
		for i, c := range cs {
			if c.ok && (best < 0 || bytes.Compare(id(c), id(cs[best])) < 0) {
				best = i
			}
		}
		if best < 0 {
			return ids, true, nil
		}
		next := string(id(cs[best]))
		ids = append(ids, next)
		for i := range cs {
			for cs[i].ok && string(id(cs[i])) == next {
				cs[i].ok = cs[i].it.Next()
			}
		}
	}
	return ids, false, nil
}

// indexedTypes returns the types of the twins of virtual shard vs, as its
// index of twins by type holds them, in order: one seek per type.
func indexedTypes(db *pebble.DB, vs uint16) (types []string, err error) {
	p := shardPrefix(vs, sectionTypeIndex)
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
	if err != nil {
		return nil, err
	}
	for ok := it.First(); ok; {
		rest := it.Key()[len(p):]
		i := bytes.IndexByte(rest, 0)
		if i < 0 {
			ok = it.Next() // not an index entry (Check reports it)
			continue
		}
		types = append(types, string(rest[:i]))
		// Past every entry of this type: type\x00id < type\x01.
		ok = it.SeekGE(append(append(p[:len(p):len(p)], rest[:i]...), 1))
	}
	return types, errors.Join(it.Error(), it.Close())
}

// shards returns the virtual shards the worker serves.
func (w *worker) shards() []uint16 {
	var out []uint16
	for vs := w.index; vs < w.e.vshards; vs += len(w.e.workers) {
		out = append(out, uint16(vs))
	}
	return out
}

// wakeRules asks for a twin's rules to be evaluated again at a time. A twin
// has at most one wake-up pending, the earliest asked for: evaluating it
// asks again for whatever is still due.
func (w *worker) wakeRules(id string, at time.Time) {
	if cur, ok := w.ruleWake[id]; ok && !at.Before(cur) {
		return
	}
	w.ruleWake[id] = at
	heap.Push(&w.ruleTimers, ruleTimer{at: at, id: id})
}

func ruleStateKey(vs uint16, id, ruleID string) []byte {
	return append(append(append(shardPrefix(vs, 'x'), id...), 0), ruleID...)
}

func ruleStatePrefix(vs uint16, id string) []byte {
	return append(append(shardPrefix(vs, 'x'), id...), 0)
}

// writeRuleStates adds a change's rule state writes to b.
func writeRuleStates(b writer, vs uint16, id string, writes map[string]*RuleState) error {
	for r, s := range writes {
		k := ruleStateKey(vs, id, r)
		if s == nil {
			if err := b.Delete(k, nil); err != nil {
				return err
			}
			continue
		}
		v, err := encodeRuleState(s)
		if err != nil {
			return err
		}
		if err := b.Set(k, v, nil); err != nil {
			return err
		}
	}
	return nil
}

// loadPending notes a twin marked as waiting for a hold_for to run out: it
// is evaluated again at once, since hold_for may have run out while the
// process was down.
func (e *Engine) loadPending(id, _ []byte) error {
	w := e.workerFor(string(id))
	w.wakeRules(string(id), e.opts.Clock())
	return nil
}

// Rule definitions are stored as opaque blobs under r/<id>; the rules
// package owns their format.
var prefixRules = []byte("r/")

// PutRule durably stores a rule definition.
func (e *Engine) PutRule(id string, def []byte) error {
	if err := e.err(); err != nil {
		return err
	}
	b := e.db.NewBatch()
	if err := b.Set(append(append([]byte(nil), prefixRules...), id...), def, nil); err != nil {
		b.Close()
		return err
	}
	return e.commitDirect(b)
}

// DeleteRule durably deletes a rule definition.
func (e *Engine) DeleteRule(id string) error {
	if err := e.err(); err != nil {
		return err
	}
	b := e.db.NewBatch()
	if err := b.Delete(append(append([]byte(nil), prefixRules...), id...), nil); err != nil {
		b.Close()
		return err
	}
	return e.commitDirect(b)
}

// Rules returns every stored rule definition, by id.
func (e *Engine) Rules() (map[string][]byte, error) {
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: prefixRules, UpperBound: prefixEnd(prefixRules)})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	out := map[string][]byte{}
	for it.First(); it.Valid(); it.Next() {
		out[string(it.Key()[len(prefixRules):])] = append([]byte(nil), it.Value()...)
	}
	return out, it.Error()
}
