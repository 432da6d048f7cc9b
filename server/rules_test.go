package server

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/rules"
)

// testClock is a clock the test moves.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func TestRuleService(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	rc := twinv1.NewRuleServiceClient(s.conn)

	// Bad rules: INVALID_ARGUMENT with the CEL message and its position.
	bad := []struct {
		rule *twinv1.Rule
		msg  string
	}{
		{&twinv1.Rule{Id: "r1", Condition: "twin.reported.temp_c >"}, "condition:1:23: Syntax error"},
		{&twinv1.Rule{Id: "r1", Condition: "twin.version"}, "want bool"},
		{&twinv1.Rule{Id: "r1", Condition: "true", Actions: []*twinv1.Action{{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{Patch: "'x'"}}}}}, "set_desired.patch: has type string"},
		{&twinv1.Rule{Id: "r1", Condition: "true", Types: []string{"bad type"}}, "types[0]"},
		{&twinv1.Rule{Id: "", Condition: "true"}, "id: must be"},
		{&twinv1.Rule{Id: "r1", Condition: "true", Trigger: twinv1.Trigger(7)}, "trigger"},
	}
	for _, b := range bad {
		_, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: b.rule})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), b.msg) {
			t.Errorf("CreateRule(%v) = %v; want INVALID_ARGUMENT containing %q", b.rule, err, b.msg)
		}
	}
	v, err := rc.ValidateRule(ctx, &twinv1.ValidateRuleRequest{Rule: &twinv1.Rule{Id: "r1", Condition: "twin.reported.temp_c > 8.0 &&\n  twin.reported.door = 'open'"}})
	if err != nil || v.Valid || len(v.Issues) == 0 || v.Issues[0].Line != 2 || v.Issues[0].Field != "condition" {
		t.Errorf("ValidateRule = %v, %v; want an issue on line 2 of condition", v, err)
	}
	v, err = rc.ValidateRule(ctx, &twinv1.ValidateRuleRequest{Rule: &twinv1.Rule{Id: "r1", Condition: "twin.reported.temp_c > 8.0"}})
	if err != nil || !v.Valid || v.CostEstimate == 0 {
		t.Errorf("ValidateRule(good) = %v, %v; want valid with a cost estimate", v, err)
	}

	// CRUD.
	created, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: &twinv1.Rule{Id: "warm", Types: []string{"fridge"},
		Condition: "twin.reported.temp_c > 8.0",
		Actions:   []*twinv1.Action{{Action: &twinv1.Action_Emit{Emit: &twinv1.EmitAction{Message: "'warm: ' + twin.id"}}}}}})
	if err != nil || !created.Rule.GetEnabled() || created.Rule.Trigger != twinv1.Trigger_TRIGGER_RISING || created.Rule.CreateTime == nil {
		t.Fatalf("CreateRule = %v, %v; want enabled and RISING by default", created, err)
	}
	if _, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: created.Rule}); status.Code(err) != codes.AlreadyExists {
		t.Errorf("second CreateRule = %v; want ALREADY_EXISTS", err)
	}
	for _, id := range []string{"b", "c", "a"} {
		if _, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: &twinv1.Rule{Id: id, Condition: "false"}}); err != nil {
			t.Fatal(err)
		}
	}
	var ids []string
	tok := ""
	for {
		l, err := rc.ListRules(ctx, &twinv1.ListRulesRequest{PageSize: 3, PageToken: tok})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range l.Rules {
			ids = append(ids, r.Id)
		}
		if tok = l.NextPageToken; tok == "" {
			break
		}
	}
	if fmt.Sprint(ids) != "[a b c warm]" {
		t.Errorf("ListRules = %v", ids)
	}
	if _, err := rc.DeleteRule(ctx, &twinv1.DeleteRuleRequest{Id: "b"}); err != nil {
		t.Fatal(err)
	}
	if _, err := rc.GetRule(ctx, &twinv1.GetRuleRequest{Id: "b"}); status.Code(err) != codes.NotFound {
		t.Errorf("GetRule(deleted) = %v; want NOT_FOUND", err)
	}
	if _, err := rc.UpdateRule(ctx, &twinv1.UpdateRuleRequest{Rule: &twinv1.Rule{Id: "nope", Condition: "true"}}); status.Code(err) != codes.NotFound {
		t.Errorf("UpdateRule(unknown) = %v; want NOT_FOUND", err)
	}

	// Watch events, fire, and see the status.
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watch, err := rc.WatchRuleEvents(wctx, &twinv1.WatchRuleEventsRequest{RuleId: "warm"})
	if err != nil {
		t.Fatal(err)
	}
	// The subscription is live once a first event comes through, so keep
	// making the rule fire until one does.
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "fridge-1", Type: "fridge"}}); err != nil {
		t.Fatal(err)
	}
	got := make(chan *twinv1.RuleEvent, 100)
	go func() {
		for {
			m, err := watch.Recv()
			if err != nil {
				return
			}
			got <- m.Event
		}
	}()
	var first *twinv1.RuleEvent
	for i := 0; first == nil; i++ {
		if i == 100 {
			t.Fatal("no rule event after 100 firings")
		}
		for _, temp := range []float64{2, 9} {
			if _, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "fridge-1", Patch: mustStruct(t, map[string]any{"temp_c": temp})}); err != nil {
				t.Fatal(err)
			}
		}
		select {
		case first = <-got:
		case <-time.After(20 * time.Millisecond):
		}
	}
	if first.RuleId != "warm" || first.TwinId != "fridge-1" || first.Kind != twinv1.RuleEventKind_RULE_EVENT_KIND_FIRED || first.TwinVersion == 0 {
		t.Errorf("first event = %v; want warm FIRED on fridge-1", first)
	}
	if e := <-got; e.Kind != twinv1.RuleEventKind_RULE_EVENT_KIND_EMIT || e.Message != "warm: fridge-1" {
		t.Errorf("second event = %v; want the EMIT", e)
	}
	r, _ := rc.GetRule(ctx, &twinv1.GetRuleRequest{Id: "warm"})
	if r.Rule.Status.FireCount == 0 || r.Rule.Status.LastFireTime == nil {
		t.Errorf("status = %v; want firings counted", r.Rule.Status)
	}

	// TestRule, saved and unsaved, without side effects.
	before := &twinv1.Twin{Id: "fridge-9", Type: "fridge", Reported: jsonStruct(t, `{"temp_c": 5}`)}
	after := &twinv1.Twin{Id: "fridge-9", Type: "fridge", Version: 2, Reported: jsonStruct(t, `{"temp_c": 9}`)}
	tr, err := rc.TestRule(ctx, &twinv1.TestRuleRequest{Rule: &twinv1.Rule{Id: "warm"}, Before: before, After: after})
	if err != nil || !tr.Fired || !tr.Condition || tr.PreviousCondition || len(tr.Events) != 1 || tr.Events[0].Message != "warm: fridge-9" {
		t.Errorf("TestRule(saved) = %v, %v", tr, err)
	}
	tr, err = rc.TestRule(ctx, &twinv1.TestRuleRequest{Rule: &twinv1.Rule{Condition: "twin.reported.temp_c > 8.0",
		Actions: []*twinv1.Action{
			{Action: &twinv1.Action_Command{Command: &twinv1.CommandAction{Name: "defrost", Params: "{'minutes': 20}"}}},
			{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{Patch: "{'eco': false}"}}},
		}}, Before: before, After: after})
	if err != nil || !tr.Fired || len(tr.Commands) != 1 || tr.Commands[0].Params.Fields["minutes"].GetNumberValue() != 20 ||
		tr.DesiredPatch.Fields["eco"].GetBoolValue() {
		t.Errorf("TestRule(unsaved) = %v, %v", tr, err)
	}
	if _, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-9"}); status.Code(err) != codes.NotFound {
		t.Errorf("TestRule had a side effect: %v", err)
	}
}

