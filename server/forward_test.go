package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/timestamppb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// startOwner runs a real server on a loopback port with its store in a
// temporary directory: the owner a forwarder forwards to.
func startOwner(t *testing.T, mod func(*Options)) (*Server, string) {
	t.Helper()
	opts := Options{DataDir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if mod != nil {
		mod(&opts)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	t.Cleanup(func() {
		if err := s.Shutdown(); err != nil && !strings.Contains(err.Error(), "closed") {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, l.Addr().String()
}

// fwd is a forwarder on a loopback port, and a client of it.
type fwd struct {
	*Forwarder
	addr   string
	conn   *grpc.ClientConn
	ts     *testServer // the owner's server, called through the forwarder
	served chan error
}

func startForwarder(t *testing.T, owner *Server, o ForwardOptions) *fwd {
	t.Helper()
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	f := NewForwarder(o)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- f.Serve(l) }()
	conn, err := grpc.NewClient("passthrough:///"+l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	fw := &fwd{Forwarder: f, addr: l.Addr().String(), conn: conn, served: served,
		ts: &testServer{Server: owner, conn: conn, twins: twinv1.NewTwinServiceClient(conn)}}
	t.Cleanup(func() {
		conn.Close()
		f.Stop()
		if err := <-served; err != nil {
			t.Errorf("Forwarder.Serve: %v", err)
		}
	})
	return fw
}

// ownerAt is an Owner func that always answers addr.
func ownerAt(addr string) func() (string, error) { return func() (string, error) { return addr, nil } }

// TestForwardUnary makes unary calls through a forwarder: answers and
// errors (code and message) are the owner's, unchanged.
func TestForwardUnary(t *testing.T) {
	ctx := testCtx(t)
	owner, addr := startOwner(t, nil)
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr)})
	c := f.ts.twins
	created, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "fridge-1", Type: "fridge", Labels: map[string]string{"site": "berlin"}}})
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(created.Twin, got.Twin, protocmp.Transform()); diff != "" {
		t.Errorf("GetTwin through the forwarder (-created +got):\n%s", diff)
	}
	direct, err := owner.Engine().Get("fridge-1")
	if err != nil || direct.Version != got.Twin.Version {
		t.Errorf("the owner's twin = %v, %v; want version %d", direct, err, got.Twin.Version)
	}

	// Errors: the code and the message are the owner's.
	ownerConn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer ownerConn.Close()
	oc := twinv1.NewTwinServiceClient(ownerConn)
	for name, call := range map[string]func(twinv1.TwinServiceClient) error{
		"NotFound": func(c twinv1.TwinServiceClient) error {
			_, err := c.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "nope"})
			return err
		},
		"StaleVersion": func(c twinv1.TwinServiceClient) error {
			_, err := c.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "fridge-1", Patch: jsonStruct(t, `{"eco": true}`), ExpectedVersion: 7})
			return err
		},
		"InvalidID": func(c twinv1.TwinServiceClient) error {
			_, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "..", Type: "fridge"}})
			return err
		},
	} {
		want, got := status.Convert(call(oc)), status.Convert(call(c))
		if want.Code() == codes.OK || got.Code() != want.Code() || got.Message() != want.Message() {
			t.Errorf("%s through the forwarder = %v; want the owner's %v", name, got, want)
		}
	}
	if _, err := c.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "fridge-1", Patch: jsonStruct(t, `{"eco": true}`), ExpectedVersion: 7}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("a stale expected_version = %v; want FAILED_PRECONDITION", err)
	}
	if tw, _ := owner.Engine().Get("fridge-1"); tw.Version != created.Twin.Version {
		t.Errorf("the refused write changed the twin: version %d; want %d", tw.Version, created.Twin.Version)
	}
}

