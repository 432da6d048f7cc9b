package rules_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/twind-io/twind/rules"
	"github.com/twind-io/twind/twin"
)

// TestCrashRuleEffects crashes the store (power loss: Pebble's crashable
// filesystem and CrashClone) while many twins make real CEL rules fire, with
// commands, desired changes, deletions, re-creations and tokens in flight,
// and checks the reopened store: every acknowledged write is there, and
// every firing left all of its effects (its two commands, its desired
// change) or none. The twin package's crash tests check the store in more detail with
// a stand-in evaluator; this one runs the real rules.
func TestCrashRuleEffects(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("TWIND_CRASH_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("TWIND_CRASH_SEED=%q: %v", s, err)
		}
	}
	t.Logf("seed %d (replay with TWIND_CRASH_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	opts := func(fs vfs.FS) twin.Options {
		return twin.Options{FS: fs, Dir: "db", Workers: 3, VShards: 8, HistoryLimit: 1 << 20, CommandQueueLimit: 1 << 20,
			CommandRetention: 1 << 20, Logger: quiet}
	}
	mem := vfs.NewCrashableMem()
	e, err := twin.Open(opts(mem))
	if err != nil {
		t.Fatal(err)
	}
	reg, err := rules.NewRegistry(e, func(s *rules.Set) { e.SetEvaluator(s) }, time.Now, quiet, twin.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	for _, def := range []rules.Definition{
		{ID: "dry", Types: []string{"planter"}, Enabled: true,
			Condition: `twin.reported.soil_moisture < 30.0 && twin.desired.?pump.orValue("off") != "on"`,
			Actions: []rules.Action{
				{Command: &rules.CommandAction{Name: "water", Params: `{"seconds": 30}`}},
				{Command: &rules.CommandAction{Name: "lamp", Params: `{"on": twin.reported.soil_moisture < 10.0}`}},
				{SetDesired: &rules.SetDesiredAction{Patch: `{"pump": "on"}`}},
			}},
		{ID: "wet", Types: []string{"planter"}, Enabled: true,
			Condition: `twin.reported.soil_moisture > 55.0 && twin.desired.?pump.orValue("off") == "on"`,
			Actions:   []rules.Action{{SetDesired: &rules.SetDesiredAction{Patch: `{"pump": "off"}`}}}},
	} {
		if _, err := reg.Create(def); err != nil {
			t.Fatal(err)
		}
	}

	rounds := 4
	if testing.Short() {
		rounds = 2
	}
	for round := range rounds {
		var (
			crashMu sync.RWMutex
			crashed bool // guarded by crashMu
			acks    atomic.Int64
		)
		crashAfter := int64(1 + rng.IntN(300))
		unsynced := []int{0, 10, 50, 100}[rng.IntN(4)]
		reached := make(chan struct{})
		stop := make(chan struct{})
		var wg sync.WaitGroup
		const owners = 16
		planters := make([]*planter, owners*2)
		for i := range planters {
			planters[i] = &planter{id: fmt.Sprint("planter-", i)}
			if tw, err := e.Get(planters[i].id); err == nil {
				planters[i].acked = []outcome{{exists: true, version: tw.Version, token: string(tw.TokenHash)}}
			}
		}
		for w := range owners {
			seed := rng.Uint64()
			wg.Add(1)
			go func() {
				defer wg.Done()
				own := planters[2*w : 2*w+2]
				r := rand.New(rand.NewPCG(seed, 1))
				for {
					select {
					case <-stop:
						return
					default:
					}
					p := own[r.IntN(2)]
					o := p.do(e, r)
					crashMu.RLock()
					if crashed {
						p.after = append(p.after, o)
					} else {
						p.acked = append(p.acked, o)
						if acks.Add(1) == crashAfter {
							close(reached)
						}
					}
					crashMu.RUnlock()
				}
			}()
		}
		select {
		case <-reached:
		case <-time.After(time.Minute):
			t.Fatalf("fewer than %d operations in a minute", crashAfter)
		}
		crashMu.Lock()
		clone := mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: unsynced, RNG: rand.New(rand.NewPCG(rng.Uint64(), 2))})
		crashed = true
		crashMu.Unlock()
		close(stop)
		wg.Wait()
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}

		mem = clone
		if e, err = twin.Open(opts(mem)); err != nil {
			t.Fatalf("seed %d round %d: the crashed store does not open: %v", seed, round, err)
		}
		if reg, err = rules.NewRegistry(e, func(s *rules.Set) { e.SetEvaluator(s) }, time.Now, quiet, twin.Limits{}); err != nil {
			t.Fatal(err)
		}
		if _, err := reg.Get("dry"); err != nil {
			t.Fatalf("seed %d round %d: rule dry after the crash: %v", seed, round, err)
		}
		firings := 0
		for _, p := range planters {
			n, problems := p.check(e)
			firings += n
			for _, pr := range problems {
				t.Errorf("seed %d round %d (crash after %d acks, %d%% of unsynced data kept): %s: %s", seed, round, crashAfter, unsynced, p.id, pr)
			}
		}
		t.Logf("round %d: crash after %d acknowledged operations, %d%% of unsynced data kept; %d firings of dry kept", round, crashAfter, unsynced, firings)
		if t.Failed() {
			break
		}
	}
	e.Close()
}

