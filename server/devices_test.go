package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// device is a test device holding a Connect stream.
type device struct {
	t      *testing.T
	stream twinv1.DeviceService_ConnectClient
	cancel context.CancelFunc
	msgs   chan *twinv1.ConnectResponse
	err    chan error // the stream's end
}

// createDevice creates a twin and issues its token.
func createDevice(t *testing.T, s *testServer, id, typ string) string {
	t.Helper()
	ctx := context.Background()
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id, Type: typ}}); err != nil {
		t.Fatal(err)
	}
	tok, err := s.twins.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: id})
	if err != nil {
		t.Fatal(err)
	}
	return tok.Token
}

// connect opens a stream and sends hello; it does not wait for the welcome.
func connect(t *testing.T, s *testServer, hello *twinv1.Hello, read bool) *device {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := twinv1.NewDeviceServiceClient(s.conn).Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d := &device{t: t, stream: stream, cancel: cancel, msgs: make(chan *twinv1.ConnectResponse, 1000), err: make(chan error, 1)}
	t.Cleanup(cancel)
	if hello != nil {
		if err := stream.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: hello}}); err != nil {
			t.Fatal(err)
		}
	}
	if read {
		go func() {
			for {
				m, err := stream.Recv()
				if err != nil {
					d.err <- err
					return
				}
				d.msgs <- m
			}
		}()
	}
	return d
}

func (d *device) next() *twinv1.ConnectResponse {
	d.t.Helper()
	select {
	case m := <-d.msgs:
		return m
	case err := <-d.err:
		// The pump queues every message before the end: take those first.
		select {
		case m := <-d.msgs:
			d.err <- err
			return m
		default:
		}
		d.t.Fatalf("stream ended: %v", err)
	case <-time.After(10 * time.Second):
		d.t.Fatal("no message within 10s")
	}
	return nil
}

func (d *device) end() error {
	d.t.Helper()
	select {
	case err := <-d.err:
		return err
	case <-time.After(10 * time.Second):
		d.t.Fatal("stream did not end within 10s")
	}
	return nil
}

func (d *device) send(m *twinv1.ConnectRequest) {
	d.t.Helper()
	if err := d.stream.Send(m); err != nil {
		d.t.Fatal(err)
	}
}

func (d *device) report(seq int64, js string) {
	d.t.Helper()
	d.send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: seq, Patch: jsonStruct(d.t, js)}}})
}

func (d *device) update(id string, st twinv1.CommandState) {
	d.t.Helper()
	d.send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_CommandUpdate{CommandUpdate: &twinv1.CommandUpdate{CommandId: id, State: st}}})
}

func TestConnectAuth(t *testing.T) {
	s := startServer(t, nil, func(o *Options) { o.HelloTimeout = 200 * time.Millisecond })
	tok := createDevice(t, s, "fridge-1", "fridge")
	if _, err := s.twins.CreateTwin(context.Background(), &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "no-token"}}); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		hello *twinv1.Hello
		first *twinv1.ConnectRequest
		msg   string
	}{
		{"no token", &twinv1.Hello{DeviceId: "fridge-1"}, nil, "no token"},
		{"wrong token", &twinv1.Hello{DeviceId: "fridge-1", Token: tok + "x"}, nil, "wrong token"},
		{"unknown device", &twinv1.Hello{DeviceId: "ghost", Token: tok}, nil, "unknown device or wrong token"},
		{"device without token", &twinv1.Hello{DeviceId: "no-token", Token: tok}, nil, "unknown device or wrong token"},
		{"bad id", &twinv1.Hello{DeviceId: "a b", Token: tok}, nil, "unknown device"},
		{"report first", nil, &twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: 1}}}, "first message must be a hello"},
		{"silence", nil, nil, "no hello within"},
	}
	for _, tt := range tests {
		d := connect(t, s, tt.hello, true)
		if tt.first != nil {
			d.send(tt.first)
		}
		err := d.end()
		if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("%s: stream ended with %v; want UNAUTHENTICATED containing %q", tt.name, err, tt.msg)
		}
	}
	// Re-issuing the token revokes the old one.
	if _, err := s.twins.IssueDeviceToken(context.Background(), &twinv1.IssueDeviceTokenRequest{Id: "fridge-1"}); err != nil {
		t.Fatal(err)
	}
	d := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, true)
	if err := d.end(); status.Code(err) != codes.Unauthenticated {
		t.Errorf("revoked token: %v; want UNAUTHENTICATED", err)
	}
}