// TestForwardWatch watches through a forwarder: events flow as they come,
// and a client that cancels ends the owner's stream too.
func TestForwardWatch(t *testing.T) {
	ctx := testCtx(t)
	owner, addr := startOwner(t, nil)
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr)})
	wctx, cancel := context.WithTimeout(ctx, time.Minute) // fails rather than hangs
	defer cancel()
	watch, err := f.ts.twins.WatchTwins(wctx, &twinv1.WatchTwinsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// The watch's headers come through before any event: the watch is in
	// place once they do.
	if _, err := watch.Header(); err != nil {
		t.Fatal(err)
	}
	if got := owner.inflight.String(); got != "WatchTwins×1" {
		t.Errorf("the owner serves %q; want the forwarded watch", got)
	}
	for i, id := range []string{"a", "b"} {
		if _, err := f.ts.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id, Type: "fridge"}}); err != nil {
			t.Fatal(err)
		}
		ev, err := watch.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if ev.Event.GetTwin().GetId() != id || ev.Event.Kind != twinv1.TwinEventKind_TWIN_EVENT_KIND_CREATED {
			t.Errorf("event %d = %v; want %s created", i, ev.Event, id)
		}
	}
	cancel()
	if _, err := watch.Recv(); status.Code(err) != codes.Canceled || wctx.Err() != context.Canceled {
		t.Errorf("a cancelled watch = %v; want CANCELED", err)
	}
	waitFor(t, func() bool { return owner.inflight.String() == "" })
}

// TestForwardDevice runs a device's Connect stream through a forwarder:
// hello and welcome, reports and their acks, a desired change pushed by
// the owner, and the device's disconnection seen by the owner.
func TestForwardDevice(t *testing.T) {
	ctx := testCtx(t)
	owner, addr := startOwner(t, nil)
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr)})
	tok := createDevice(t, f.ts, "fridge-1", "fridge")
	if _, err := f.ts.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "fridge-1", Patch: jsonStruct(t, `{"target_c": 4}`)}); err != nil {
		t.Fatal(err)
	}
	d := connect(t, f.ts, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, true)
	if w := d.next().GetWelcome(); w == nil || w.Version != 2 || !w.DesiredChanged {
		t.Fatalf("welcome = %v; want version 2 with desired changed", w)
	}
	d.report(1, `{"temp_c": 5.5}`)
	d.report(2, `{"`+strings.Repeat("k", 300)+`": 1}`)
	for seq, want := range []struct {
		version int64
		code    string
	}{{3, ""}, {0, "INVALID_ARGUMENT"}} {
		if ack := d.next().GetReportAck(); ack.GetSeq() != int64(seq+1) || ack.GetVersion() != want.version || ack.GetErrorCode() != want.code {
			t.Errorf("ack %d = %v; want version %d code %q", seq+1, ack, want.version, want.code)
		}
	}
	if _, err := f.ts.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "fridge-1", Patch: jsonStruct(t, `{"eco": true}`)}); err != nil {
		t.Fatal(err)
	}
	if u := d.next().GetDesiredUpdate(); u.GetVersion() != 4 || !u.GetPatch().Fields["eco"].GetBoolValue() {
		t.Errorf("desired update = %v; want eco at version 4", u)
	}
	d.send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_DesiredAck{DesiredAck: &twinv1.DesiredAck{Version: 4}}})
	d.report(3, `{"eco": true}`)
	if ack := d.next().GetReportAck(); ack.GetSeq() != 3 || ack.GetVersion() <= 4 || ack.GetErrorCode() != "" {
		t.Errorf("ack 3 = %v; want a version after 4", ack)
	}
	tw, err := owner.Engine().Get("fridge-1")
	if err != nil || !tw.Presence.Connected || tw.DesiredAckedVersion != 4 {
		t.Errorf("the owner's twin = %+v, %v; want connected with desired acked at 4", tw, err)
	}
	d.cancel()
	d.end()
	waitFor(t, func() bool {
		tw, _ := owner.Engine().Get("fridge-1")
		return !tw.Presence.Connected
	})
}

// TestForwardKeys checks that a call's metadata reaches the owner: a
// server with API keys refuses a call without one, and takes one with its
// key, through the forwarder.
func TestForwardKeys(t *testing.T) {
	ctx := testCtx(t)
	owner, addr := startOwner(t, func(o *Options) { o.APIToken = "root" })
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr)})
	if _, err := f.ts.twins.ListTwins(ctx, &twinv1.ListTwinsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("ListTwins without a key = %v; want UNAUTHENTICATED", err)
	}
	if _, err := f.ts.twins.ListTwins(as("wrong"), &twinv1.ListTwinsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("ListTwins with a wrong key = %v; want UNAUTHENTICATED", err)
	}
	who, err := twinv1.NewKeyServiceClient(f.conn).WhoAmI(as("root"), &twinv1.WhoAmIRequest{})
	if err != nil || who.Key.GetName() != "api-token" {
		t.Errorf("WhoAmI with the key = %v, %v; want api-token", who, err)
	}
}

