package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/structpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// testServer is a real server on an in-memory store, served over bufconn.
type testServer struct {
	*Server
	conn  *grpc.ClientConn
	twins twinv1.TwinServiceClient
	// dialer dials the server, for more connections.
	dialer func(context.Context, string) (net.Conn, error)
}

func startServer(t testing.TB, fs vfs.FS, mod func(*Options)) *testServer {
	t.Helper()
	if fs == nil {
		fs = vfs.NewMem()
	}
	opts := Options{DataDir: "db", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	opts.Engine.FS = fs
	if mod != nil {
		mod(&opts)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	l := bufconn.Listen(1 << 20)
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	dialer := func(ctx context.Context, _ string) (net.Conn, error) { return l.DialContext(ctx) }
	conn, err := grpc.NewClient("passthrough:///bufnet", grpc.WithContextDialer(dialer),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: s, conn: conn, twins: twinv1.NewTwinServiceClient(conn), dialer: dialer}
	t.Cleanup(func() {
		conn.Close()
		if err := s.Shutdown(); err != nil && !strings.Contains(err.Error(), "closed") {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ts
}

func mustStruct(t testing.TB, m map[string]any) *structpb.Struct {
	t.Helper()
	s, err := structpb.NewStruct(m)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func jsonStruct(t testing.TB, js string) *structpb.Struct {
	t.Helper()
	s := &structpb.Struct{}
	if err := s.UnmarshalJSON([]byte(js)); err != nil {
		t.Fatalf("bad test JSON %s: %v", js, err)
	}
	return s
}

func TestTwinServiceFlow(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	c := s.twins

	created, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{
		Id: "fridge-1", Type: "fridge", Labels: map[string]string{"site": "berlin"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if created.Twin.Version != 1 || created.Twin.CreateTime == nil {
		t.Errorf("created twin %v; want version 1 with a create_time", created.Twin)
	}
	des, err := c.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "fridge-1", Patch: jsonStruct(t, `{"target_c": 4, "eco": true}`)})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: "fridge-1",
		Patch: jsonStruct(t, `{"temp_c": 9.5, "door": "open", "target_c": 4}`), ExpectedVersion: des.Twin.Version})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(jsonStruct(t, `{"eco": true}`), rep.Twin.Delta, protocmp.Transform()); diff != "" {
		t.Errorf("delta (-want +got):\n%s", diff)
	}
	if m := rep.Twin.Metadata.GetReported()["/temp_c"]; m.GetVersion() != 3 || m.GetUpdateTime() == nil {
		t.Errorf("metadata of /temp_c = %v; want version 3 with a time", m)
	}
	if _, err := c.UpdateTwin(ctx, &twinv1.UpdateTwinRequest{Id: "fridge-1", Labels: map[string]string{"owner": "ops"}}); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if _, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{
			Id: fmt.Sprintf("car-%d", i), Type: "car", Reported: mustStruct(t, map[string]any{"fuel": float64(i) / 10}),
		}}); err != nil {
			t.Fatal(err)
		}
	}

	// List with a filter, paging through.
	var ids []string
	tok := ""
	for {
		resp, err := c.ListTwins(ctx, &twinv1.ListTwinsRequest{Filter: `twin.type == "car" && twin.reported.fuel < 0.35`, PageSize: 2, PageToken: tok})
		if err != nil {
			t.Fatal(err)
		}
		for _, tw := range resp.Twins {
			ids = append(ids, tw.Id)
		}
		if tok = resp.NextPageToken; tok == "" {
			break
		}
	}
	if diff := cmp.Diff([]string{"car-0", "car-1", "car-2", "car-3"}, ids); diff != "" {
		t.Errorf("filtered list (-want +got):\n%s", diff)
	}
	resp, err := c.ListTwins(ctx, &twinv1.ListTwinsRequest{Filter: `twin.labels.?owner.orValue("") == "ops" && twin.reported.temp_c > 8.0`})
	if err != nil || len(resp.Twins) != 1 || resp.Twins[0].Id != "fridge-1" {
		t.Errorf("ListTwins(owner ops, warm) = %v, %v; want fridge-1", resp, err)
	}

	// History, newest first, paged.
	var versions []int64
	tok = ""
	for {
		h, err := c.ListTwinHistory(ctx, &twinv1.ListTwinHistoryRequest{Id: "fridge-1", PageSize: 3, PageToken: tok})
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range h.Events {
			versions = append(versions, ev.Twin.Version)
		}
		if tok = h.NextPageToken; tok == "" {
			break
		}
	}
	if diff := cmp.Diff([]int64{4, 3, 2, 1}, versions); diff != "" {
		t.Errorf("history versions (-want +got):\n%s", diff)
	}

	tok1, err := c.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: "fridge-1"})
	if err != nil || len(tok1.Token) < 32 {
		t.Fatalf("IssueDeviceToken = %v, %v", tok1, err)
	}
	got, _ := c.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"})
	if got.Twin.Version != 4 {
		t.Errorf("issuing a token moved the version to %d; want 4", got.Twin.Version)
	}

	if _, err := c.DeleteTwin(ctx, &twinv1.DeleteTwinRequest{Id: "car-4", ExpectedVersion: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-4"}); status.Code(err) != codes.NotFound {
		t.Errorf("GetTwin(deleted) = %v; want NOT_FOUND", err)
	}

	// Health and reflection are served.
	h, err := healthpb.NewHealthClient(s.conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "twin.v1.TwinService"})
	if err != nil || h.Status != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health = %v, %v; want SERVING", h, err)
	}
}