// loadExample reads one of the example rules shipped in rules/examples.
func loadExample(t *testing.T, name string) *twinv1.CreateRuleRequest {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "rules", "examples", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	req := &twinv1.CreateRuleRequest{}
	if err := protojson.Unmarshal(b, req); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return req
}

// TestExampleRules loads every example rule through the API, as the README
// does, and drives the appliances they are for.
func TestExampleRules(t *testing.T) {
	ctx := context.Background()
	clock := &testClock{now: time.Date(2026, 6, 1, 10, 0, 0, 0, time.UTC)}
	s := startServer(t, nil, func(o *Options) { o.Clock = clock.Now })
	rc := twinv1.NewRuleServiceClient(s.conn)
	cc := twinv1.NewCommandServiceClient(s.conn)
	files, _ := filepath.Glob(filepath.Join("..", "rules", "examples", "*.json"))
	if len(files) < 10 {
		t.Fatalf("found %d example rules", len(files))
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".json")
		if _, err := rc.CreateRule(ctx, loadExample(t, name)); err != nil {
			t.Fatalf("example %s: %v", name, err)
		}
	}
	for _, tw := range []*twinv1.Twin{
		{Id: "fridge-1", Type: "fridge", Desired: jsonStruct(t, `{"target_c": 4, "eco": true}`)},
		{Id: "car-1", Type: "car"},
		{Id: "planter-1", Type: "planter", Desired: jsonStruct(t, `{"target_humidity": 60}`)},
	} {
		if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: tw}); err != nil {
			t.Fatal(err)
		}
	}
	report := func(id, js string) {
		t.Helper()
		if _, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: id, Patch: jsonStruct(t, js)}); err != nil {
			t.Fatal(err)
		}
	}
	desired := func(id string) string {
		t.Helper()
		g, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: id})
		if err != nil {
			t.Fatal(err)
		}
		b, _ := protojson.Marshal(g.Twin.Desired)
		return strings.ReplaceAll(string(b), " ", "")
	}
	commands := func(id string) []string {
		t.Helper()
		l, err := cc.ListCommands(ctx, &twinv1.ListCommandsRequest{DeviceId: id})
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, c := range l.Commands {
			out = append(out, c.Name+" from "+c.Source)
		}
		sort.Strings(out)
		return out
	}

	// Fridge: warm leaves eco mode.
	report("fridge-1", `{"temp_c": 9.5, "door": "closed"}`)
	if got := desired("fridge-1"); !strings.Contains(got, `"eco":false`) {
		t.Errorf("warm fridge desired %s; want eco false", got)
	}
	// Fridge: the door open for two minutes (the engine's clock is the
	// test's; RunTimers does on demand what the timers do on time).
	report("fridge-1", `{"door": "open"}`)
	clock.advance(119 * time.Second)
	if err := s.Engine().RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	if r, _ := rc.GetRule(ctx, &twinv1.GetRuleRequest{Id: "fridge-door-open"}); r.Rule.Status.FireCount != 0 {
		t.Errorf("door rule fired before two minutes")
	}
	clock.advance(2 * time.Second)
	if err := s.Engine().RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	if r, _ := rc.GetRule(ctx, &twinv1.GetRuleRequest{Id: "fridge-door-open"}); r.Rule.Status.FireCount != 1 {
		t.Errorf("door rule fired %d times after two minutes; want 1", r.Rule.Status.FireCount)
	}

	// Car: low fuel navigates to a station.
	report("car-1", `{"fuel": 0.5, "speed_kmh": 80}`)
	report("car-1", `{"fuel": 0.08}`)
	if got := commands("car-1"); fmt.Sprint(got) != "[navigate from rule:car-low-fuel]" {
		t.Errorf("car commands %v", got)
	}

	// Planter: dry soil waters and runs the pump, moist soil stops it; high
	// CO2 runs the fan, low CO2 stops it; a dark day lights the lamp.
	report("planter-1", `{"soil_moisture": 25, "co2_ppm": 600, "light_lux": 5000, "humidity": 58}`)
	if got := desired("planter-1"); !strings.Contains(got, `"pump":"on"`) {
		t.Errorf("dry planter desired %s; want pump on", got)
	}
	report("planter-1", `{"soil_moisture": 60, "co2_ppm": 1200}`)
	if got := desired("planter-1"); !strings.Contains(got, `"pump":"off"`) || !strings.Contains(got, `"fan":"on"`) {
		t.Errorf("moist, stuffy planter desired %s; want pump off and fan on", got)
	}
	report("planter-1", `{"co2_ppm": 700, "light_lux": 50}`)
	if got := desired("planter-1"); !strings.Contains(got, `"fan":"off"`) || !strings.Contains(got, `"lamp":"on"`) {
		t.Errorf("fresh, dark planter desired %s; want fan off and lamp on", got)
	}
	// Too hot for a minute: the fan runs.
	report("planter-1", `{"temp_c": 31}`)
	clock.advance(61 * time.Second)
	if err := s.Engine().RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	if got := desired("planter-1"); !strings.Contains(got, `"fan":"on"`) {
		r, _ := rc.GetRule(ctx, &twinv1.GetRuleRequest{Id: "planter-hot"})
		t.Errorf("hot planter desired %s; want fan on (rule status %v)", got, r.GetRule().GetStatus())
	}
	if got := commands("planter-1"); fmt.Sprint(got) != "[water from rule:planter-dry]" {
		t.Errorf("planter commands %v", got)
	}
}

