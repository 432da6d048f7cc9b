package server

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/cockroachdb/pebble/v2/vfs"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin/vfstest"
)

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a logger.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestOperatorLogs: refused calls and requests grpc-go cannot decode are
// logged, sampled, with what an operator needs to act (issue 13).
func TestOperatorLogs(t *testing.T) {
	ctx := context.Background()
	var logs syncBuffer
	s := startServer(t, nil, func(o *Options) {
		o.APIToken = "s3cret"
		o.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	for range 50 {
		if _, err := s.twins.ListTwins(ctx, &twinv1.ListTwinsRequest{}); status.Code(err) != codes.Unauthenticated {
			t.Fatalf("ListTwins without a token = %v; want UNAUTHENTICATED", err)
		}
	}
	out := logs.String()
	if n := strings.Count(out, "authentication failed"); n == 0 || n > 10 {
		t.Errorf("50 refused calls logged %d lines; want between 1 and 10 (sampled)\n%s", n, out)
	}
	if !strings.Contains(out, "method=/twin.v1.TwinService/ListTwins") {
		t.Errorf("the refusal log does not name the method:\n%s", out)
	}

	// A patch nested deeper than protobuf's recursion limit.
	deep := &structpb.Struct{}
	for range 6000 {
		deep = &structpb.Struct{Fields: map[string]*structpb.Value{"a": structpb.NewStructValue(deep)}}
	}
	_, err := s.twins.UpdateDesired(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer s3cret"), &twinv1.UpdateDesiredRequest{Id: "x", Patch: deep})
	if status.Code(err) != codes.Internal {
		t.Fatalf("a patch nested 6,000 deep = %v; want INTERNAL (grpc-go's answer)", err)
	}
	// The stats handler may log just after the client has its answer.
	waitFor(t, func() bool {
		out := logs.String()
		return strings.Contains(out, "could not be decoded") && strings.Contains(out, "method=/twin.v1.TwinService/UpdateDesired")
	})
}

// TestShutdownNamesWhatItWaitsFor: a shutdown that times out says which
// calls it still waits for, then cancels them and waits for their handlers
// before it closes the store (issue 13, and issue 8 item 21).
func TestShutdownNamesWhatItWaitsFor(t *testing.T) {
	ctx := context.Background()
	var logs syncBuffer
	gate := vfstest.NewGate(vfs.NewMem())
	s := startServer(t, gate, func(o *Options) {
		o.ShutdownTimeout = 200 * time.Millisecond
		o.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	createDevice(t, s, "car-1", "car")
	// A report whose commit cannot become durable (its WAL sync is held)
	// keeps its call in flight through the shutdown's timeout.
	gate.Hold()
	defer gate.Release()
	waiting := make(chan error, 1)
	go func() {
		_, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "car-1", Patch: jsonStruct(t, `{"speed_kmh": 50}`)})
		waiting <- err
	}()
	gate.AwaitHeld(t)
	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown() }()
	if err := <-waiting; err == nil {
		t.Errorf("ReportState in flight through a shutdown that cancelled it succeeded; want an error")
	}
	waitFor(t, func() bool { return strings.Contains(logs.String(), "waiting_for=ReportState×1") })
	gate.Release() // the store can close
	if err := <-shut; err != nil {
		t.Errorf("Shutdown = %v", err)
	}
}

// TestShutdownEndsCommandWait: a SendCommand waiting for its device ends
// when shutdown begins, with the command as it then is, rather than hold
// the shutdown for its whole timeout.
func TestShutdownEndsCommandWait(t *testing.T) {
	ctx := context.Background()
	var logs syncBuffer
	s := startServer(t, nil, func(o *Options) {
		o.ShutdownTimeout = time.Minute
		o.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	createDevice(t, s, "car-1", "car")
	cmds := twinv1.NewCommandServiceClient(s.conn)
	waiting := make(chan *twinv1.SendCommandResponse, 1)
	go func() {
		r, _ := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk", Wait: durationpb.New(time.Minute)})
		waiting <- r
	}()
	waitFor(t, func() bool { return s.inflight.String() != "" })
	waitFor(t, func() bool {
		l, _ := cmds.ListCommands(ctx, &twinv1.ListCommandsRequest{DeviceId: "car-1"})
		return len(l.GetCommands()) == 1
	})
	if err := s.Shutdown(); err != nil { // with a minute's timeout, it would hang the test
		t.Fatal(err)
	}
	if r := <-waiting; r.GetCommand().GetState() != twinv1.CommandState_COMMAND_STATE_QUEUED {
		t.Errorf("SendCommand at shutdown = %v; want the command as it stood (QUEUED)", r)
	}
	if strings.Contains(logs.String(), "waiting_for") {
		t.Errorf("shutdown waited for calls:\n%s", logs.String())
	}
}

// TestDeviceLogs: a refused device stream and a device cut off are logged
// with the device and the reason (issue 13).
func TestDeviceLogs(t *testing.T) {
	ctx := context.Background()
	var logs syncBuffer
	s := startServer(t, nil, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	tok := createDevice(t, s, "fridge-1", "fridge")
	bad := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: "wrong"}, true)
	if err := bad.end(); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("wrong token: %v; want UNAUTHENTICATED", err)
	}
	waitFor(t, func() bool { return strings.Contains(logs.String(), "device stream refused") })

	d := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, true)
	d.next() // the welcome
	if _, err := s.twins.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: "fridge-1"}); err != nil {
		t.Fatal(err)
	}
	if err := d.end(); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("stream after its token was revoked: %v; want UNAUTHENTICATED", err)
	}
	waitFor(t, func() bool {
		out := logs.String()
		return strings.Contains(out, `msg="device disconnected" device=fridge-1 code=Unauthenticated`) && strings.Contains(out, "revoked")
	})
}

