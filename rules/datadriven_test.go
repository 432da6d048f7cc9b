package rules_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/twind-io/twind/rules"
	"github.com/twind-io/twind/twin"
)

// fakeClock is a clock that tests move by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// world is a real engine on an in-memory store, with the rules registry, a
// fake clock, and a record of what fired.
type world struct {
	t     *testing.T
	fs    vfs.FS
	clock *fakeClock
	e     *twin.Engine
	reg   *rules.Registry
	set   atomic.Pointer[rules.Set] // the rules in force, which count firings

	mu      sync.Mutex
	firings []twin.FiringEvent
}

func newWorld(t *testing.T) *world {
	w := &world{t: t, fs: vfs.NewMem(), clock: &fakeClock{now: time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)}}
	w.open()
	t.Cleanup(func() { w.e.Close() })
	return w
}

func (w *world) open() {
	e, err := twin.Open(twin.Options{Dir: "db", FS: w.fs, Clock: w.clock.Now, RuleTick: time.Minute,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		OnFirings: func(evs []twin.FiringEvent) {
			if s := w.set.Load(); s != nil {
				s.Record(evs)
			}
			w.mu.Lock()
			w.firings = append(w.firings, evs...)
			w.mu.Unlock()
		}})
	if err != nil {
		w.t.Fatal(err)
	}
	reg, err := rules.NewRegistry(e, func(s *rules.Set) { w.set.Store(s); e.SetEvaluator(s) }, w.clock.Now, slog.New(slog.NewTextHandler(io.Discard, nil)), twin.Limits{})
	if err != nil {
		w.t.Fatal(err)
	}
	w.e, w.reg = e, reg
}