// planter is one twin of TestCrashRuleEffects, with the outcomes of the
// operations on it: one goroutine runs them, one at a time.
type planter struct {
	id    string
	acked []outcome // answered before the crash
	after []outcome // answered after it
}

// outcome is what an answered operation says about the twin.
type outcome struct {
	op      string
	failed  bool
	exists  bool   // the twin exists after it
	version int64  // its version after it, if the op returned the twin
	token   string // the token hash after it, if it set one
	command string // the command it queued
}

// do runs one random operation on p.
func (p *planter) do(e *twin.Engine, r *rand.Rand) outcome {
	ctx := context.Background()
	exists := false
	if n := len(p.acked) + len(p.after); n > 0 {
		last := p.acked
		if len(p.after) > 0 {
			last = p.after
		}
		exists = last[len(last)-1].exists
	}
	moisture := twin.Document{"soil_moisture": float64(r.IntN(100))}
	result := func(op string, tw *twin.Twin, err error) outcome {
		switch {
		case err == nil:
			return outcome{op: op, exists: true, version: tw.Version}
		case errors.Is(err, twin.ErrNotFound):
			return outcome{op: op, failed: true}
		default:
			return outcome{op: op, failed: true, exists: exists}
		}
	}
	if !exists {
		tw, err := e.Create(ctx, twin.CreateRequest{ID: p.id, Type: "planter", Reported: moisture})
		return result("create", tw, err)
	}
	switch k := r.IntN(12); {
	case k < 5:
		tw, err := e.Report(ctx, twin.PatchRequest{ID: p.id, Patch: moisture})
		return result("report", tw, err)
	case k < 7:
		tw, err := e.UpdateDesired(ctx, twin.PatchRequest{ID: p.id, Patch: twin.Document{"pump": []any{"on", "off", nil}[r.IntN(3)]}})
		return result("desired", tw, err)
	case k < 8:
		err := e.Delete(ctx, p.id, 0)
		return outcome{op: "delete", failed: err != nil, exists: err != nil && !errors.Is(err, twin.ErrNotFound)}
	case k < 10:
		tok := fmt.Sprint(r.Uint64())
		err := e.SetTokenHash(ctx, p.id, []byte(tok))
		return outcome{op: "token", failed: err != nil, exists: err == nil || !errors.Is(err, twin.ErrNotFound), token: tok}
	default:
		c, err := e.SendCommand(ctx, twin.CommandRequest{DeviceID: p.id, Name: "defrost"})
		if err != nil {
			return outcome{op: "command", failed: true, exists: !errors.Is(err, twin.ErrNotFound)}
		}
		return outcome{op: "command", exists: true, command: c.ID}
	}
}