// TestBadCommandUpdateEndsStream: a command update no retry can fix (over
// the result limit, a state a device may not set) ends the device's stream
// with INVALID_ARGUMENT saying why, instead of vanishing; a late update of
// a finished command is still ignored quietly.
func TestBadCommandUpdateEndsStream(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	tok := createDevice(t, s, "car-1", "car")
	cmds := twinv1.NewCommandServiceClient(s.conn)
	c, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		u    *twinv1.CommandUpdate
		want string
	}{
		{"result over 16 KiB", &twinv1.CommandUpdate{CommandId: c.Command.Id, State: twinv1.CommandState_COMMAND_STATE_SUCCEEDED,
			Result: jsonStruct(t, `{"blob": "`+strings.Repeat("x", 17<<10)+`"}`)}, "over the command limit"},
		{"state QUEUED", &twinv1.CommandUpdate{CommandId: c.Command.Id, State: twinv1.CommandState_COMMAND_STATE_QUEUED}, "may set a command"},
	} {
		d := connect(t, s, &twinv1.Hello{DeviceId: "car-1", Token: tok}, true)
		d.next() // welcome
		d.next() // the command
		d.send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_CommandUpdate{CommandUpdate: tt.u}})
		if err := d.end(); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: stream ended with %v; want INVALID_ARGUMENT saying %q", tt.name, err, tt.want)
		}
	}
	got, err := cmds.GetCommand(ctx, &twinv1.GetCommandRequest{Id: c.Command.Id})
	if err != nil || got.Command.State != twinv1.CommandState_COMMAND_STATE_SENT {
		t.Errorf("command after refused updates = %v, %v; want it still SENT", got, err)
	}
}

// TestSendCommandWaitEnds: a wait longer than 5 minutes is refused, and a
// wait ends as soon as the twin, and with it the command, is deleted.
func TestSendCommandWaitEnds(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	createDevice(t, s, "car-1", "car")
	cmds := twinv1.NewCommandServiceClient(s.conn)
	if _, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk", Wait: durationpb.New(time.Hour)}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("SendCommand waiting an hour = %v; want INVALID_ARGUMENT", err)
	}
	waited := make(chan error, 1)
	go func() {
		_, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk", Wait: durationpb.New(time.Minute)})
		waited <- err
	}()
	waitFor(t, func() bool { return strings.Contains(s.inflight.String(), "SendCommand") })
	waitFor(t, func() bool {
		l, _ := cmds.ListCommands(ctx, &twinv1.ListCommandsRequest{DeviceId: "car-1"})
		return len(l.GetCommands()) == 1
	})
	if _, err := s.twins.DeleteTwin(ctx, &twinv1.DeleteTwinRequest{Id: "car-1"}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-waited:
		if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), "deleted") {
			t.Errorf("SendCommand waiting while its twin is deleted = %v; want NOT_FOUND saying it was deleted", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("SendCommand kept waiting after its twin was deleted")
	}
	if _, err := cmds.GetCommand(ctx, &twinv1.GetCommandRequest{Id: "car-1~01"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("GetCommand(car-1~01) = %v; want INVALID_ARGUMENT (the id is car-1~1)", err)
	}
}

// TestBearerSchemeCaseInsensitive: "bearer" is "Bearer" (RFC 7235).
func TestBearerSchemeCaseInsensitive(t *testing.T) {
	s := startServer(t, nil, func(o *Options) { o.APIToken = "s3cret" })
	for _, h := range []string{"bearer s3cret", "BEARER s3cret", "Bearer s3cret"} {
		ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", h)
		if _, err := s.twins.ListTwins(ctx, &twinv1.ListTwinsRequest{}); err != nil {
			t.Errorf("ListTwins with %q = %v; want OK", h, err)
		}
	}
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Basic s3cret")
	if _, err := s.twins.ListTwins(ctx, &twinv1.ListTwinsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("ListTwins with a Basic scheme = %v; want UNAUTHENTICATED", err)
	}
}

// TestShutdownEndsHealthWatch: a client watching health does not hold a
// graceful shutdown to its timeout.
func TestShutdownEndsHealthWatch(t *testing.T) {
	var logs syncBuffer
	s := startServer(t, nil, func(o *Options) {
		o.ShutdownTimeout = time.Minute // a held shutdown would hang the test
		o.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	w, err := healthpb.NewHealthClient(s.conn).Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := w.Recv(); err != nil || r.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health watch = %v, %v; want SERVING", r, err)
	}
	if err := s.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs.String(), "waiting_for") {
		t.Errorf("shutdown waited for calls:\n%s", logs.String())
	}
}
