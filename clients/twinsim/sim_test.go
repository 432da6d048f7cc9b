package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/twind-io/twind/clients/twind"
	"github.com/twind-io/twind/internal/testserver"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
)

func startTwind(t *testing.T) *twind.Client {
	t.Helper()
	// The load generator's devices report as fast as acks allow: far
	// beyond the default per-device rate, as the README says.
	opts := server.Options{}
	opts.Limits.ReportRate = math.Inf(1)
	c, err := twind.Dial(testserver.StartWith(t, t.TempDir(), "", opts).Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestRunFleet(t *testing.T) {
	c := startTwind(t)
	var out bytes.Buffer
	err := runFleet(context.Background(), c, runOptions{fridges: 2, cars: 2, planters: 3, tick: 20 * time.Millisecond, duration: 3 * time.Second}, &out)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "example rules, for this run's twins only (sim-*): 10 created") || !strings.Contains(out.String(), "stopped after") {
		t.Errorf("output:\n%s", out.String())
	}
	ctx := context.Background()
	n := 0
	for tw, err := range c.ListTwins(ctx, `twin.labels.?twinsim.orValue("") == "sim"`) {
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(tw.Id, "sim-") || tw.Version < 2 || len(tw.Reported.GetFields()) == 0 {
			t.Errorf("%s never reported: %v", tw.Id, tw)
		}
		n++
	}
	if n != 7 {
		t.Errorf("%d simulated twins; want 7", n)
	}
	// Planters dry out within the run: the example rules water them, and
	// the simulated devices apply desired state and run the commands.
	watered := 0
	for tw, err := range c.ListTwins(ctx, `twin.type == "planter" && has(twin.desired.pump) && twin.desired_acked_version > 0`) {
		if err != nil {
			t.Fatal(err)
		}
		cmds, err := c.Commands.ListCommands(ctx, &twinv1.ListCommandsRequest{DeviceId: tw.Id,
			States: []twinv1.CommandState{twinv1.CommandState_COMMAND_STATE_SUCCEEDED}})
		if err != nil {
			t.Fatal(err)
		}
		if len(cmds.Commands) > 0 {
			watered++
		}
	}
	if watered == 0 {
		t.Error("no planter was watered by the rules and the simulated device")
	}
	// Running again reuses the twins and the rules.
	out.Reset()
	if err := runFleet(ctx, c, runOptions{planters: 1, tick: 50 * time.Millisecond, duration: 200 * time.Millisecond}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "0 created") {
		t.Errorf("second run:\n%s", out.String())
	}
}

// connects reports whether a device can connect with a token.
func connects(t *testing.T, c *twind.Client, id, token string) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.Devices.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{DeviceId: id, Token: token}}}); err != nil {
		t.Fatal(err)
	}
	m, err := st.Recv()
	return err == nil && m.GetWelcome() != nil
}