// check checks p in the reopened store and returns the firings of "dry" it
// holds, and every problem.
func (p *planter) check(e *twin.Engine) (int, []string) {
	var problems []string
	report := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	tw, err := e.Get(p.id)
	if err != nil && !errors.Is(err, twin.ErrNotFound) {
		return 0, []string{err.Error()}
	}
	// The state is the one after the last acknowledged operation, or after
	// the one in flight at the crash.
	var last *outcome
	for i := len(p.acked) - 1; i >= 0; i-- {
		if !p.acked[i].failed {
			last = &p.acked[i]
			break
		}
	}
	var inFlight *outcome
	if len(p.after) > 0 {
		inFlight = &p.after[0]
	}
	if last != nil {
		mayDiffer := inFlight != nil && !inFlight.failed
		switch {
		case last.exists && tw == nil && !(mayDiffer && inFlight.op == "delete"):
			report("acknowledged %s at version %d, but the twin is gone", last.op, last.version)
		case !last.exists && tw != nil && !(mayDiffer && inFlight.op == "create"):
			report("acknowledged delete, but the twin is there at version %d", tw.Version)
		case tw != nil && last.exists && tw.Version < last.version:
			report("acknowledged %s at version %d, but the twin is at version %d", last.op, last.version, tw.Version)
		}
		if tw != nil && last.exists {
			// The token set by the last acknowledged token operation,
			// unless the one in flight replaced it.
			tok := ""
			for _, o := range p.acked {
				switch {
				case o.failed:
				case o.op == "": // the state when the round began
					tok = o.token
				case o.op == "create" || o.op == "delete":
					tok = ""
				case o.op == "token":
					tok = o.token
				}
			}
			if got := string(tw.TokenHash); got != tok && !(mayDiffer && inFlight.op == "token" && got == inFlight.token) {
				report("token %q; the last acknowledged is %q", got, tok)
			}
		}
	}
	if tw == nil {
		return 0, problems
	}
	cmds, _, err := e.ListCommands(p.id, nil, 0, 1<<30)
	if err != nil {
		return 0, append(problems, err.Error())
	}
	have := map[string]bool{}
	waters, lamps := 0, 0
	for _, c := range cmds {
		have[c.ID] = true
		switch {
		case c.Source != twin.RuleSource("dry"):
		case c.Name == "water":
			waters++
		case c.Name == "lamp":
			lamps++
		}
	}
	// Acknowledged commands since the twin's last creation are there.
	for i := len(p.acked) - 1; i >= 0; i-- {
		o := p.acked[i]
		if !o.failed && (o.op == "create" || o.op == "delete") {
			break
		}
		if o.command != "" && !have[o.command] {
			report("acknowledged command %s is lost", o.command)
		}
	}
	// No rule's condition holds: its firing would have changed that.
	m, _ := tw.Reported["soil_moisture"].(float64)
	pump, _ := tw.Desired["pump"].(string)
	if m < 30 && pump != "on" || m > 55 && pump == "on" {
		report("soil_moisture %v with pump %q: a rule's firing is lost", m, pump)
	}
	// Each firing of dry left its command and its desired change.
	hist, err := e.History(p.id, 0, 1<<30)
	if err != nil {
		return 0, append(problems, err.Error())
	}
	pumpOn := 0
	for _, ev := range hist {
		if ev.Source == twin.RuleSource("dry") && ev.Patch["pump"] == "on" {
			pumpOn++
		}
	}
	if waters != pumpOn || lamps != pumpOn {
		report("%d water and %d lamp commands from dry, %d pump-on changes by dry", waters, lamps, pumpOn)
	}
	if len(hist) == 0 || hist[0].Twin.Version != tw.Version {
		report("history does not end at version %d", tw.Version)
	}
	for i := 1; i < len(hist); i++ {
		if hist[i].Twin.Version != hist[i-1].Twin.Version-1 {
			report("history versions not contiguous at %d", hist[i].Twin.Version)
			break
		}
	}
	return pumpOn, problems
}