func TestDeviceStream(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	tok := createDevice(t, s, "fridge-1", "fridge")
	if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "fridge-1", Patch: jsonStruct(t, `{"target_c": 4}`)}); err != nil {
		t.Fatal(err)
	}
	d := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, true)
	w := d.next().GetWelcome()
	if w == nil || w.Version != 2 || !w.DesiredChanged || w.Delta.Fields["target_c"].GetNumberValue() != 4 {
		t.Fatalf("welcome = %v; want version 2 with target_c in the delta", w)
	}
	tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"})
	if !tw.Twin.Presence.Connected || tw.Twin.Presence.Since == nil {
		t.Errorf("presence after connect = %v; want connected", tw.Twin.Presence)
	}
	// Watchers see the presence change.
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	watch, err := s.twins.WatchTwins(wctx, &twinv1.WatchTwinsRequest{StartRevision: 1})
	if err != nil {
		t.Fatal(err)
	}
	for {
		ev, err := watch.Recv()
		if err != nil {
			t.Fatalf("no presence event: %v", err)
		}
		if ev.Event.Kind == twinv1.TwinEventKind_TWIN_EVENT_KIND_PRESENCE {
			if !ev.Event.Twin.Presence.Connected || ev.Event.Twin.Version != 2 {
				t.Errorf("presence event %v; want connected at version 2", ev.Event)
			}
			break
		}
	}
	wcancel()

	// Reports are acknowledged in order; a bad one gets an error and the
	// stream goes on.
	d.report(1, `{"temp_c": 5.5, "door": "closed"}`)
	d.report(2, `{"`+strings.Repeat("k", 300)+`": 1}`)
	d.report(3, `{"temp_c": 5.0}`)
	for seq, want := range []struct {
		version int64
		code    string
	}{{3, ""}, {0, "INVALID_ARGUMENT"}, {4, ""}} {
		ack := d.next().GetReportAck()
		if ack.GetSeq() != int64(seq+1) || ack.GetVersion() != want.version || ack.GetErrorCode() != want.code {
			t.Errorf("ack %d = %v; want version %d code %q", seq+1, ack, want.version, want.code)
		}
	}

	// Desired changes arrive in version order; changes that wait for the
	// same send are coalesced into one update.
	for i := range 3 {
		if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "fridge-1", Patch: mustStruct(t, map[string]any{"target_c": i})}); err != nil {
			t.Fatal(err)
		}
	}
	for last := int64(4); last < 7; {
		u := d.next().GetDesiredUpdate()
		if u.GetVersion() <= last || u.GetVersion() > 7 || u.GetPatch().Fields["target_c"].GetNumberValue() != float64(u.GetVersion()-5) {
			t.Fatalf("desired update = %v after version %d; want a later version up to 7, with target_c its version - 5", u, last)
		}
		last = u.GetVersion()
	}
	d.send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_DesiredAck{DesiredAck: &twinv1.DesiredAck{Version: 7}}})
	d.report(4, `{"target_c": 2}`) // after the ack, in order
	if ack := d.next().GetReportAck(); ack.GetSeq() != 4 {
		t.Fatalf("ack = %v", ack)
	}
	tw, _ = s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"})
	if tw.Twin.DesiredAckedVersion != 7 {
		t.Errorf("desired_acked_version = %d; want 7", tw.Twin.DesiredAckedVersion)
	}

	// A second stream replaces the first.
	d2 := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tok, LastVersion: 9}, true)
	if w := d2.next().GetWelcome(); w == nil || w.DesiredChanged {
		t.Errorf("second welcome = %v; want one with desired_changed false", w)
	}
	if err := d.end(); status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "newer stream") {
		t.Errorf("replaced stream ended with %v; want ABORTED", err)
	}
	d2.cancel()
	d2.end()
	// The device goes offline once its stream ends.
	waitFor(t, func() bool {
		tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"})
		return !tw.Twin.Presence.Connected
	})
}