func TestTwinServiceErrors(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, func(o *Options) { o.Engine.Limits.MaxDocumentBytes = 1024 })
	c := s.twins
	if _, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "p1", Type: "planter"}}); err != nil {
		t.Fatal(err)
	}
	deep := `{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":{"l":{"m":{"n":{"o":{"p":{"q":1}}}}}}}}}}}}}}}}}`
	tests := []struct {
		name string
		call func() error
		code codes.Code
		msg  string // a part of the message
	}{
		{"create without twin", func() error { _, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{}); return err }, codes.InvalidArgument, "twin is required"},
		{"create with empty id", func() error {
			_, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{}})
			return err
		}, codes.InvalidArgument, "id is empty"},
		{"create with bad id", func() error {
			_, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "a b"}})
			return err
		}, codes.InvalidArgument, "[A-Za-z0-9._:-]"},
		{"create with long id", func() error {
			_, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: strings.Repeat("x", 129)}})
			return err
		}, codes.InvalidArgument, "1 to 128"},
		{"create twice", func() error {
			_, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "p1"}})
			return err
		}, codes.AlreadyExists, "already exists"},
		{"create with bad label", func() error {
			_, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "p2", Labels: map[string]string{"a b": "c"}}})
			return err
		}, codes.InvalidArgument, "label key"},
		{"get unknown", func() error { _, err := c.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "nope"}); return err }, codes.NotFound, `"nope" does not exist`},
		{"report unknown", func() error {
			_, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: "nope", Patch: jsonStruct(t, `{"a":1}`)})
			return err
		}, codes.NotFound, "does not exist"},
		{"report without patch", func() error {
			_, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: "p1"})
			return err
		}, codes.InvalidArgument, "patch is required"},
		{"report too deep", func() error {
			_, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: "p1", Patch: jsonStruct(t, deep)})
			return err
		}, codes.InvalidArgument, "depth limit of 16"},
		{"report too big", func() error {
			_, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: "p1", Patch: mustStruct(t, map[string]any{"x": strings.Repeat("y", 2000)})})
			return err
		}, codes.InvalidArgument, "document limit of 1024 bytes"},
		{"report long key", func() error {
			_, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: "p1", Patch: mustStruct(t, map[string]any{strings.Repeat("k", 300): 1})})
			return err
		}, codes.InvalidArgument, "key limit of 256 bytes"},
		{"stale version", func() error {
			_, err := c.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "p1", Patch: jsonStruct(t, `{"pump":"on"}`), ExpectedVersion: 7})
			return err
		}, codes.FailedPrecondition, "not the expected 7"},
		{"delete stale", func() error {
			_, err := c.DeleteTwin(ctx, &twinv1.DeleteTwinRequest{Id: "p1", ExpectedVersion: 9})
			return err
		}, codes.FailedPrecondition, "not the expected 9"},
		{"malformed filter", func() error {
			_, err := c.ListTwins(ctx, &twinv1.ListTwinsRequest{Filter: `twin.type ==`})
			return err
		}, codes.InvalidArgument, "1:13"},
		{"non-boolean filter", func() error {
			_, err := c.ListTwins(ctx, &twinv1.ListTwinsRequest{Filter: `twin.version + 1`})
			return err
		}, codes.InvalidArgument, "want bool"},
		{"bad page token", func() error {
			_, err := c.ListTwins(ctx, &twinv1.ListTwinsRequest{PageToken: "garbage"})
			return err
		}, codes.InvalidArgument, "page_token"},
		{"negative page size", func() error {
			_, err := c.ListTwins(ctx, &twinv1.ListTwinsRequest{PageSize: -1})
			return err
		}, codes.InvalidArgument, "page_size"},
		{"token for unknown", func() error {
			_, err := c.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: "nope"})
			return err
		}, codes.NotFound, "does not exist"},
		{"history of unknown", func() error {
			_, err := c.ListTwinHistory(ctx, &twinv1.ListTwinHistoryRequest{Id: "nope"})
			return err
		}, codes.NotFound, "does not exist"},
		{"bad type", func() error {
			_, err := c.UpdateTwin(ctx, &twinv1.UpdateTwinRequest{Id: "p1", Type: "no spaces", UpdateType: true})
			return err
		}, codes.InvalidArgument, "type"},
	}
	for _, tt := range tests {
		err := tt.call()
		if status.Code(err) != tt.code || !strings.Contains(status.Convert(err).Message(), tt.msg) {
			t.Errorf("%s: got %v; want %v containing %q", tt.name, err, tt.code, tt.msg)
		}
	}
	// None of it changed the twin.
	got, err := c.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "p1"})
	if err != nil || got.Twin.Version != 1 || len(got.Twin.Reported.GetFields()) != 0 {
		t.Errorf("twin after bad requests = %v, %v; want version 1, empty", got, err)
	}
}

