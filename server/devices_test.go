package server

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
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
	}{{3, ""}, {0, "InvalidArgument"}, {4, ""}} {
		ack := d.next().GetReportAck()
		if ack.GetSeq() != int64(seq+1) || ack.GetVersion() != want.version || ack.GetErrorCode() != want.code {
			t.Errorf("ack %d = %v; want version %d code %q", seq+1, ack, want.version, want.code)
		}
	}

	// Desired changes arrive in version order.
	for i := range 3 {
		if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "fridge-1", Patch: mustStruct(t, map[string]any{"target_c": i})}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 3 {
		u := d.next().GetDesiredUpdate()
		if u.GetVersion() != int64(5+i) || u.GetPatch().Fields["target_c"].GetNumberValue() != float64(i) {
			t.Errorf("desired update %d = %v; want version %d target_c %d", i, u, 5+i, i)
		}
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

// TestSlowDevice checks that a device that stops reading is cut off while
// another device keeps flowing, and that its commands stay queued.
func TestSlowDevice(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, func(o *Options) { o.DeviceSendQueue = 8 })
	cmds := twinv1.NewCommandServiceClient(s.conn)
	slowTok := createDevice(t, s, "slow", "planter")
	fastTok := createDevice(t, s, "fast", "planter")
	slow := connect(t, s, &twinv1.Hello{DeviceId: "slow", Token: slowTok}, false) // never reads
	fast := connect(t, s, &twinv1.Hello{DeviceId: "fast", Token: fastTok}, true)
	fast.next()
	big := mustStruct(t, map[string]any{"blob": strings.Repeat("x", 60_000)})
	var cut error
	for i := 0; cut == nil; i++ {
		if i == 500 {
			t.Fatal("the slow device was not cut off after 500 desired updates")
		}
		if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "slow", Patch: mustStruct(t, map[string]any{"n": i, "blob": big.AsMap()["blob"]})}); err != nil {
			t.Fatal(err)
		}
		// The fast device is served throughout.
		fast.report(int64(i), fmt.Sprintf(`{"n": %d}`, i))
		if ack := fast.next().GetReportAck(); ack.GetSeq() != int64(i) || ack.GetError() != "" {
			t.Fatalf("fast device ack = %v", ack)
		}
		tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "slow"})
		if !tw.Twin.Presence.Connected {
			_, cut = slow.stream.Recv() // drain until the status
			for cut == nil {
				_, cut = slow.stream.Recv()
			}
		}
	}
	if status.Code(cut) != codes.ResourceExhausted || !strings.Contains(cut.Error(), "fell behind") {
		t.Errorf("slow device ended with %v; want RESOURCE_EXHAUSTED", cut)
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