// TestForwardNoOwner: with no owner known, calls fail with UNAVAILABLE and
// Owner's message; once one is, they go through.
func TestForwardNoOwner(t *testing.T) {
	ctx := testCtx(t)
	owner, addr := startOwner(t, nil)
	var known atomic.Bool
	f := startForwarder(t, owner, ForwardOptions{Owner: func() (string, error) {
		if !known.Load() {
			return "", errors.New("no node owns the shards now (an owner is being chosen); retry")
		}
		return addr, nil
	}})
	_, err := f.ts.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "a"})
	if st := status.Convert(err); st.Code() != codes.Unavailable || st.Message() != "no node owns the shards now (an owner is being chosen); retry" {
		t.Errorf("a call with no owner = %v; want UNAVAILABLE with Owner's message", err)
	}
	known.Store(true)
	if _, err := f.ts.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "a"}); status.Code(err) != codes.NotFound {
		t.Errorf("a call with an owner = %v; want the owner's NOT_FOUND", err)
	}
}

// TestForwardLoop: a call already forwarded is refused, not forwarded
// again, so two standbys that each take the other for the owner answer
// UNAVAILABLE instead of passing a call back and forth.
func TestForwardLoop(t *testing.T) {
	ctx := testCtx(t)
	owner, addr := startOwner(t, nil)
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr)})
	marked := metadata.AppendToOutgoingContext(ctx, "twind-forwarded", "1")
	_, err := f.ts.twins.GetTwin(marked, &twinv1.GetTwinRequest{Id: "a"})
	if st := status.Convert(err); st.Code() != codes.Unavailable || st.Message() != "the owner changed; retry" {
		t.Errorf("a forwarded call = %v; want UNAVAILABLE 'the owner changed; retry'", err)
	}
	if owner.inflight.String() != "" {
		t.Errorf("the owner serves %s", owner.inflight.String())
	}

	// Two standbys, each naming the other as the owner. (The deadline
	// fails the test rather than hang it.)
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var bAddr atomic.Value
	a := startForwarder(t, owner, ForwardOptions{Owner: func() (string, error) { return bAddr.Load().(string), nil }})
	b := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(a.addr)})
	bAddr.Store(b.addr)
	_, err = a.ts.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "a"})
	if st := status.Convert(err); st.Code() != codes.Unavailable || st.Message() != "the owner changed; retry" {
		t.Errorf("a call between two standbys = %v; want UNAVAILABLE 'the owner changed; retry'", err)
	}
}

// TestForwardOwnerChange: when the owner changes, a client's next call
// goes to the new one, and its streams to the old one end with UNAVAILABLE
// (so the client reconnects them, to the new owner).
func TestForwardOwnerChange(t *testing.T) {
	ctx := testCtx(t)
	owner1, addr1 := startOwner(t, nil)
	owner2, addr2 := startOwner(t, nil)
	var cur atomic.Value
	cur.Store(addr1)
	f := startForwarder(t, owner1, ForwardOptions{Owner: func() (string, error) { return cur.Load().(string), nil }})
	watch, err := f.ts.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Header(); err != nil {
		t.Fatal(err)
	}
	cur.Store(addr2)
	if _, err := f.ts.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "a", Type: "fridge"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := owner2.Engine().Get("a"); err != nil {
		t.Errorf("the new owner lacks the twin: %v", err)
	}
	if _, err := owner1.Engine().Get("a"); err == nil {
		t.Errorf("the old owner has the twin")
	}
	if _, err := watch.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("a watch on the old owner = %v; want UNAVAILABLE", err)
	}
	waitFor(t, func() bool { return owner1.inflight.String() == "" })
}

// TestForwardHealth: health answers by Healthy, on the forwarder itself.
func TestForwardHealth(t *testing.T) {
	ctx := testCtx(t)
	owner, addr := startOwner(t, nil)
	var healthy atomic.Bool
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr), Healthy: healthy.Load})
	hc := healthpb.NewHealthClient(f.conn)
	for _, want := range []healthpb.HealthCheckResponse_ServingStatus{healthpb.HealthCheckResponse_NOT_SERVING, healthpb.HealthCheckResponse_SERVING} {
		healthy.Store(want == healthpb.HealthCheckResponse_SERVING)
		for _, svc := range []string{"", "twin.v1.TwinService"} {
			resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
			if err != nil || resp.Status != want {
				t.Errorf("Check(%q) = %v, %v; want %v", svc, resp, err, want)
			}
		}
	}
	// A Watch follows Healthy.
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := hc.Watch(wctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := w.Recv(); err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Watch = %v, %v; want SERVING", resp, err)
	}
	healthy.Store(false)
	if resp, err := w.Recv(); err != nil || resp.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("Watch after Healthy turned false = %v, %v; want NOT_SERVING", resp, err)
	}
	if owner.inflight.String() != "" {
		t.Errorf("health was forwarded: the owner serves %s", owner.inflight.String())
	}
}