// waitFor polls cond, for things the API offers no event for.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCommands(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	cmds := twinv1.NewCommandServiceClient(s.conn)
	tok := createDevice(t, s, "car-1", "car")

	if _, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "ghost", Name: "honk"}); status.Code(err) != codes.NotFound {
		t.Errorf("command to unknown twin: %v; want NOT_FOUND", err)
	}
	// Offline: queued; idempotent by request_id.
	c1, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "navigate",
		Params: jsonStruct(t, `{"lat": 52.52, "lon": 13.40}`), RequestId: "trip-1"})
	if err != nil || c1.Command.State != twinv1.CommandState_COMMAND_STATE_QUEUED {
		t.Fatalf("SendCommand = %v, %v; want QUEUED", c1, err)
	}
	again, _ := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "navigate",
		Params: jsonStruct(t, `{"lat": 52.52, "lon": 13.40}`), RequestId: "trip-1"})
	if again.GetCommand().GetId() != c1.Command.Id {
		t.Errorf("repeated request_id made %v; want %s", again, c1.Command.Id)
	}
	c2, _ := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk"})
	c3, _ := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk"})
	if c, err := cmds.CancelCommand(ctx, &twinv1.CancelCommandRequest{Id: c3.Command.Id}); err != nil || c.Command.State != twinv1.CommandState_COMMAND_STATE_CANCELED {
		t.Errorf("CancelCommand = %v, %v", c, err)
	}
	if _, err := cmds.CancelCommand(ctx, &twinv1.CancelCommandRequest{Id: c3.Command.Id}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("second cancel: %v; want FAILED_PRECONDITION", err)
	}

	// Connect: the queued commands arrive in order after the welcome.
	d := connect(t, s, &twinv1.Hello{DeviceId: "car-1", Token: tok}, true)
	d.next()
	for _, want := range []string{c1.Command.Id, c2.Command.Id} {
		if c := d.next().GetCommand(); c.GetId() != want || c.GetState() != twinv1.CommandState_COMMAND_STATE_SENT {
			t.Errorf("delivered %v; want %s SENT", c, want)
		}
	}
	d.update(c1.Command.Id, twinv1.CommandState_COMMAND_STATE_SUCCEEDED)
	waitFor(t, func() bool {
		g, _ := cmds.GetCommand(ctx, &twinv1.GetCommandRequest{Id: c1.Command.Id})
		return g.GetCommand().GetState() == twinv1.CommandState_COMMAND_STATE_SUCCEEDED
	})
	// Reconnect without finishing c2: it is delivered again.
	d.cancel()
	d.end()
	d = connect(t, s, &twinv1.Hello{DeviceId: "car-1", Token: tok}, true)
	d.next()
	if c := d.next().GetCommand(); c.GetId() != c2.Command.Id {
		t.Errorf("redelivered %v; want %s", c, c2.Command.Id)
	}

	// Send and wait, like a direct method: the device answers.
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c := d.next().GetCommand()
		d.update(c.GetId(), twinv1.CommandState_COMMAND_STATE_ACCEPTED)
		d.send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_CommandUpdate{CommandUpdate: &twinv1.CommandUpdate{
			CommandId: c.GetId(), State: twinv1.CommandState_COMMAND_STATE_SUCCEEDED, Result: jsonStruct(t, `{"honked": 3}`)}}})
	}()
	got, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk", Wait: durationpb.New(10 * time.Second)})
	wg.Wait()
	if err != nil || got.Command.State != twinv1.CommandState_COMMAND_STATE_SUCCEEDED || got.Command.Result.Fields["honked"].GetNumberValue() != 3 {
		t.Errorf("send and wait = %v, %v; want SUCCEEDED with the result", got, err)
	}

	// Waiting on a device that does not answer returns the command as it is.
	d.cancel()
	d.end()
	waitFor(t, func() bool {
		tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-1"})
		return !tw.Twin.Presence.Connected
	})
	start := time.Now()
	got, err = cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk", Wait: durationpb.New(100 * time.Millisecond)})
	if err != nil || got.Command.State != twinv1.CommandState_COMMAND_STATE_QUEUED || time.Since(start) < 100*time.Millisecond {
		t.Errorf("unanswered wait = %v, %v after %v; want QUEUED after the wait", got, err, time.Since(start))
	}

	// Expiry while offline.
	exp, _ := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk", Ttl: durationpb.New(50 * time.Millisecond),
		Wait: durationpb.New(10 * time.Second)})
	if exp.GetCommand().GetState() != twinv1.CommandState_COMMAND_STATE_EXPIRED {
		t.Errorf("command with a 50ms ttl = %v; want EXPIRED", exp)
	}

	// Get and list, by state and paged.
	g, err := cmds.GetCommand(ctx, &twinv1.GetCommandRequest{Id: c1.Command.Id})
	if err != nil || g.Command.State != twinv1.CommandState_COMMAND_STATE_SUCCEEDED {
		t.Errorf("GetCommand = %v, %v", g, err)
	}
	var ids []string
	tokn := ""
	for {
		l, err := cmds.ListCommands(ctx, &twinv1.ListCommandsRequest{DeviceId: "car-1", PageSize: 2, PageToken: tokn,
			States: []twinv1.CommandState{twinv1.CommandState_COMMAND_STATE_SUCCEEDED, twinv1.CommandState_COMMAND_STATE_CANCELED}})
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range l.Commands {
			ids = append(ids, fmt.Sprint(c.Id, " ", c.State))
		}
		if tokn = l.NextPageToken; tokn == "" {
			break
		}
	}
	want := "[car-1~1 COMMAND_STATE_SUCCEEDED car-1~3 COMMAND_STATE_CANCELED car-1~4 COMMAND_STATE_SUCCEEDED]"
	if fmt.Sprint(ids) != want {
		t.Errorf("ListCommands = %v; want %s", ids, want)
	}
	for _, bad := range []string{"", "car-1", "car-1~x", "ghost~1"} {
		_, err := cmds.GetCommand(ctx, &twinv1.GetCommandRequest{Id: bad})
		if c := status.Code(err); c != codes.InvalidArgument && c != codes.NotFound {
			t.Errorf("GetCommand(%q) = %v; want INVALID_ARGUMENT or NOT_FOUND", bad, err)
		}
	}
}

