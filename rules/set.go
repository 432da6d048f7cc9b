package rules

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/twind-io/twind/twin"
)

// Set is an immutable set of compiled rules, indexed by device type so that
// a change evaluates only the rules that can apply to it. It implements
// twin.Evaluator and is safe for concurrent use.
type Set struct {
	rules   map[string]*Compiled
	byType  map[string][]*Compiled // rules that name the type
	all     []*Compiled            // rules that watch every type
	ticks   map[string]bool        // types with rules that read `now`
	tickAll bool                   // a rule watching every type reads `now`
}

// NewSet indexes compiled rules. Disabled rules are kept, for their states,
// but not evaluated.
func NewSet(rules []*Compiled) *Set {
	s := &Set{rules: map[string]*Compiled{}, byType: map[string][]*Compiled{}, ticks: map[string]bool{}}
	// Rules fire in a fixed order, so that which of two rules patching the
	// same key wins does not change from one install or restart to the
	// next: the rules for the twin's type by id, then those for every type
	// by id.
	rules = slices.Clone(rules)
	slices.SortFunc(rules, func(a, b *Compiled) int { return strings.Compare(a.Def.ID, b.Def.ID) })
	for _, r := range rules {
		s.rules[r.Def.ID] = r
		if !r.Def.Enabled {
			continue
		}
		if len(r.Def.Types) == 0 {
			s.all = append(s.all, r)
			s.tickAll = s.tickAll || r.usesNow
			continue
		}
		for _, t := range r.Def.Types {
			s.byType[t] = append(s.byType[t], r)
			s.ticks[t] = s.ticks[t] || r.usesNow
		}
	}
	return s
}

// Watches implements twin.Evaluator: whether an enabled rule watches the
// type.
func (s *Set) Watches(typ string) bool { return len(s.all) > 0 || len(s.byType[typ]) > 0 }

// Len returns the number of rules.
func (s *Set) Len() int { return len(s.rules) }

// Ticks implements twin.Evaluator.
func (s *Set) Ticks(typ string) bool { return s.tickAll || s.ticks[typ] }

// TickTypes returns the device types with rules that read `now`, or all if
// a rule of every type does.
func (s *Set) TickTypes() (types []string, all bool) {
	for t, ticks := range s.ticks {
		if ticks {
			types = append(types, t)
		}
	}
	slices.Sort(types)
	return types, s.tickAll
}

// Evaluate implements twin.Evaluator. A rule fires:
//
//   - RISING: once each time its condition goes from false to true (after
//     hold_for, if set, during which the condition must keep holding);
//   - WHILE_TRUE: on every change while its condition holds (after
//     hold_for, if set);
//
// and in either case at most once per cooldown. A firing swallowed by the
// cooldown is not retried. A twin without a state for a rule, such as every
// twin when the rule is created, counts as one whose condition was false:
// a condition already true when the rule is created fires on the twin's next
// change (or tick, for rules that read `now`).
//
// States that are void are deleted (returned as nil): those of rules that
// are gone, whose generation changed, or that do not watch the twin's type
// (any more); a disabled rule's current state is kept for when it is
// enabled again. Cost is the CEL cost spent, where an expression whose
// worst case is at most 1,000 counts at its estimate, untracked.
func (s *Set) Evaluate(prev, next *twin.Twin, states map[string]twin.RuleState, now time.Time, timer bool) twin.Evaluation {
	var res twin.Evaluation
	setState := func(id string, st *twin.RuleState) {
		if res.States == nil {
			res.States = map[string]*twin.RuleState{}
		}
		res.States[id] = st
	}
	// States that are void: of rules that are gone, that changed, or that
	// no longer watch the twin's type. Those of rules that run are replaced
	// below.
	for id, st := range states {
		if r, ok := s.rules[id]; !ok || st.Gen != r.Def.Gen || !r.watches(next.Type) {
			setState(id, nil)
		}
	}
	candidates := s.byType[next.Type]
	if len(candidates) == 0 && len(s.all) == 0 {
		return res
	}
	act := &activation{twin: Value(next), prevTwin: prev, next: next, now: now}
	for _, group := range [2][]*Compiled{candidates, s.all} {
		for _, r := range group {
			st, ok := states[r.Def.ID]
			if ok && st.Gen != r.Def.Gen {
				st, ok = twin.RuleState{}, false // the rule changed: start afresh
			}
			f, nst, wake := r.step(act, st, timer)
			if nst != st {
				if nst == (twin.RuleState{Gen: r.Def.Gen}) {
					if ok {
						setState(r.Def.ID, nil) // back to nothing to remember
					}
				} else {
					n := nst
					setState(r.Def.ID, &n)
				}
			}
			if f != nil {
				res.Firings = append(res.Firings, *f)
			}
			if !wake.IsZero() && (res.Wake.IsZero() || wake.Before(res.Wake)) {
				res.Wake = wake
			}
		}
	}
	res.Cost = act.cost
	return res
}

// Record counts firings in the status of their rules: a firing with Err as
// an error (twin.ErrRuleLoop included), any other as a firing. The engine's
// OnFirings must pass every firing to Record once it is durable, and only
// firings whose effects it applied; Evaluate counts nothing itself, so a
// rule's fire_count is what happened, not what was attempted. Firings of
// rules the set does not hold are ignored. It is safe for concurrent use.
func (s *Set) Record(evs []twin.FiringEvent) {
	for i := range evs {
		ev := &evs[i]
		r, ok := s.rules[ev.RuleID]
		if !ok {
			continue
		}
		if ev.Err != nil {
			r.status.failed(ev.Err, ev.Time)
		} else {
			r.status.fired(ev.Time)
		}
	}
}