// TestRuleStatusSurvivesRestart checks that a rule's counts are stored at
// shutdown and loaded at start.
func TestRuleStatusSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	s := startServer(t, fs, nil)
	rc := twinv1.NewRuleServiceClient(s.conn)
	if _, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: &twinv1.Rule{Id: "hot", Condition: "twin.reported.t > 5.0",
		Trigger: twinv1.Trigger_TRIGGER_WHILE_TRUE}}); err != nil {
		t.Fatal(err)
	}
	s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "x"}})
	for i := range 3 {
		s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "x", Patch: mustStruct(t, map[string]any{"t": 10 + i})})
	}
	if err := s.Shutdown(); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, fs, nil)
	r, err := twinv1.NewRuleServiceClient(s.conn).GetRule(ctx, &twinv1.GetRuleRequest{Id: "hot"})
	if err != nil || r.Rule.Status.FireCount != 3 || r.Rule.Status.LastFireTime == nil {
		t.Errorf("status after restart = %v, %v; want 3 firings", r.GetRule().GetStatus(), err)
	}
}

// TestRuleRefusals checks that CreateRule, UpdateRule and ValidateRule
// refuse, with INVALID_ARGUMENT and what to change, a rule whose worst case
// on twins within the configured document limits is over the runtime cost
// limit, and arithmetic that mixes a twin's numbers (doubles) with ints;
// and that the README's rules stay accepted.
func TestRuleRefusals(t *testing.T) {
	ctx := context.Background()
	def := startServer(t, nil, nil)
	small := startServer(t, nil, func(o *Options) { o.Engine.Limits.MaxDocumentBytes = 4 << 10 })
	const (
		nested = "twin.reported.items.all(d, d.all(e, e > 0.0))"
		filter = "twin.reported.items.filter(x, x > 2.0 && x < 5.0 && x != 3.0).size() > 0"
	)
	cases := []struct {
		name       string
		condition  string
		patch      string
		want       string // in the issue; "" for valid
		wantSmall  string // the same with 4 KiB documents
		maxAllowed uint64 // most the valid estimate may be; 0 for any
	}{
		{name: "nested loops over twin data", condition: nested,
			want: "condition: may cost 21,475,164,164 per evaluation on a twin at the document limits (65536-byte documents", wantSmall: "over the limit of 1,000,000"},
		{name: "bounded by the configured limits", condition: filter,
			want: "over the limit of 1,000,000: a comprehension runs its body once per element"},
		{name: "counter", condition: "true", patch: "{'n': twin.desired.?n.orValue(0) + 1}",
			want:      "actions[0].set_desired.patch:1:34: + mixes a number from the twin, which is a double, with an int; CEL has no such overload, so this fails at run time: write orValue(0.0) instead of orValue(0) and 1.0 instead of 1",
			wantSmall: "orValue(0.0) instead of orValue(0)"},
		{name: "counter with doubles", condition: "true", patch: "{'n': twin.desired.?n.orValue(0.0) + 1.0}"},
		{name: "README: changed", condition: "'reported.door' in changed", maxAllowed: 100_000},
		{name: "README: presence", condition: "now - twin.presence.last_seen > duration('10m')", maxAllowed: 100},
		{name: "README: planter-dry", condition: "twin.reported.soil_moisture < 30.0 && twin.desired.?pump.orValue('off') != 'on'", patch: "{'pump': 'on'}", maxAllowed: 100},
		{name: "comprehension", condition: "twin.reported.exists(k, k.startsWith('temp_') && twin.reported[k] > 30.0)", maxAllowed: rules.RuleCostLimit},
		{name: "matches", condition: "twin.reported.name.matches('^planter-[0-9]+$') && twin.labels.site.matches('^ber')", maxAllowed: 100_000},
	}
	for _, c := range cases {
		for _, srv := range []struct {
			name string
			s    *testServer
			want string
		}{{"64 KiB", def, c.want}, {"4 KiB", small, c.wantSmall}} {
			rc := twinv1.NewRuleServiceClient(srv.s.conn)
			rule := &twinv1.Rule{Id: "r-" + strings.NewReplacer(" ", "-", ":", "").Replace(c.name), Condition: c.condition}
			if c.patch != "" {
				rule.Actions = []*twinv1.Action{{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{Patch: c.patch}}}}
			}
			v, err := rc.ValidateRule(ctx, &twinv1.ValidateRuleRequest{Rule: rule})
			if err != nil {
				t.Fatal(err)
			}
			if srv.want == "" {
				if !v.Valid || (c.maxAllowed > 0 && v.CostEstimate > c.maxAllowed) {
					t.Errorf("%s, %s: ValidateRule = %v; want valid, estimate at most %d", c.name, srv.name, v, c.maxAllowed)
				}
				if _, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: rule}); err != nil {
					t.Errorf("%s, %s: CreateRule = %v; want OK", c.name, srv.name, err)
				}
				continue
			}
			if v.Valid || len(v.Issues) != 1 || !strings.Contains(issueString(v.Issues[0]), srv.want) {
				t.Errorf("%s, %s: ValidateRule = %v; want one issue containing %q", c.name, srv.name, v, srv.want)
			}
			_, err = rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: rule})
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), srv.want) {
				t.Errorf("%s, %s: CreateRule = %v; want INVALID_ARGUMENT containing %q", c.name, srv.name, err, srv.want)
			}
			// An update is checked as a creation is.
			ok := &twinv1.Rule{Id: rule.Id, Condition: "true"}
			if _, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: ok}); err != nil {
				t.Fatal(err)
			}
			_, err = rc.UpdateRule(ctx, &twinv1.UpdateRuleRequest{Rule: rule})
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), srv.want) {
				t.Errorf("%s, %s: UpdateRule = %v; want INVALID_ARGUMENT containing %q", c.name, srv.name, err, srv.want)
			}
		}
	}
}