// TestSlowDevice checks that a device that stops reading is cut off once a
// send has waited longer than the send timeout, while another device keeps
// flowing, and that its commands stay queued.
func TestSlowDevice(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, func(o *Options) { o.DeviceSendTimeout = 100 * time.Millisecond })
	cmds := twinv1.NewCommandServiceClient(s.conn)
	slowTok := createDevice(t, s, "slow", "planter")
	fastTok := createDevice(t, s, "fast", "planter")
	slow := connect(t, s, &twinv1.Hello{DeviceId: "slow", Token: slowTok}, false) // never reads
	fast := connect(t, s, &twinv1.Hello{DeviceId: "fast", Token: fastTok}, true)
	fast.next()
	blob := strings.Repeat("x", 60_000)
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; ; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("the slow device was not cut off after %d desired updates", i)
		}
		if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "slow", Patch: mustStruct(t, map[string]any{"n": i, "blob": fmt.Sprint(i, blob)})}); err != nil {
			t.Fatal(err)
		}
		// The fast device is served throughout.
		fast.report(int64(i), fmt.Sprintf(`{"n": %d}`, i))
		if ack := fast.next().GetReportAck(); ack.GetSeq() != int64(i) || ack.GetError() != "" {
			t.Fatalf("fast device ack = %v", ack)
		}
		tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "slow"})
		if !tw.Twin.Presence.Connected {
			break
		}
	}
	var cut error
	for cut == nil { // what was sent before the cut, then the status
		_, cut = slow.stream.Recv()
	}
	if status.Code(cut) != codes.ResourceExhausted || !strings.Contains(cut.Error(), "fell behind") {
		t.Errorf("slow device ended with %v; want RESOURCE_EXHAUSTED saying it fell behind", cut)
	}
	c, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "slow", Name: "water"})
	if err != nil || c.Command.State != twinv1.CommandState_COMMAND_STATE_QUEUED {
		t.Errorf("command to the cut-off device = %v, %v; want QUEUED", c, err)
	}
}

func TestDeviceShutdown(t *testing.T) {
	s := startServer(t, nil, nil)
	tok := createDevice(t, s, "car-1", "car")
	d := connect(t, s, &twinv1.Hello{DeviceId: "car-1", Token: tok}, true)
	d.next()
	done := make(chan error, 1)
	go func() { done <- s.Shutdown() }()
	if err := d.end(); status.Code(err) != codes.Unavailable {
		t.Errorf("stream at shutdown ended with %v; want UNAVAILABLE", err)
	}
	if err := <-done; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

// TestWelcomeComesFirst sends a hello and reports at once, as grpcurl does,
// and checks that the welcome and the queued commands still come before
// any ack.
func TestWelcomeComesFirst(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	tok := createDevice(t, s, "car-1", "car")
	cmds := twinv1.NewCommandServiceClient(s.conn)
	if _, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk"}); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		d := connect(t, s, &twinv1.Hello{DeviceId: "car-1", Token: tok}, true)
		for seq := range 3 {
			d.report(int64(seq), fmt.Sprintf(`{"n": %d}`, i))
		}
		d.stream.CloseSend()
		if m := d.next(); m.GetWelcome() == nil {
			t.Fatalf("round %d: first message %v; want the welcome", i, m)
		}
		if m := d.next(); m.GetCommand() == nil {
			t.Fatalf("round %d: second message %v; want the queued command", i, m)
		}
		for seq := range 3 {
			if ack := d.next().GetReportAck(); ack.GetSeq() != int64(seq) {
				t.Fatalf("round %d: ack %v; want seq %d", i, ack, seq)
			}
		}
		if err := d.end(); err != io.EOF {
			t.Fatalf("round %d: stream ended with %v; want a clean end", i, err)
		}
	}
}