// watches reports whether the rule applies to twins of a type.
func (r *Compiled) watches(typ string) bool {
	return len(r.Def.Types) == 0 || slices.Contains(r.Def.Types, typ)
}

// step evaluates one rule for one change: whether it fires, its new state,
// and when it wants to be evaluated again.
func (r *Compiled) step(act *activation, st twin.RuleState, timer bool) (*twin.Firing, twin.RuleState, time.Time) {
	now := act.now
	st.Gen = r.Def.Gen
	holds, err := r.condition(act)
	if err != nil {
		return &twin.Firing{RuleID: r.Def.ID, Err: fmt.Errorf("condition: %w", err)}, st, time.Time{}
	}
	if !holds {
		last := st.LastFired
		return nil, twin.RuleState{Gen: r.Def.Gen, LastFired: last}, time.Time{}
	}
	if !st.Active {
		st.Active, st.Fired = true, false
		if r.Def.HoldFor > 0 {
			st.PendingSince = now
		}
	}
	var wake time.Time
	held := true
	if r.Def.HoldFor > 0 && !st.PendingSince.IsZero() {
		due := st.PendingSince.Add(r.Def.HoldFor)
		if now.Before(due) {
			held, wake = false, due
		}
	}
	fire := false
	if held {
		switch r.Def.Trigger {
		case WhileTrue:
			fire = !timer || !st.Fired
		default:
			fire = !st.Fired
		}
	}
	if fire && r.Def.Cooldown > 0 && !st.LastFired.IsZero() && now.Sub(st.LastFired) < r.Def.Cooldown {
		fire = false
		st.Fired = true // the edge is spent: it does not fire when the cooldown ends
	}
	if !fire {
		return nil, st, wake
	}
	st.Fired, st.LastFired = true, now
	if r.Def.Trigger == Rising {
		st.PendingSince = time.Time{} // nothing more to wait for in this period
	}
	f := r.fire(act)
	return &f, st, wake
}

// condition evaluates the rule's condition. A missing field makes it false.
func (r *Compiled) condition(act *activation) (bool, error) {
	out, err := act.eval(r.cond)
	if err != nil {
		if missingField(err) {
			return false, nil
		}
		return false, err
	}
	b, ok := out.Value().(bool)
	if !ok {
		return false, fmt.Errorf("evaluated to %v, not a bool", out.Value())
	}
	return b, nil
}

// fire evaluates the rule's actions.
func (r *Compiled) fire(act *activation) twin.Firing {
	f := twin.Firing{RuleID: r.Def.ID}

	for i, a := range r.actions {
		switch a.kind {
		case "command":
			var params twin.Document
			if a.prg != nil {
				p, err := evalMap(a.prg, act)
				if err != nil {
					return twin.Firing{RuleID: r.Def.ID, Err: fmt.Errorf("actions[%d].command.params: %w", i, err)}
				}
				params = p
			}
			f.Commands = append(f.Commands, twin.RuleCommand{Name: a.name, Params: params})
		case "set_desired":
			p, err := evalMap(a.prg, act)
			if err != nil {
				return twin.Firing{RuleID: r.Def.ID, Err: fmt.Errorf("actions[%d].set_desired.patch: %w", i, err)}
			}
			// Applied in turn by the engine, after earlier rules' (a null
			// removes the key; an object after it replaces it).
			f.DesiredPatches = append(f.DesiredPatches, p)
		case "emit":
			out, err := act.eval(a.prg)
			if err != nil {
				return twin.Firing{RuleID: r.Def.ID, Err: fmt.Errorf("actions[%d].emit.message: %w", i, err)}
			}
			msg, ok := out.Value().(string)
			if !ok {
				msg = fmt.Sprint(out.Value())
			}
			f.Emits = append(f.Emits, twin.Emit{Severity: a.severity, Message: msg})
		}
	}
	return f
}

// TestResult is what a rule would do for one change.
type TestResult struct {
	Fired             bool
	Condition         bool
	PreviousCondition bool
	Firing            twin.Firing
	Err               error
}

// Test evaluates a rule against a before and after twin, with no side
// effects. hold_for and cooldown are not applied: Fired says whether the
// trigger would fire.
func (r *Compiled) Test(before, after *twin.Twin, now time.Time) TestResult {
	act := &activation{twin: Value(after), prev: Value(before), next: after, now: now}
	var res TestResult
	if res.Condition, res.Err = r.condition(act); res.Err != nil {
		return res
	}
	prevAct := &activation{twin: Value(before), prev: Value(nil), next: before, now: now}
	res.PreviousCondition, _ = r.condition(prevAct)
	switch r.Def.Trigger {
	case WhileTrue:
		res.Fired = res.Condition
	default:
		res.Fired = res.Condition && !res.PreviousCondition
	}
	if res.Fired {
		res.Firing = r.fire(act)
		res.Err = res.Firing.Err
	}
	return res
}

// Status returns the rule's status counters.
func (r *Compiled) Status() StatusSnapshot { return r.status.Snapshot() }

// UsesNow reports whether the rule reads `now`, and so is re-evaluated on
// every tick.
func (r *Compiled) UsesNow() bool { return r.usesNow }
