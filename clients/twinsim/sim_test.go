package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/twind-io/twind/clients/internal/testserver"
	"github.com/twind-io/twind/clients/twind"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

func startTwind(t *testing.T) *twind.Client {
	t.Helper()
	c, err := twind.Dial(testserver.Start(t, t.TempDir(), "").Addr)
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
	if !strings.Contains(out.String(), "example rules: 10 created") || !strings.Contains(out.String(), "stopped after") {
		t.Errorf("output:\n%s", out.String())
	}
	ctx := context.Background()
	n := 0
	for tw, err := range c.ListTwins(ctx, `twin.labels.?sim.orValue("") == "twinsim"`) {
		if err != nil {
			t.Fatal(err)
		}
		if tw.Version < 2 || len(tw.Reported.GetFields()) == 0 {
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
	if !strings.Contains(out.String(), "example rules: 0 created") {
		t.Errorf("second run:\n%s", out.String())
	}
}

func TestBench(t *testing.T) {
	c := startTwind(t)
	var out, progress bytes.Buffer
	res, err := runBench(context.Background(), c, benchOptions{devices: 20, duration: time.Second, rules: 5, window: 2, output: "json"}, &out, &progress)
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
	// The bench's rules are gone afterwards.
	list, err := c.Rules.ListRules(context.Background(), nil)
	if err != nil || len(list.GetRules()) != 0 {
		t.Errorf("rules left behind: %v, %v", list, err)
	}
}