// TestConnectBacklog connects a device with 90 commands queued (the engine
// allows 100): it gets all of them, in order, after the welcome.
func TestConnectBacklog(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	cmds := twinv1.NewCommandServiceClient(s.conn)
	tok := createDevice(t, s, "car-1", "car")
	var want []string
	for i := range 90 {
		c, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "navigate",
			Params: mustStruct(t, map[string]any{"lat": 52.5, "lon": float64(i)})})
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, c.Command.Id)
	}
	d := connect(t, s, &twinv1.Hello{DeviceId: "car-1", Token: tok}, true)
	if w := d.next().GetWelcome(); w == nil {
		t.Fatal("no welcome")
	}
	for i, id := range want {
		if c := d.next().GetCommand(); c.GetId() != id {
			t.Fatalf("command %d = %v; want %s", i, c, id)
		}
	}
	d.report(1, `{"fuel": 0.5}`)
	if ack := d.next().GetReportAck(); ack.GetSeq() != 1 || ack.GetError() != "" {
		t.Errorf("ack after the backlog = %v", ack)
	}
}

// TestDesiredBurst has a rule change desired on every report, and a device
// that reads everything and sends 3,000 reports as fast as the server takes
// them: it is never cut off, every report is acknowledged, and the desired
// updates it gets, applied in order to the welcome's, give the twin's
// desired state.
func TestDesiredBurst(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, func(o *Options) { o.Limits.ReportRate = math.Inf(1) })
	rc := twinv1.NewRuleServiceClient(s.conn)
	_, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: &twinv1.Rule{Id: "echo", Types: []string{"planter"},
		Condition: "has(twin.reported.n)", Trigger: twinv1.Trigger_TRIGGER_WHILE_TRUE,
		Actions: []*twinv1.Action{{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{Patch: "{'echo': twin.reported.n}"}}}}}})
	if err != nil {
		t.Fatal(err)
	}
	tok := createDevice(t, s, "planter-1", "planter")
	d := connect(t, s, &twinv1.Hello{DeviceId: "planter-1", Token: tok}, true)
	desired := d.next().GetWelcome().GetDesired().AsMap()
	const n = 3000
	sendErr := make(chan error, 1)
	go func() {
		for i := range n {
			m := &twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: int64(i), Patch: mustStruct(t, map[string]any{"n": i})}}}
			if err := d.stream.Send(m); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}()
	acks, updates := 0, 0
	for acks < n {
		m := d.next()
		switch {
		case m.GetReportAck() != nil:
			if ack := m.GetReportAck(); ack.Seq != int64(acks) || ack.Error != "" {
				t.Fatalf("ack %d = %v", acks, ack)
			}
			acks++
		case m.GetDesiredUpdate() != nil:
			desired, _ = twin.MergePatch(desired, m.GetDesiredUpdate().GetPatch().AsMap())
			updates++
		}
	}
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
	// The last desired change may follow the last ack.
	for desired["echo"] != float64(n-1) {
		u := d.next().GetDesiredUpdate()
		if u == nil {
			continue
		}
		desired, _ = twin.MergePatch(desired, u.GetPatch().AsMap())
		updates++
	}
	tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "planter-1"})
	if diff := cmp.Diff(tw.Twin.Desired.AsMap(), desired); diff != "" {
		t.Errorf("desired state the device built (-twin +device):\n%s", diff)
	}
	t.Logf("%d desired changes reached the device in %d updates", n, updates)
}

// TestDesiredCoalesced has a device read nothing while its desired state
// changes many times in large steps, so that the server's sends wait for
// it and the changes not yet sent are coalesced; then it reads. Applying
// the updates it gets, in order, to the welcome's desired state gives the
// twin's, including a key removed on the way.
func TestDesiredCoalesced(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	tok := createDevice(t, s, "planter-1", "planter")
	if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "planter-1", Patch: jsonStruct(t, `{"pump": "off", "fan": "on"}`)}); err != nil {
		t.Fatal(err)
	}
	d := connect(t, s, &twinv1.Hello{DeviceId: "planter-1", Token: tok}, false)
	blob := strings.Repeat("x", 60_000)
	const n = 120
	for i := range n {
		patch := map[string]any{"blob": fmt.Sprint(i, blob), "n": i, "pump": "on", "fan": nil}
		if i%2 == 1 {
			patch = map[string]any{"blob": fmt.Sprint(i, blob), "n": i, "pump": nil, "fan": map[string]any{"speed": i}}
		}
		if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "planter-1", Patch: mustStruct(t, patch)}); err != nil {
			t.Fatal(err)
		}
	}
	tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "planter-1"})
	want := tw.Twin.Desired.AsMap()
	m, err := d.stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	desired := m.GetWelcome().GetDesired().AsMap()
	updates := 0
	for !cmp.Equal(desired, want) {
		m, err := d.stream.Recv()
		if err != nil {
			t.Fatalf("after %d updates the device has %v; want %v (%v)", updates, desired["n"], want["n"], err)
		}
		u := m.GetDesiredUpdate()
		desired, _ = twin.MergePatch(desired, u.GetPatch().AsMap())
		if updates++; u.GetVersion() == tw.Twin.Version && !cmp.Equal(desired, want) {
			t.Fatalf("the update of the last version leaves the device with a desired state that differs (-twin +device):\n%s", cmp.Diff(want, desired))
		}
	}
	if _, ok := desired["pump"]; ok {
		t.Errorf("the device still has pump: %v", desired["pump"])
	}
	if updates >= n {
		t.Errorf("%d changes took %d updates; want them coalesced while the device did not read", n, updates)
	}
	t.Logf("%d changes took %d updates", n, updates)
}