func TestWatchTwins(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := startServer(t, nil, nil)
	c := s.twins
	for _, id := range []string{"fridge-1", "car-1"} {
		typ := strings.Split(id, "-")[0]
		if _, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id, Type: typ}}); err != nil {
			t.Fatal(err)
		}
	}
	// Resume from revision 1: replays history, then follows live changes,
	// filtered.
	stream, err := c.WatchTwins(ctx, &twinv1.WatchTwinsRequest{Filter: `twin.type == "fridge"`, StartRevision: 1})
	if err != nil {
		t.Fatal(err)
	}
	ev, err := stream.Recv()
	if err != nil || ev.Event.Revision != 1 || ev.Event.Kind != twinv1.TwinEventKind_TWIN_EVENT_KIND_CREATED {
		t.Fatalf("first event = %v, %v; want revision 1 created", ev, err)
	}
	if _, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: "car-1", Patch: jsonStruct(t, `{"fuel":0.5}`)}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: "fridge-1", Patch: jsonStruct(t, `{"temp_c":5}`)}); err != nil {
		t.Fatal(err)
	}
	ev, err = stream.Recv()
	if err != nil || ev.Event.Revision != 4 || ev.Event.Twin.Id != "fridge-1" {
		t.Fatalf("live event = %v, %v; want revision 4 of fridge-1", ev, err)
	}
	if diff := cmp.Diff(jsonStruct(t, `{"temp_c":5}`), ev.Event.Patch, protocmp.Transform()); diff != "" {
		t.Errorf("event patch (-want +got):\n%s", diff)
	}

	// Shutdown ends the stream with UNAVAILABLE.
	go s.Shutdown()
	_, err = stream.Recv()
	if status.Code(err) != codes.Unavailable {
		t.Errorf("stream at shutdown ended with %v; want UNAVAILABLE", err)
	}
}

func TestWatchCompacted(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, func(o *Options) { o.Engine.LogRetention = 100; o.Limits.ReportRate = math.Inf(1) })
	c := s.twins
	if _, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "t"}}); err != nil {
		t.Fatal(err)
	}
	for i := range 1300 {
		if _, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: "t", Patch: mustStruct(t, map[string]any{"n": i})}); err != nil {
			t.Fatal(err)
		}
	}
	stream, err := c.WatchTwins(ctx, &twinv1.WatchTwinsRequest{StartRevision: 5})
	if err != nil {
		t.Fatal(err)
	}
	_, err = stream.Recv()
	if status.Code(err) != codes.OutOfRange || !strings.Contains(err.Error(), "oldest retained revision") {
		t.Errorf("watch from a compacted revision = %v; want OUT_OF_RANGE naming the oldest revision", err)
	}
}

