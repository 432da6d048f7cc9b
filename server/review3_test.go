package server

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// TestReview3RulesApplyInTurnAcrossRules: the worker applies the firings'
// patches in turn "so that one rule's null removes what another's patch or
// the twin has" (twin/rules.go), but each firing now carries
// DiffPatch(the twin's desired, its own result): a later rule's action
// that puts back what the twin had, or removes a key the twin lacked,
// diffs to nothing and is lost behind an earlier rule's change.
func TestReview3RulesApplyInTurnAcrossRules(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	rc := twinv1.NewRuleServiceClient(s.conn)
	rule := func(id, patch string) {
		t.Helper()
		if _, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: &twinv1.Rule{Id: id, Types: []string{"fridge"},
			Condition: "twin.reported.?go.orValue(false) == true",
			Actions:   []*twinv1.Action{{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{Patch: patch}}}}}}); err != nil {
			t.Fatal(err)
		}
	}
	// Rules evaluate in id order: a, then b.
	rule("a-eco", "{'mode': 'eco', 'lamp': 'on'}")
	rule("b-undo", "{'mode': 'boost', 'lamp': null}")
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "f1", Type: "fridge",
		Desired: mustStruct(t, map[string]any{"mode": "boost"})}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "f1", Patch: mustStruct(t, map[string]any{"go": true})}); err != nil {
		t.Fatal(err)
	}
	tw, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "f1"})
	if err != nil {
		t.Fatal(err)
	}
	got := tw.Twin.Desired.AsMap()
	if got["mode"] != "boost" || got["lamp"] != nil {
		t.Errorf("desired after rules a-eco then b-undo = %v; want {mode: boost} (b's actions applied after a's)", got)
	}
}

// TestReview3RulesFireInIDOrder: twin/rules.go applies "the set_desired
// patches of all the rules that fire on one change ... in rule order", but
// rules.Registry.installLocked builds the Set from a map, and NewSet keeps
// that order: which of two conflicting rules wins changes with every
// install (and every restart).
func TestReview3RulesFireInIDOrder(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	rc := twinv1.NewRuleServiceClient(s.conn)
	const n = 12
	for i := range n {
		id := fmt.Sprintf("r%02d", i)
		if _, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: &twinv1.Rule{Id: id, Types: []string{"fridge"},
			Condition: "twin.reported.?go.orValue(0.0) > 0.0", Trigger: twinv1.Trigger_TRIGGER_WHILE_TRUE,
			Actions: []*twinv1.Action{{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{
				Patch: fmt.Sprintf("{'last': '%s'}", id)}}}}}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "f1", Type: "fridge"}}); err != nil {
		t.Fatal(err)
	}
	for try := range 3 {
		if try > 0 { // install the rules again
			if _, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: &twinv1.Rule{Id: fmt.Sprint("other", try), Types: []string{"lamp"},
				Condition: "true"}}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "f1", Patch: mustStruct(t, map[string]any{"go": float64(try + 1)})}); err != nil {
			t.Fatal(err)
		}
		tw, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "f1"})
		if err != nil {
			t.Fatal(err)
		}
		if got, want := tw.Twin.Desired.AsMap()["last"], fmt.Sprintf("r%02d", n-1); got != want {
			t.Errorf("install %d: desired.last = %v; want %v, the last rule in id order", try, got, want)
		}
	}
}

// TestReview3ShutdownWakesCommandWait: SendCommand may now wait up to 5
// minutes for a device, but Shutdown does not wake the wait as it ends
// streams (streamContext): a graceful shutdown with one such call in
// flight always runs into its timeout, logs the call as stuck and cancels
// it, however quickly everything else ends.
func TestReview3ShutdownWakesCommandWait(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, func(o *Options) { o.ShutdownTimeout = 3 * time.Second })
	createDevice(t, s, "car-1", "car")
	cmds := twinv1.NewCommandServiceClient(s.conn)
	waited := make(chan error, 1)
	go func() {
		_, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk", Wait: durationpb.New(time.Minute)})
		waited <- err
	}()
	waitFor(t, func() bool { return strings.Contains(s.inflight.String(), "SendCommand") })
	time.Sleep(100 * time.Millisecond) // in WaitCommand
	start := time.Now()
	err := s.Shutdown()
	took := time.Since(start)
	t.Logf("Shutdown took %v (%v); SendCommand: %v", took, err, <-waited)
	if took >= s.opts.ShutdownTimeout {
		t.Errorf("Shutdown took %v, the whole shutdown timeout of %v, waiting for a SendCommand that waits for its device", took, s.opts.ShutdownTimeout)
	}
}