// TestSessionCoalesces feeds a session's outbox directly: desired changes
// waiting to be sent become one update, at the place of the first, whose
// patch keeps the removal of a key.
func TestSessionCoalesces(t *testing.T) {
	ss := newSession("planter-1", 0, time.Minute)
	t.Cleanup(func() { ss.sendTimer.Stop() })
	tw := func(v int64, desired twin.Document) *twin.Twin {
		return &twin.Twin{ID: "planter-1", Version: v, Desired: desired, Delta: twin.Document{}}
	}
	cmd := &twin.Command{ID: "planter-1~1", DeviceID: "planter-1", Seq: 1, Name: "water", State: twin.CommandSent}
	ss.Welcome(tw(1, twin.Document{"pump": "off", "fan": "on"}), nil)
	ss.DesiredChanged(tw(2, twin.Document{"pump": "on", "fan": "on"}), twin.Document{"pump": "on"})
	ss.Commands([]*twin.Command{cmd})
	ss.DesiredChanged(tw(3, twin.Document{"fan": "on"}), twin.Document{"pump": nil})
	ss.DesiredChanged(tw(4, twin.Document{"fan": "on", "lamp": "on"}), twin.Document{"lamp": "on"})
	st := &fakeStream{ctx: context.Background()}
	w := &writer{stream: st, ss: ss}
	if err := w.flush(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range st.sent {
		switch {
		case m.GetWelcome() != nil:
			got = append(got, fmt.Sprint("welcome ", m.GetWelcome().GetVersion()))
		case m.GetDesiredUpdate() != nil:
			u := m.GetDesiredUpdate()
			js, _ := u.GetPatch().MarshalJSON()
			got = append(got, fmt.Sprint("desired ", u.GetVersion(), " ", compactJSON(t, js)))
		case m.GetCommand() != nil:
			got = append(got, "command "+m.GetCommand().GetId())
		}
	}
	want := []string{"welcome 1", `desired 4 {"lamp":"on","pump":null}`, "command planter-1~1"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("messages sent (-want +got):\n%s", diff)
	}
}

func compactJSON(t *testing.T, js []byte) string {
	t.Helper()
	var v any
	if err := json.Unmarshal(js, &v); err != nil {
		t.Fatal(err)
	}
	out, _ := json.Marshal(v)
	return string(out)
}

func TestDiffPatch(t *testing.T) {
	shared := map[string]any{"x": 1.0}
	tests := []struct {
		a, b, want string
	}{
		{`{}`, `{}`, `{}`},
		{`{"pump": "off"}`, `{"pump": "off"}`, `{}`},
		{`{"pump": "off"}`, `{"pump": "on"}`, `{"pump": "on"}`},
		{`{"pump": "off", "fan": "on"}`, `{"fan": "on"}`, `{"pump": null}`},
		{`{}`, `{"pump": "on"}`, `{"pump": "on"}`},
		{`{"a": {"b": 1, "c": 2}}`, `{"a": {"b": 1, "d": 3}}`, `{"a": {"c": null, "d": 3}}`},
		// Removed and set again as an object: the old keys go.
		{`{"a": {"x": 5}}`, `{"a": {"b": 1}}`, `{"a": {"b": 1, "x": null}}`},
		{`{"a": 5}`, `{"a": {"b": 1}}`, `{"a": {"b": 1}}`},
		{`{"a": {"b": 1}}`, `{"a": 5}`, `{"a": 5}`},
		{`{"a": {"b": 1}}`, `{"a": {}}`, `{"a": {"b": null}}`},
		{`{"a": {}}`, `{"a": {}}`, `{}`},
		{`{"a": [1, 2]}`, `{"a": [1, 3]}`, `{"a": [1, 3]}`},
		{`{"a": [1, 2]}`, `{"a": [1, 2]}`, `{}`},
		{`{"a": null}`, `{}`, `{"a": null}`},
	}
	for _, tt := range tests {
		a, b := jsonDoc(t, tt.a), jsonDoc(t, tt.b)
		got := diffPatch(a, b)
		js, _ := json.Marshal(got)
		if want := compactJSON(t, []byte(tt.want)); string(js) != want {
			t.Errorf("diffPatch(%s, %s) = %s; want %s", tt.a, tt.b, js, want)
		}
		// Applying the diff to a gives b.
		if applied, _ := twin.MergePatch(a, got); !cmp.Equal(applied, b, cmpopts.EquateEmpty()) {
			t.Errorf("MergePatch(%s, diffPatch(%s, %s)) = %v; want %s", tt.a, tt.a, tt.b, applied, tt.b)
		}
	}
	if got := diffPatch(twin.Document{"s": shared, "y": 1.0}, twin.Document{"s": shared, "y": 2.0}); len(got) != 1 || got["y"] != 2.0 {
		t.Errorf("diffPatch with a shared subtree = %v; want {y: 2}", got)
	}
}

func jsonDoc(t *testing.T, js string) twin.Document {
	t.Helper()
	var d twin.Document
	if err := json.Unmarshal([]byte(js), &d); err != nil {
		t.Fatalf("bad test JSON %s: %v", js, err)
	}
	return d
}

// TestTokenRevokedMidStream connects with token A and rotates the token:
// the stream ends UNAUTHENTICATED, a report sent on it after the rotation
// is not applied nor acknowledged as a success, a new stream with token B
// works and one with A is refused.
func TestTokenRevokedMidStream(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	tokA := createDevice(t, s, "fridge-1", "fridge")
	d := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tokA}, true)
	d.next()
	d.report(1, `{"temp_c": 4}`)
	if ack := d.next().GetReportAck(); ack.GetVersion() == 0 {
		t.Fatalf("ack before the rotation = %v", ack)
	}
	b, err := s.twins.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: "fridge-1"})
	if err != nil {
		t.Fatal(err)
	}
	d.stream.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: 2, Patch: jsonStruct(t, `{"temp_c": 99}`)}}})
	for {
		select {
		case m := <-d.msgs:
			if ack := m.GetReportAck(); ack != nil && ack.GetError() == "" {
				t.Errorf("report on the revoked stream acknowledged: %v", ack)
			}
			continue
		case err := <-d.err:
			if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "token was revoked") {
				t.Errorf("revoked stream ended with %v; want UNAUTHENTICATED saying the token was revoked", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the revoked stream did not end within 10s")
		}
		break
	}
	tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"})
	if got := tw.Twin.Reported.AsMap()["temp_c"]; got != 4.0 {
		t.Errorf("reported temp_c = %v; want 4 (the report after the rotation refused)", got)
	}
	nd := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: b.Token}, true)
	nd.next()
	nd.report(1, `{"temp_c": 5}`)
	if ack := nd.next().GetReportAck(); ack.GetVersion() == 0 || ack.GetError() != "" {
		t.Errorf("ack on the new token's stream = %v", ack)
	}
	old := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tokA}, true)
	if err := old.end(); status.Code(err) != codes.Unauthenticated {
		t.Errorf("stream with the revoked token ended with %v; want UNAUTHENTICATED", err)
	}
}