// TestForwardStop: Stop ends the streams through the forwarder with
// UNAVAILABLE, and the owner's ends too.
func TestForwardStop(t *testing.T) {
	ctx := testCtx(t)
	owner, addr := startOwner(t, nil)
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr)})
	tok := createDevice(t, f.ts, "fridge-1", "fridge")
	d := connect(t, f.ts, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, true)
	if d.next().GetWelcome() == nil {
		t.Fatal("no welcome")
	}
	watch, err := f.ts.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Header(); err != nil {
		t.Fatal(err)
	}
	f.Stop()
	if err := <-f.served; err != nil {
		t.Errorf("Serve after Stop = %v; want nil", err)
	}
	f.served <- nil // for the cleanup
	if _, err := watch.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("a watch at Stop = %v; want UNAVAILABLE", err)
	}
	if err := d.end(); status.Code(err) != codes.Unavailable {
		t.Errorf("a device stream at Stop = %v; want UNAVAILABLE", err)
	}
	waitFor(t, func() bool { return owner.inflight.String() == "" })
	if _, err := f.ts.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"}); status.Code(err) != codes.Unavailable {
		t.Errorf("a call after Stop = %v; want UNAVAILABLE", err)
	}
}

// TestForwardReflection lists the owner's services through the forwarder,
// as grpcurl does.
func TestForwardReflection(t *testing.T) {
	owner, addr := startOwner(t, nil)
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr)})
	rc, err := reflectionpb.NewServerReflectionClient(f.conn).ServerReflectionInfo(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := rc.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.Name)
	}
	for _, want := range []string{"twin.v1.TwinService", "twin.v1.DeviceService", "twin.v1.ClusterService"} {
		if !strings.Contains(strings.Join(names, " "), want) {
			t.Errorf("reflection lists %v; want %s among them", names, want)
		}
	}
	if err := rc.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "twin.v1.TwinService"}}); err != nil {
		t.Fatal(err)
	}
	if resp, err := rc.Recv(); err != nil || len(resp.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
		t.Errorf("FileContainingSymbol = %v, %v; want a file", resp, err)
	}
	rc.CloseSend()
	if _, err := rc.Recv(); err != io.EOF {
		t.Errorf("the reflection stream ended with %v; want io.EOF", err)
	}
}