// drain returns what fired since the last call, one line each, sorted.
func (w *world) drain() string {
	w.mu.Lock()
	evs := w.firings
	w.firings = nil
	w.mu.Unlock()
	var lines []string
	for _, f := range evs {
		if f.Err != nil {
			lines = append(lines, fmt.Sprintf("error %s on %s: %v", f.RuleID, f.TwinID, f.Err))
			continue
		}
		l := fmt.Sprintf("fired %s on %s v%d", f.RuleID, f.TwinID, f.TwinVersion)
		for _, c := range f.Commands {
			l += fmt.Sprintf(" command %s%s", c.Name, js(c.Params))
		}
		for _, p := range f.DesiredPatches {
			l += " desired " + js(p)
		}
		for _, e := range f.Emits {
			l += fmt.Sprintf(" emit %d %q", e.Severity, e.Message)
		}
		lines = append(lines, l)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func js(v any) string {
	if v == nil {
		return ""
	}
	b, _ := json.Marshal(v)
	return string(b)
}

func doc(t *testing.T, s string) twin.Document {
	var d twin.Document
	if err := json.Unmarshal([]byte(s), &d); err != nil {
		t.Fatalf("bad JSON %s: %v", s, err)
	}
	return d
}

// TestRulesDataDriven runs the cases in testdata/: each file is a script of
// commands against a real engine with rules, and what they print.
//
//	rule            create a rule; input: its definition as JSON, durations as strings
//	update-rule     replace a rule, likewise
//	store-rule      store a rule definition as is, as an earlier version
//	                may have; it loads at the next restart
//	delete-rule id=X
//	create id=X type=T
//	report id=X     input: a merge patch
//	desired id=X    input: a merge patch
//	advance d=DUR   move the clock and run timers
//	restart         close the engine and open it again on the same store
//	get id=X        print the twin's desired state and commands
//	complete-commands id=X  report every command of X succeeded
//	status id=X     print a rule's status counts
//	states id=X     print the rule states stored for twin X
func TestRulesDataDriven(t *testing.T) {
	datadriven.Walk(t, "testdata", func(t *testing.T, path string) {
		w := newWorld(t)
		ctx := context.Background()
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			arg := func(k string) string {
				for _, a := range d.CmdArgs {
					if a.Key == k && len(a.Vals) > 0 {
						return a.Vals[0]
					}
				}
				return ""
			}
			var err error
			switch d.Cmd {
			case "rule", "update-rule":
				var def rules.Definition
				if def, err = parseDefinition(d.Input); err != nil {
					return "error: " + err.Error()
				}
				if d.Cmd == "rule" {
					_, err = w.reg.Create(def)
				} else {
					_, err = w.reg.Update(def)
				}
				if err != nil {
					return "error: " + err.Error()
				}
				return "ok"
			case "store-rule":
				// A rule as an earlier version stored it, unchecked.
				def, err := parseDefinition(d.Input)
				if err != nil {
					return "error: " + err.Error()
				}
				def.Gen = 1
				b, _ := json.Marshal(def)
				if err := w.e.PutRule(def.ID, b); err != nil {
					return "error: " + err.Error()
				}
				return "ok"
			case "delete-rule":
				if err := w.reg.Delete(arg("id")); err != nil {
					return "error: " + err.Error()
				}
				return "ok"
			case "create":
				_, err = w.e.Create(ctx, twin.CreateRequest{ID: arg("id"), Type: arg("type")})
			case "report":
				_, err = w.e.Report(ctx, twin.PatchRequest{ID: arg("id"), Patch: doc(t, d.Input)})
			case "desired":
				_, err = w.e.UpdateDesired(ctx, twin.PatchRequest{ID: arg("id"), Patch: doc(t, d.Input)})
			case "advance":
				dur, perr := time.ParseDuration(arg("d"))
				if perr != nil {
					t.Fatal(perr)
				}
				w.clock.Advance(dur)
				err = w.e.RunTimers(ctx)
			case "restart":
				w.e.Close()
				w.open()
				err = w.e.RunTimers(ctx)
			case "complete-commands":
				cmds, _, err := w.e.ListCommands(arg("id"), nil, 0, 100)
				if err != nil {
					return "error: " + err.Error()
				}
				var lines []string
				for _, c := range cmds {
					got, err := w.e.UpdateCommand(ctx, arg("id"), twin.CommandUpdate{ID: c.ID, State: twin.CommandSucceeded})
					if err != nil {
						lines = append(lines, c.ID+" "+err.Error())
						continue
					}
					lines = append(lines, got.ID+" "+got.State.String())
				}
				return strings.Join(lines, "\n")
			case "status":
				c, err := w.reg.Get(arg("id"))
				if err != nil {
					return "error: " + err.Error()
				}
				st := c.Status()
				return fmt.Sprintf("fires %d errors %d last error %q", st.Fires, st.Errors, st.LastError)
			case "get":
				tw, err := w.e.Get(arg("id"))
				if err != nil {
					return "error: " + err.Error()
				}
				cmds, _, _ := w.e.ListCommands(arg("id"), nil, 0, 100)
				var names []string
				for _, c := range cmds {
					names = append(names, c.Name+js(c.Params)+" from "+string(c.Source))
				}
				return fmt.Sprintf("version %d desired %s\ncommands %v", tw.Version, js(tw.Desired), names)
			default:
				t.Fatalf("unknown command %q", d.Cmd)
			}
			if err != nil {
				return "error: " + err.Error()
			}
			out := w.drain()
			if out == "" {
				return "nothing fired"
			}
			return out
		})
	})
}

// parseDefinition reads a rule definition written as JSON with durations as
// strings ("2m") and triggers as names.
func parseDefinition(s string) (rules.Definition, error) {
	var raw struct {
		rules.Definition
		Trigger  string `json:"trigger"`
		HoldFor  string `json:"hold_for"`
		Cooldown string `json:"cooldown"`
		Enabled  *bool  `json:"enabled"`
	}
	if err := json.Unmarshal([]byte(s), &raw); err != nil {
		return rules.Definition{}, err
	}
	def := raw.Definition
	def.Enabled = raw.Enabled == nil || *raw.Enabled
	def.Trigger = map[string]rules.Trigger{"": rules.Rising, "RISING": rules.Rising, "WHILE_TRUE": rules.WhileTrue}[raw.Trigger]
	for _, p := range []struct {
		s string
		d *time.Duration
	}{{raw.HoldFor, &def.HoldFor}, {raw.Cooldown, &def.Cooldown}} {
		if p.s == "" {
			continue
		}
		d, err := time.ParseDuration(p.s)
		if err != nil {
			return def, err
		}
		*p.d = d
	}
	return def, nil
}