// twinsim run drives only the twins it created: it issues no token for and
// runs no command of any other twin, even one with its ids, and its rules
// act on its own twins only.
func TestRunLeavesOthersAlone(t *testing.T) {
	c := startTwind(t)
	ctx := context.Background()
	// The README's twins, a device token and a queued command, and a twin
	// with the ids a run named "other" would use.
	tokens := map[string]string{}
	for _, tw := range []struct{ id, typ string }{{"fridge-1", "fridge"}, {"car-1", "car"}, {"planter-1", "planter"}, {"other-car-1", "car"}} {
		if _, err := c.CreateTwin(ctx, tw.id, tw.typ, nil); err != nil {
			t.Fatal(err)
		}
		tok, err := c.IssueDeviceToken(ctx, tw.id)
		if err != nil {
			t.Fatal(err)
		}
		tokens[tw.id] = tok
		if tw.typ == "car" {
			if _, err := c.SendCommand(ctx, tw.id, "navigate", map[string]any{"lat": 52.5, "lon": 13.4}, twind.SendOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}

	var out bytes.Buffer
	if err := runFleet(ctx, c, runOptions{fridges: 1, cars: 1, planters: 1, tick: 20 * time.Millisecond, duration: 300 * time.Millisecond}, &out); err != nil {
		t.Fatal(err)
	}
	err := runFleet(ctx, c, runOptions{name: "other", cars: 1, tick: 20 * time.Millisecond, duration: 300 * time.Millisecond}, &out)
	if err == nil || !strings.Contains(err.Error(), "other-car-1") || !strings.Contains(err.Error(), "twinsim=other") {
		t.Errorf("run over a twin it did not create = %v; want an error naming the twin and the label", err)
	}

	for id, tok := range tokens {
		if !connects(t, c, id, tok) {
			t.Errorf("%s's device token no longer works after twinsim run", id)
		}
		cmds, err := c.Commands.ListCommands(ctx, &twinv1.ListCommandsRequest{DeviceId: id})
		if err != nil {
			t.Fatal(err)
		}
		for _, cmd := range cmds.Commands {
			// The test's own connection above got it sent, not run.
			if cmd.State != twinv1.CommandState_COMMAND_STATE_QUEUED && cmd.State != twinv1.CommandState_COMMAND_STATE_SENT {
				t.Errorf("command %s of %s is %v after twinsim run; want it unrun", cmd.Id, id, cmd.State)
			}
		}
		if tw, err := c.GetTwin(ctx, id); err != nil || tw.Version != 1 {
			t.Errorf("%s after twinsim run: version %d, %v; want 1, untouched", id, tw.GetVersion(), err)
		}
	}

	// The run's copy of planter-dry fires for the run's planters only.
	for _, tc := range []struct {
		labels map[string]string
		want   bool
	}{{nil, false}, {map[string]string{"twinsim": "other"}, false}, {map[string]string{"twinsim": "sim"}, true}} {
		resp, err := c.Rules.TestRule(ctx, &twinv1.TestRuleRequest{Rule: &twinv1.Rule{Id: "sim-planter-dry"},
			Before: &twinv1.Twin{Id: "p", Type: "planter", Labels: tc.labels, Reported: mustStruct(t, map[string]any{"soil_moisture": 45})},
			After:  &twinv1.Twin{Id: "p", Type: "planter", Labels: tc.labels, Reported: mustStruct(t, map[string]any{"soil_moisture": 22})}})
		if err != nil {
			t.Fatal(err)
		}
		if resp.Fired != tc.want {
			t.Errorf("sim-planter-dry on a dry planter labelled %v fired %v; want %v", tc.labels, resp.Fired, tc.want)
		}
	}
}

func mustStruct(t *testing.T, m map[string]any) *structpb.Struct {
	t.Helper()
	s, err := twind.Struct(m)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// ids lists the ids of the twins matching filter.
func ids(t *testing.T, c *twind.Client, filter string) []string {
	t.Helper()
	var out []string
	for tw, err := range c.ListTwins(context.Background(), filter) {
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, tw.Id)
	}
	return out
}

// ruleIDs lists the ids of the rules.
func ruleIDs(t *testing.T, c *twind.Client) []string {
	t.Helper()
	rules, err := listRules(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range rules {
		out = append(out, r.Id)
	}
	return out
}

// twinsim clean removes what a run made, by its label, and nothing else.
func TestClean(t *testing.T) {
	c := startTwind(t)
	ctx := context.Background()
	if _, err := c.CreateTwin(ctx, "fridge-1", "fridge", map[string]string{"site": "berlin"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Rules.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: &twinv1.Rule{Id: "mine", Description: "twinsim runs are fun",
		Condition: "twin.reported.?x.orValue(0.0) > 1.0"}}); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	for _, name := range []string{"a", "b"} {
		if err := runFleet(ctx, c, runOptions{name: name, fridges: 1, planters: 1, tick: 20 * time.Millisecond, duration: 100 * time.Millisecond}, &out); err != nil {
			t.Fatal(err)
		}
	}
	if got := ids(t, c, ""); !slices.Equal(got, []string{"a-fridge-1", "a-planter-1", "b-fridge-1", "b-planter-1", "fridge-1"}) {
		t.Fatalf("twins after two runs: %v", got)
	}

	for _, tc := range []struct {
		name      string
		out       string
		twins     []string
		rulesLeft int
	}{
		{"a", "removed 2 twins and 10 rules of twinsim run a", []string{"b-fridge-1", "b-planter-1", "fridge-1"}, 11},
		{"a", "removed 0 twins and 0 rules of twinsim run a", []string{"b-fridge-1", "b-planter-1", "fridge-1"}, 11},
		{"", "removed 2 twins and 10 rules of twinsim every run", []string{"fridge-1"}, 1},
	} {
		out.Reset()
		if err := clean(ctx, c, tc.name, &out); err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(out.String()); got != tc.out {
			t.Errorf("clean(%q) says %q; want %q", tc.name, got, tc.out)
		}
		if got := ids(t, c, ""); !slices.Equal(got, tc.twins) {
			t.Errorf("clean(%q) leaves twins %v; want %v", tc.name, got, tc.twins)
		}
		if got := ruleIDs(t, c); len(got) != tc.rulesLeft || !slices.Contains(got, "mine") {
			t.Errorf("clean(%q) leaves rules %v; want %d with mine", tc.name, got, tc.rulesLeft)
		}
	}
}

// twinsim bench drives twins of a type of its own, says which rules were
// active for it, and removes its twins and rules when it ends.
func TestBench(t *testing.T) {
	c := startTwind(t)
	ctx := context.Background()
	// Rules an operator has: the example planter rule, one for every type,
	// and one for every type that is switched off.
	if _, err := loadExampleRules(ctx, c, runOptions{name: "x", prefix: "x-"}); err != nil {
		t.Fatal(err)
	}
	off := false
	for _, r := range []*twinv1.Rule{
		{Id: "planter-dry", Types: []string{"planter"}, Condition: "twin.reported.soil_moisture < 30.0",
			Actions: []*twinv1.Action{{Action: &twinv1.Action_Emit{Emit: &twinv1.EmitAction{Message: "'dry'"}}}}},
		{Id: "catch-all", Condition: "twin.reported.?nothing.orValue(false)"},
		{Id: "switched-off", Condition: "true", Enabled: &off},
	} {
		if _, err := c.Rules.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: r}); err != nil {
			t.Fatal(err)
		}
	}
	rulesBefore := ruleIDs(t, c)

	var out, progress bytes.Buffer
	res, err := runBench(ctx, c, benchOptions{devices: 20, duration: time.Second, rules: 5, window: 2, pingEvery: 5, output: "json"}, &out, &progress)
	if err != nil {
		t.Fatal(err)
	}
	var got BenchResult
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("-o json output %q: %v", out.String(), err)
	}
	if got.Acked == 0 || got.Acked != res.Acked || got.ReportToAck.P50 <= 0 || got.ReportToCommand.Count == 0 || got.Refused != 0 {
		t.Errorf("bench result %+v", got)
	}
	wantActive := []string{"bench-rule-0", "bench-rule-1", "bench-rule-2", "bench-rule-3", "bench-rule-4", "catch-all"}
	if !slices.Equal(got.ActiveRules, wantActive) || !slices.Equal(got.OtherRules, []string{"catch-all"}) {
		t.Errorf("active rules %v, others %v; want %v, [catch-all]", got.ActiveRules, got.OtherRules, wantActive)
	}
	r, err := c.Rules.GetRule(ctx, &twinv1.GetRuleRequest{Id: "planter-dry"})
	if err != nil || r.Rule.Status.GetFireCount() != 0 {
		t.Errorf("the planter rule fired %d times during the bench (%v); want 0", r.GetRule().GetStatus().GetFireCount(), err)
	}
	// What the bench made is gone; the operator's rules stay.
	if left := ids(t, c, ""); len(left) != 0 {
		t.Errorf("twins left behind: %v", left)
	}
	if after := ruleIDs(t, c); !slices.Equal(after, rulesBefore) {
		t.Errorf("rules after the bench %v; want %v", after, rulesBefore)
	}

	// In text, the active rules are named.
	out.Reset()
	if _, err := runBench(ctx, c, benchOptions{devices: 2, duration: 200 * time.Millisecond, rules: 1, window: 1, keep: true, output: "text"}, &out, &progress); err != nil {
		t.Fatal(err)
	}
	if want := "rules active for type twinsim-bench: 1 of the bench's and 1 other(s): catch-all"; !strings.Contains(out.String(), want) {
		t.Errorf("bench output lacks %q:\n%s", want, out.String())
	}
	// --keep keeps the twins, which clean removes.
	if left := ids(t, c, ""); !slices.Equal(left, []string{"bench-0", "bench-1"}) {
		t.Errorf("twins kept: %v; want bench-0, bench-1", left)
	}
	if err := clean(ctx, c, "bench", io.Discard); err != nil {
		t.Fatal(err)
	}
	if left := ids(t, c, ""); len(left) != 0 {
		t.Errorf("twins left after clean: %v", left)
	}

	// A twin with a bench's id that the bench did not create stops it, and
	// stays.
	if _, err := c.CreateTwin(ctx, "bench-1", "planter", nil); err != nil {
		t.Fatal(err)
	}
	tok, _ := c.IssueDeviceToken(ctx, "bench-1")
	_, err = runBench(ctx, c, benchOptions{devices: 3, duration: 200 * time.Millisecond, rules: 1, window: 1, output: "text"}, &out, &progress)
	if err == nil || !strings.Contains(err.Error(), "bench-1") {
		t.Errorf("bench over a twin it did not create = %v; want an error naming bench-1", err)
	}
	if left := ids(t, c, ""); !slices.Equal(left, []string{"bench-1"}) {
		t.Errorf("twins after the refused bench: %v; want bench-1 alone", left)
	}
	if !connects(t, c, "bench-1", tok) {
		t.Error("bench-1's token no longer works")
	}
}