func TestRunErrors(t *testing.T) {
	l, err := net.Listen("tcp", "localhost:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	err = Run(ctx, Options{Addr: l.Addr().String(), DataDir: t.TempDir(), Logger: quiet})
	if err == nil || !strings.Contains(err.Error(), "listen on") {
		t.Errorf("Run on an address in use = %v; want a listen error", err)
	}
	err = Run(ctx, Options{Addr: "localhost:0", DataDir: t.TempDir(), Logger: quiet, TLSCertFile: "/no/cert.pem", TLSKeyFile: "/no/key.pem"})
	if err == nil || !strings.Contains(err.Error(), "TLS certificate") {
		t.Errorf("Run with missing TLS files = %v; want a TLS error", err)
	}
	err = Run(ctx, Options{Addr: "localhost:0", DataDir: "/proc/no-such-dir/x", Logger: quiet})
	if err == nil || !strings.Contains(err.Error(), "open store") {
		t.Errorf("Run on a data directory it cannot create = %v; want an open error", err)
	}
}

// TestRunRestart runs the daemon twice on one directory through Run, as the
// twind command does, and checks that state survives a clean restart.
func TestRunRestart(t *testing.T) {
	dir := t.TempDir()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	for round := range 2 {
		ctx, cancel := context.WithCancel(context.Background())
		addrs := make(chan net.Addr, 1)
		done := make(chan error, 1)
		go func() {
			done <- Run(ctx, Options{Addr: "localhost:0", DataDir: dir, Logger: quiet, Ready: func(a net.Addr) { addrs <- a }})
		}()
		var addr net.Addr
		select {
		case addr = <-addrs:
		case err := <-done:
			t.Fatalf("Run: %v", err)
		}
		conn, err := grpc.NewClient(addr.String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		c := twinv1.NewTwinServiceClient(conn)
		if round == 0 {
			_, err = c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-9", Type: "car",
				Reported: jsonStruct(t, `{"fuel":0.4}`)}})
		} else {
			var got *twinv1.GetTwinResponse
			got, err = c.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-9"})
			if err == nil && got.Twin.Reported.Fields["fuel"].GetNumberValue() != 0.4 {
				t.Errorf("after restart, car-9 = %v", got.Twin)
			}
		}
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		conn.Close()
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Fatalf("Run returned %v", err)
		}
	}
}

func TestMetrics(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "m1"}}); err != nil {
		t.Fatal(err)
	}
	s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "nope"})
	rec := httptest.NewRecorder()
	s.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body := rec.Body.String()
	for _, want := range []string{
		"twind_twins 1",
		"twind_changes_total 1",
		// Creating m1 read it (there was none) into the twin cache.
		"twind_cached_twins 1",
		"twind_twin_cache_misses_total 1",
		"twind_twin_cache_bytes ",
		"twind_twin_cache_hits_total ",
		`grpc_server_handled_total{grpc_code="OK",grpc_method="CreateTwin",grpc_service="twin.v1.TwinService",grpc_type="unary"} 1`,
		`grpc_server_handled_total{grpc_code="NotFound",grpc_method="GetTwin",grpc_service="twin.v1.TwinService",grpc_type="unary"} 1`,
		"go_goroutines",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func TestRunDebugAddrInUse(t *testing.T) {
	l, err := net.Listen("tcp", "localhost:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	err = Run(context.Background(), Options{Addr: "localhost:0", DebugAddr: l.Addr().String(), DataDir: t.TempDir(),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err == nil || !strings.Contains(err.Error(), "debug address") {
		t.Errorf("Run with the debug address in use = %v", err)
	}
}

func TestAPIToken(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, func(o *Options) { o.APIToken = "s3cret" })
	_, err := s.twins.ListTwins(ctx, &twinv1.ListTwinsRequest{})
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "Bearer") {
		t.Errorf("call without a token = %v; want UNAUTHENTICATED saying how", err)
	}
	bad := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer nope")
	if _, err := s.twins.ListTwins(bad, &twinv1.ListTwinsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("call with a wrong token = %v; want UNAUTHENTICATED", err)
	}
	good := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer s3cret")
	if _, err := s.twins.CreateTwin(good, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "t1"}}); err != nil {
		t.Errorf("call with the token: %v", err)
	}
	stream, err := s.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{StartRevision: 1})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("watch without a token = %v; want UNAUTHENTICATED", err)
	}
	if h, err := healthpb.NewHealthClient(s.conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || h.Status != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health without a token = %v, %v; want SERVING", h, err)
	}
	// Devices authenticate with their own tokens, not the API token.
	tok, err := s.twins.IssueDeviceToken(good, &twinv1.IssueDeviceTokenRequest{Id: "t1"})
	if err != nil {
		t.Fatal(err)
	}
	d := connect(t, s, &twinv1.Hello{DeviceId: "t1", Token: tok.Token}, true)
	if w := d.next().GetWelcome(); w == nil {
		t.Errorf("device without the API token got no welcome")
	}
}