// fakeStream is a device stream without gRPC, for tests of the handler's
// own goroutines: after the hello, Recv waits until the context ends, and
// Send blocks while block is set.
type fakeStream struct {
	grpc.ServerStream
	ctx   context.Context
	hello *twinv1.ConnectRequest

	mu       sync.Mutex
	sent     []*twinv1.ConnectResponse
	recvd    bool
	block    chan struct{} // if set, Send waits for it to close
	inSend   atomic.Bool
	sending  chan struct{} // gets a token when a Send starts to block
	returned atomic.Bool   // set by the test when the handler returned
	late     atomic.Int32  // Sends after the handler returned
}

func (f *fakeStream) Context() context.Context { return f.ctx }

func (f *fakeStream) Recv() (*twinv1.ConnectRequest, error) {
	f.mu.Lock()
	first := !f.recvd
	f.recvd = true
	f.mu.Unlock()
	if first && f.hello != nil {
		return f.hello, nil
	}
	<-f.ctx.Done()
	return nil, f.ctx.Err()
}

func (f *fakeStream) Send(m *twinv1.ConnectResponse) error {
	if f.returned.Load() {
		f.late.Add(1)
	}
	f.mu.Lock()
	f.sent = append(f.sent, m)
	block := f.block
	f.mu.Unlock()
	if block != nil {
		f.inSend.Store(true)
		select {
		case f.sending <- struct{}{}:
		default:
		}
		select {
		case <-block:
		case <-f.ctx.Done():
		}
		f.inSend.Store(false)
	}
	return nil
}