// TestClusterStatus: a twind alone answers FAILED_PRECONDITION; with a
// source, the source's answer; and a forwarder answers from its own
// source, without forwarding.
func TestClusterStatus(t *testing.T) {
	ctx := testCtx(t)
	alone := startServer(t, nil, nil)
	_, err := twinv1.NewClusterServiceClient(alone.conn).GetClusterStatus(ctx, &twinv1.GetClusterStatusRequest{})
	if st := status.Convert(err); st.Code() != codes.FailedPrecondition || !strings.Contains(st.Message(), "--cluster-peers") {
		t.Errorf("GetClusterStatus alone = %v; want FAILED_PRECONDITION naming the flags", err)
	}
	status1 := &twinv1.GetClusterStatusResponse{Node: "n1", Owner: "n1", LogLast: 42, VirtualShards: 256, Nodes: []*twinv1.ClusterNode{
		{Name: "n1", Addr: "10.0.0.1:50051", Role: "owner", Applied: 42, ShardsOwned: 256, Updated: timestamppb.New(time.Unix(1e9, 0))},
		{Name: "n2", Addr: "10.0.0.2:50051", Role: "standby", Applied: 40, Lag: 2, Updated: timestamppb.New(time.Unix(1e9, 0))},
	}}
	owner, addr := startOwner(t, func(o *Options) {
		o.APIToken = "root"
		o.ClusterStatus = func(context.Context) (*twinv1.GetClusterStatusResponse, error) { return status1, nil }
	})
	got, err := twinv1.NewClusterServiceClient(clientOf(t, addr)).GetClusterStatus(as("root"), &twinv1.GetClusterStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(status1, got, protocmp.Transform()); diff != "" {
		t.Errorf("GetClusterStatus (-want +got):\n%s", diff)
	}
	// On the forwarder: its own view, and an error of the source.
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr), ClusterStatus: func(ctx context.Context) (*twinv1.GetClusterStatusResponse, error) {
		return nil, errors.New("the cluster's log is not reachable")
	}})
	_, err = twinv1.NewClusterServiceClient(f.conn).GetClusterStatus(ctx, &twinv1.GetClusterStatusRequest{})
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "not reachable") {
		t.Errorf("GetClusterStatus on the forwarder = %v; want its source's error as UNAVAILABLE", err)
	}
	// Over HTTP/JSON too.
	req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/twin.v1.ClusterService/GetClusterStatus", strings.NewReader("{}"))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer root")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"log_last":"42"`) {
		t.Errorf("GetClusterStatus over HTTP = %d %s", resp.StatusCode, body)
	}
}

// TestForwardHTTP: HTTP/JSON calls and the console go through the
// forwarder to the owner.
func TestForwardHTTP(t *testing.T) {
	owner, addr := startOwner(t, func(o *Options) { o.APIToken = "root" })
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr)})
	post := func(path, body, key string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, "http://"+f.addr+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := post("/twin.v1.TwinService/CreateTwin", `{"twin": {"id": "f1", "type": "fridge"}}`, "root"); code != http.StatusOK || !strings.Contains(body, `"id":"f1"`) {
		t.Errorf("CreateTwin over HTTP = %d %s", code, body)
	}
	if code, body := post("/twin.v1.TwinService/GetTwin", `{"id": "f1"}`, ""); code != http.StatusUnauthorized {
		t.Errorf("GetTwin over HTTP without a key = %d %s; want 401", code, body)
	}
	if code, body := post("/twin.v1.TwinService/GetTwin", `{"id": "nope"}`, "root"); code != http.StatusNotFound || !strings.Contains(body, `"not_found"`) {
		t.Errorf("GetTwin of no twin over HTTP = %d %s; want 404 not_found", code, body)
	}
	resp, err := http.Get("http://" + f.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Errorf("the console through the forwarder = %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
}

// clientOf dials addr for the test.
func clientOf(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestForwardOwnerEnds: when the owner ends a stream (here, as it shuts
// down), the client sees the owner's status.
func TestForwardOwnerEnds(t *testing.T) {
	owner, addr := startOwner(t, nil)
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr)})
	watch, err := f.ts.twins.WatchTwins(testCtx(t), &twinv1.WatchTwinsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Header(); err != nil {
		t.Fatal(err)
	}
	owner.Shutdown()
	_, err = watch.Recv()
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "shutting down") {
		t.Errorf("a watch whose owner shut down = %v; want the owner's UNAVAILABLE", err)
	}
}

// TestForwardCall checks, on an owner that records what it receives, what
// a forwarded call carries: the client's metadata and deadline, and the
// mark of a forwarded call, without the forwarder's own hop headers; and
// what comes back: the owner's headers, trailers and status with its
// details.
func TestForwardCall(t *testing.T) {
	type seen struct {
		md       metadata.MD
		deadline time.Time
	}
	calls := make(chan seen, 1)
	detail := &twinv1.Twin{Id: "detail"}
	owner := grpc.NewServer(grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
		md, _ := metadata.FromIncomingContext(ss.Context())
		d, _ := ss.Context().Deadline()
		calls <- seen{md, d}
		ss.SendHeader(metadata.Pairs("x-owner-header", "h"))
		ss.SetTrailer(metadata.Pairs("x-owner-trailer", "t"))
		st, _ := status.New(codes.Aborted, "the owner says no").WithDetails(detail)
		return st.Err()
	}))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go owner.Serve(l)
	defer owner.Stop()
	f := startForwarder(t, nil, ForwardOptions{Owner: ownerAt(l.Addr().String())})

	deadline := time.Now().Add(time.Hour)
	ctx, cancel := context.WithDeadline(metadata.AppendToOutgoingContext(context.Background(),
		"authorization", "Bearer k", "x-custom", "v", "x-bin-bin", "\x00\x01"), deadline)
	defer cancel()
	var header, trailer metadata.MD
	_, err = f.ts.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "a"}, grpc.Header(&header), grpc.Trailer(&trailer))
	st := status.Convert(err)
	if st.Code() != codes.Aborted || st.Message() != "the owner says no" || len(st.Details()) != 1 ||
		!cmp.Equal(st.Details()[0], detail, protocmp.Transform()) {
		t.Errorf("the call = %v %v; want the owner's ABORTED with its detail", st, st.Details())
	}
	if header.Get("x-owner-header")[0] != "h" || trailer.Get("x-owner-trailer")[0] != "t" {
		t.Errorf("header %v, trailer %v; want the owner's", header, trailer)
	}
	got := <-calls
	for k, want := range map[string]string{"authorization": "Bearer k", "x-custom": "v", "x-bin-bin": "\x00\x01", "twind-forwarded": "1"} {
		if v := got.md.Get(k); len(v) != 1 || v[0] != want {
			t.Errorf("the owner got %s = %q; want [%q]", k, v, want)
		}
	}
	for _, k := range []string{"user-agent", "content-type"} {
		if v := got.md.Get(k); len(v) != 1 {
			t.Errorf("the owner got %s = %q; want one value (the forwarder's own)", k, v)
		}
	}
	if d := got.deadline.Sub(deadline); got.deadline.IsZero() || d > time.Second || d < -time.Second {
		t.Errorf("the owner's deadline = %v; want the client's %v", got.deadline, deadline)
	}
}

// TestForwardTooLarge: a message over the forwarder's MaxRecvMsgSize is
// refused there with RESOURCE_EXHAUSTED, and the owner's call ends.
func TestForwardTooLarge(t *testing.T) {
	owner, addr := startOwner(t, nil)
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr), MaxRecvMsgSize: 1 << 10})
	_, err := f.ts.twins.CreateTwin(testCtx(t), &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "a", Type: strings.Repeat("x", 2<<10)}})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a request over the limit = %v; want RESOURCE_EXHAUSTED", err)
	}
	waitFor(t, func() bool { return owner.inflight.String() == "" })
	if _, err := owner.Engine().Get("a"); err == nil {
		t.Error("the owner created the twin")
	}
}

// testCtx bounds a test's calls, so that a test whose stream never gets
// what it waits for fails instead of hanging.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// TestForwardHTTPStream: a Connect server stream (WatchTwins, as the
// console calls it) flows through the forwarder: its headers as soon as
// the watch is in place, then each event as it comes.
func TestForwardHTTPStream(t *testing.T) {
	ctx := testCtx(t)
	owner, addr := startOwner(t, nil)
	f := startForwarder(t, owner, ForwardOptions{Owner: ownerAt(addr)})
	body := []byte("{}")
	frame := append([]byte{0, 0, 0, 0, byte(len(body))}, body...)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+f.addr+"/twin.v1.TwinService/WatchTwins", bytes.NewReader(frame))
	req.Header.Set("Content-Type", "application/connect+json")
	req.Header.Set("Connect-Protocol-Version", "1")
	resp, err := http.DefaultClient.Do(req) // returns on the headers
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("WatchTwins over Connect = %d", resp.StatusCode)
	}
	if _, err := f.ts.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "f1", Type: "fridge"}}); err != nil {
		t.Fatal(err)
	}
	var head [5]byte
	if _, err := io.ReadFull(resp.Body, head[:]); err != nil {
		t.Fatal(err)
	}
	msg := make([]byte, binary.BigEndian.Uint32(head[1:]))
	if _, err := io.ReadFull(resp.Body, msg); err != nil {
		t.Fatal(err)
	}
	if head[0] != 0 || !strings.Contains(string(msg), `"id":"f1"`) {
		t.Errorf("the first frame = %d %s; want the event of f1", head[0], msg)
	}
	resp.Body.Close()
	waitFor(t, func() bool { return owner.inflight.String() == "" })
}

// TestForwardRetiresOldOwner: once the owner changes, a stream through the
// forwarder to the old owner ends with UNAVAILABLE by itself, without a
// new call on its connection, so that its client goes to the new owner
// rather than wait on an old owner that is paused or cut off.
func TestForwardRetiresOldOwner(t *testing.T) {
	ctx := testCtx(t)
	owner1, addr1 := startOwner(t, nil)
	_, addr2 := startOwner(t, nil)
	var cur atomic.Value
	cur.Store(addr1)
	f := startForwarder(t, owner1, ForwardOptions{Owner: func() (string, error) { return cur.Load().(string), nil }})
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	watch, err := f.ts.twins.WatchTwins(wctx, &twinv1.WatchTwinsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Header(); err != nil {
		t.Fatal(err)
	}
	cur.Store(addr2)
	if _, err := watch.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("a watch on the old owner, 10 s after the owner changed = %v; want UNAVAILABLE", err)
	}
}