// issueString formats an issue as CreateRule's error does.
func issueString(is *twinv1.RuleIssue) string {
	if is.Line > 0 {
		return fmt.Sprintf("%s:%d:%d: %s", is.Field, is.Line, is.Column, is.Message)
	}
	return is.Field + ": " + is.Message
}

// TestRuleStatusRecordsLoopsAndErrors checks that a rule's status counts
// the firings that were applied, and records a chain of rule changes that
// was stopped and an evaluation error with the advice it carries.
func TestRuleStatusRecordsLoopsAndErrors(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	rc := twinv1.NewRuleServiceClient(s.conn)
	for _, r := range []*twinv1.Rule{
		// Re-fires on its own changes for ever.
		{Id: "runaway", Types: []string{"counter"}, Condition: "true", Trigger: twinv1.Trigger_TRIGGER_WHILE_TRUE,
			Actions: []*twinv1.Action{{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{Patch: "{'n': twin.desired.?n.orValue(0.0) + 1.0}"}}}}},
		// Mixes numbers where the checker cannot see it.
		{Id: "plus-one", Types: []string{"list"}, Condition: "true",
			Actions: []*twinv1.Action{{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{Patch: "{'items': twin.reported.items.map(x, x + 1)}"}}}}},
	} {
		if _, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: r}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "c-1", Type: "counter"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "l-1", Type: "list", Reported: jsonStruct(t, `{"items": [1, 2]}`)}}); err != nil {
		t.Fatal(err)
	}
	g, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "c-1"})
	if err != nil {
		t.Fatal(err)
	}
	applied := g.Twin.Desired.Fields["n"].GetNumberValue()
	for _, c := range []struct {
		id            string
		fires, errors int64
		lastError     string
	}{
		{"runaway", int64(applied), 1, "rules changed desired state 8 times in a row for one change; stopped"},
		{"plus-one", 0, 1, "no such overload; if this is arithmetic on a twin's number: numbers in twin documents are doubles, and CEL does not mix them with ints: write 1.0 instead of 1"},
	} {
		r, err := rc.GetRule(ctx, &twinv1.GetRuleRequest{Id: c.id})
		if err != nil {
			t.Fatal(err)
		}
		st := r.Rule.Status
		if st.FireCount != c.fires || st.ErrorCount != c.errors || !strings.Contains(st.LastError, c.lastError) || st.LastErrorTime == nil {
			t.Errorf("GetRule(%s).status = %v; want %d firings, %d errors, the last containing %q", c.id, st, c.fires, c.errors, c.lastError)
		}
	}
	if applied != 8 {
		t.Errorf("desired n = %v; want 8 rule-made changes", applied)
	}
}