// TestHandlerWaitsForSend ends a stream (the server begins to shut down)
// while its writer is blocked in Send to a device that does not read: the
// handler marks the device offline, but returns only once Send has
// returned, and nothing is sent after.
func TestHandlerWaitsForSend(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	tok := createDevice(t, s, "fridge-1", "fridge")
	fctx, fcancel := context.WithCancel(ctx)
	t.Cleanup(fcancel) // before the server's Shutdown: the fake device goes away
	f := &fakeStream{ctx: fctx, sending: make(chan struct{}, 1),
		hello: &twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{DeviceId: "fridge-1", Token: tok}}}}
	f.block = make(chan struct{})
	done := make(chan error, 1)
	inSendAtReturn := make(chan bool, 1)
	go func() {
		err := s.devices.Connect(f)
		inSendAtReturn <- f.inSend.Load()
		f.returned.Store(true)
		done <- err
	}()
	select {
	case <-f.sending: // the welcome's Send blocks
	case <-time.After(10 * time.Second):
		t.Fatal("no Send within 10s")
	}
	s.stopping() // streams end, as at the start of Shutdown
	waitFor(t, func() bool {
		tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"})
		return !tw.Twin.Presence.Connected
	})
	var err error
	select {
	case err = <-done:
		t.Error("Connect returned while its writer was blocked in Send")
		close(f.block)
	default:
		close(f.block)
		err = <-done
	}
	if status.Code(err) != codes.Unavailable {
		t.Errorf("Connect = %v; want UNAVAILABLE", err)
	}
	if <-inSendAtReturn {
		t.Error("Connect returned while Send was in progress")
	}
	if n := f.late.Load(); n > 0 {
		t.Errorf("%d Sends after Connect returned", n)
	}
}

// TestShutdownDeviceNotReading shuts the server down while a device that
// does not read holds its stream's writer in Send: Shutdown ends it after
// its timeout, and when Shutdown returns nothing of the stream runs.
func TestShutdownDeviceNotReading(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, func(o *Options) { o.ShutdownTimeout = 100 * time.Millisecond })
	tok := createDevice(t, s, "fridge-1", "fridge")
	d := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, false)
	blob := strings.Repeat("x", 60_000)
	for i := range 100 {
		if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "fridge-1", Patch: mustStruct(t, map[string]any{"blob": fmt.Sprint(i, blob)})}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Shutdown(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if g := deviceGoroutines(); len(g) > 0 {
		t.Errorf("device stream goroutines running after Shutdown:\n%s", strings.Join(g, "\n\n"))
	}
	d.cancel()
}

// deviceGoroutines returns the stacks of the goroutines running device
// stream code of this package.
func deviceGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "server.(*deviceService)") {
			out = append(out, g)
		}
	}
	return out
}

// TestReportWindow has one device flood reports without waiting for acks
// while another, on the same worker, sends one at a time: the flooding
// stream never has more reports in the engine than its window, so the
// other device's reports wait behind at most that many.
func TestReportWindow(t *testing.T) {
	const window = 32 // the default
	s := startServer(t, nil, func(o *Options) { o.Engine.Workers = 1; o.Limits.ReportRate = math.Inf(1) })
	var mu sync.Mutex
	most := map[string]int{}
	s.devices.reportStarted = func(id string, inFlight int) {
		mu.Lock()
		most[id] = max(most[id], inFlight)
		mu.Unlock()
	}
	floodTok := createDevice(t, s, "flood", "planter")
	goodTok := createDevice(t, s, "good", "planter")
	flood := connect(t, s, &twinv1.Hello{DeviceId: "flood", Token: floodTok}, true)
	flood.next()
	good := connect(t, s, &twinv1.Hello{DeviceId: "good", Token: goodTok}, true)
	good.next()
	const floods = 3000
	sent := make(chan error, 1)
	go func() {
		for i := range floods {
			m := &twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: int64(i), Patch: mustStruct(t, map[string]any{"n": i})}}}
			if err := flood.stream.Send(m); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	for i := range 20 {
		good.report(int64(i), fmt.Sprintf(`{"n": %d}`, i))
		if ack := good.next().GetReportAck(); ack.GetSeq() != int64(i) || ack.GetError() != "" {
			t.Fatalf("good device ack = %v", ack)
		}
	}
	for i := range floods {
		if ack := flood.next().GetReportAck(); ack.GetSeq() != int64(i) || ack.GetError() != "" {
			t.Fatalf("flood ack = %v", ack)
		}
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if most["flood"] > window {
		t.Errorf("the flooding stream had up to %d reports in the engine; want at most %d", most["flood"], window)
	}
	if most["flood"] < 2 {
		t.Errorf("the flooding stream had at most %d report in the engine; want reports in flight", most["flood"])
	}
}
