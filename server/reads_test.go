package server

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// probe serves a TwinService of its own over a server's engine, so that a
// test can set its send timeout, count its filter evaluations and see what
// each of its handlers returned, and when.
type probe struct {
	svc      *twinService
	twins    twinv1.TwinServiceClient
	returned chan error // what each handler returned, as it returns
}

// dialOpts are extra options for the probe's client connection.
func startProbe(t *testing.T, s *testServer, sendTimeout time.Duration, dialOpts ...grpc.DialOption) *probe {
	t.Helper()
	p := &probe{svc: &twinService{s: s.Server, sendTimeout: sendTimeout}, returned: make(chan error, 16)}
	gs := grpc.NewServer(
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			resp, err := h(ctx, req)
			p.returned <- err
			return resp, err
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			err := h(srv, ss)
			p.returned <- err
			return err
		}),
	)
	twinv1.RegisterTwinServiceServer(gs, p.svc)
	l := bufconn.Listen(1 << 20)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); gs.Serve(l) }()
	conn, err := grpc.NewClient("passthrough:///probe", append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return l.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials())}, dialOpts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		gs.Stop()
		wg.Wait()
	})
	p.twins = twinv1.NewTwinServiceClient(conn)
	return p
}

// handlerReturned waits for the next handler to return and returns its
// error.
func (p *probe) handlerReturned(t *testing.T) error {
	t.Helper()
	select {
	case err := <-p.returned:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("the handler did not return within 20s")
		return nil
	}
}

// createFleet creates n twins id-0000... of type typ with the given
// reported state, through the engine, several at a time.
func createFleet(t testing.TB, s *testServer, prefix string, n int, reported map[string]any) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				if _, err := s.Engine().Create(context.Background(), twin.CreateRequest{
					ID: fmt.Sprintf("%s-%04d", prefix, i), Type: prefix, Reported: twin.Document(reported)}); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// slowFilter costs a few milliseconds per twin, under the cost limit, and
// holds for every twin.
const slowFilter = `lists.range(100).all(i, lists.range(100).all(j, i + j >= 0))`

// TestListTwinsStops checks that a list whose client gave up, or whose
// server shuts down, stops evaluating its filter.
func TestListTwinsStops(t *testing.T) {
	const n = 300
	for _, tt := range []struct {
		name string
		stop func(t *testing.T, s *testServer, p *probe, cancel context.CancelFunc)
		ctx  func() (context.Context, context.CancelFunc)
		want []codes.Code
	}{
		{"deadline", nil, func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 100*time.Millisecond)
		}, []codes.Code{codes.DeadlineExceeded, codes.Canceled}}, // the client cancels on its deadline
		{"cancel", func(t *testing.T, _ *testServer, p *probe, cancel context.CancelFunc) {
			waitFor(t, func() bool { return p.svc.filterEvals.Load() > 0 })
			cancel()
		}, func() (context.Context, context.CancelFunc) { return context.WithCancel(context.Background()) }, []codes.Code{codes.Canceled}},
		{"shutdown", func(t *testing.T, s *testServer, p *probe, _ context.CancelFunc) {
			waitFor(t, func() bool { return p.svc.filterEvals.Load() > 0 })
			go s.Shutdown()
		}, func() (context.Context, context.CancelFunc) { return context.WithCancel(context.Background()) }, []codes.Code{codes.Unavailable}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := startServer(t, nil, nil)
			createFleet(t, s, "fridge", n, nil)
			p := startProbe(t, s, 0)
			ctx, cancel := tt.ctx()
			defer cancel()
			listed := make(chan error, 1)
			go func() {
				_, err := p.twins.ListTwins(ctx, &twinv1.ListTwinsRequest{Filter: slowFilter, PageSize: n})
				listed <- err
			}()
			if tt.stop != nil {
				tt.stop(t, s, p, cancel)
			}
			err := p.handlerReturned(t)
			if got := status.Code(err); !slices.Contains(tt.want, got) {
				t.Errorf("ListTwins handler returned %v; want one of %v", err, tt.want)
			}
			if got := p.svc.filterEvals.Load(); got >= n {
				t.Errorf("filter evaluations after the %s = %d; want fewer than the %d twins", tt.name, got, n)
			}
			<-listed
		})
	}
}

// TestWatchReplayStops checks that a replay whose filter matches nothing
// notices its client leaving and the server shutting down.
func TestWatchReplayStops(t *testing.T) {
	const n = 1000
	for _, tt := range []struct {
		name string
		stop func(t *testing.T, s *testServer, cancel context.CancelFunc)
		want codes.Code
	}{
		{"cancel", func(_ *testing.T, _ *testServer, cancel context.CancelFunc) { cancel() }, codes.Canceled},
		{"shutdown", func(t *testing.T, s *testServer, _ context.CancelFunc) {
			if err := s.Shutdown(); err != nil {
				t.Errorf("Shutdown during a replay: %v", err)
			}
		}, codes.Unavailable},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := startServer(t, nil, nil)
			createFleet(t, s, "fridge", n, nil)
			p := startProbe(t, s, 0)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stream, err := p.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{Filter: slowFilter + ` && twin.id == "none"`, StartRevision: 1})
			if err != nil {
				t.Fatal(err)
			}
			waitFor(t, func() bool { return p.svc.filterEvals.Load() > 0 })
			tt.stop(t, s, cancel)
			err = p.handlerReturned(t)
			if got := status.Code(err); got != tt.want {
				t.Errorf("WatchTwins handler returned %v; want %v", err, tt.want)
			}
			if got := p.svc.filterEvals.Load(); got >= n {
				t.Errorf("filter evaluations after the %s = %d; want fewer than the %d events", tt.name, got, n)
			}
			cancel()
			stream.Recv()
		})
	}
}

// TestWatchSlowReader checks that a watcher that does not read is ended
// after the send timeout, with a status that says where to resume.
func TestWatchSlowReader(t *testing.T) {
	s := startServer(t, nil, nil)
	createFleet(t, s, "car", 20, map[string]any{"blob": strings.Repeat("x", 40<<10)})
	// A fixed window of 64 KiB, with no growth from bandwidth probes, so
	// that a few events fill it.
	p := startProbe(t, s, 200*time.Millisecond, grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := p.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{StartRevision: 1})
	if err != nil {
		t.Fatal(err)
	}
	err = p.handlerReturned(t)
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "watch again with start_revision") {
		t.Errorf("WatchTwins handler of a client that does not read returned %v; want RESOURCE_EXHAUSTED naming the revision to resume from", err)
	}
	// The client gets what was sent, then the status.
	var revs []int64
	for {
		resp, err := stream.Recv()
		if err != nil {
			if status.Code(err) != codes.ResourceExhausted {
				t.Errorf("the client's stream ended with %v; want RESOURCE_EXHAUSTED", err)
			}
			break
		}
		revs = append(revs, resp.Event.Revision)
	}
	if len(revs) == 0 || len(revs) >= 20 {
		t.Errorf("the client received revisions %v; want some, not all 20", revs)
	}
}

// TestPagesBoundedByBytes lists twins and history whose full pages would
// exceed gRPC's 4 MiB message limit.
func TestPagesBoundedByBytes(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	createFleet(t, s, "planter", 150, map[string]any{"blob": strings.Repeat("x", 40<<10)})

	var ids []string
	pages := 0
	for tok := ""; ; pages++ {
		resp, err := s.twins.ListTwins(ctx, &twinv1.ListTwinsRequest{PageSize: 1000, PageToken: tok})
		if err != nil {
			t.Fatalf("ListTwins page %d of 150 twins of 40 KB: %v", pages, err)
		}
		for _, tw := range resp.Twins {
			ids = append(ids, tw.Id)
		}
		if tok = resp.NextPageToken; tok == "" {
			break
		}
	}
	var want []string
	for i := range 150 {
		want = append(want, fmt.Sprintf("planter-%04d", i))
	}
	if diff := cmp.Diff(want, ids); diff != "" || pages < 1 {
		t.Errorf("ListTwins over %d pages (-want +got):\n%s", pages+1, diff)
	}

	// 100 retained versions of a twin with 60 KB documents: each event
	// holds the twin and the patch.
	blob := strings.Repeat("y", 60<<10-100)
	for i := range 100 {
		patch := mustStruct(t, map[string]any{"blob": fmt.Sprint(i, blob)})
		if _, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "planter-0000", Patch: patch}); err != nil {
			t.Fatal(err)
		}
	}
	var versions []int64
	pages = 0
	for tok := ""; ; pages++ {
		resp, err := s.twins.ListTwinHistory(ctx, &twinv1.ListTwinHistoryRequest{Id: "planter-0000", PageToken: tok})
		if err != nil {
			t.Fatalf("ListTwinHistory page %d of 60 KB documents: %v", pages, err)
		}
		for _, ev := range resp.Events {
			versions = append(versions, ev.Twin.Version)
		}
		if tok = resp.NextPageToken; tok == "" {
			break
		}
	}
	if len(versions) != 100 || versions[0] != 101 || versions[99] != 2 || pages < 1 {
		t.Errorf("ListTwinHistory over %d pages = %d versions %v...; want 100, from 101 down to 2", pages+1, len(versions), versions[:min(3, len(versions))])
	}
	for i := 1; i < len(versions); i++ {
		if versions[i] != versions[i-1]-1 {
			t.Errorf("history version %d follows %d; want each version once, newest first", versions[i], versions[i-1])
		}
	}
}

func TestListTwinsFilterErrors(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	for id, rep := range map[string]string{
		"a-0": `{"temp_c": 9}`, "a-1": `{"temp_c": 3}`, "a-2": `{"temp_c": 7}`,
		"b-0": `{"temp_c": "warm"}`, "c-0": `{}`,
	} {
		if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id, Reported: jsonStruct(t, rep)}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct {
		filter    string
		code      codes.Code
		msg       []string // in the error, or in first_filter_error
		ids       string
		errCount  int64
		pageSize  int32
		nextToken bool
	}{
		// Fails on every twin: INVALID_ARGUMENT naming the first.
		{filter: `twin.id > 5`, code: codes.InvalidArgument, msg: []string{`"a-0"`, "no such overload"}},
		{filter: `twin.id`, code: codes.InvalidArgument, msg: []string{`"a-0"`, "type string, not bool"}},
		{filter: `lists.range(1000).all(i, lists.range(1000).all(j, i + j >= 0))`, code: codes.InvalidArgument,
			msg: []string{`"a-0"`, "cost limit"}},
		// Fails on some: listed with a count and the first error.
		{filter: `twin.reported.temp_c > 5.0`, ids: "a-0 a-2", errCount: 1, msg: []string{`"b-0"`, "no such overload"}},
		{filter: `twin.reported.temp_c > "x"`, ids: "", errCount: 3, msg: []string{`"a-0"`}},
		{filter: `twin.reported.temp_c > 5.0`, ids: "a-0", pageSize: 1, nextToken: true},
		// A field a twin lacks is no error.
		{filter: `twin.reported.humidity > 5.0`, ids: ""},
		{filter: `twin.reported.temp_c == "warm"`, ids: "b-0"},
		{filter: `twin.reported.list[3] == 1.0`, ids: ""},
	} {
		resp, err := s.twins.ListTwins(ctx, &twinv1.ListTwinsRequest{Filter: tt.filter, PageSize: tt.pageSize})
		if status.Code(err) != tt.code {
			t.Errorf("ListTwins(%s) = %v; want %v", tt.filter, err, tt.code)
			continue
		}
		text := resp.GetFirstFilterError()
		if err != nil {
			text = err.Error()
		}
		for _, m := range tt.msg {
			if !strings.Contains(text, m) {
				t.Errorf("ListTwins(%s) error %q; want it to contain %s", tt.filter, text, m)
			}
		}
		if err != nil {
			continue
		}
		var ids []string
		for _, tw := range resp.Twins {
			ids = append(ids, tw.Id)
		}
		if got := strings.Join(ids, " "); got != tt.ids || resp.FilterErrorCount != tt.errCount || (resp.NextPageToken != "") != tt.nextToken {
			t.Errorf("ListTwins(%s) = [%s], filter_error_count %d, next page %t; want [%s], %d, %t",
				tt.filter, got, resp.FilterErrorCount, resp.NextPageToken != "", tt.ids, tt.errCount, tt.nextToken)
		}
	}
}

func TestWatchStartRevisionAhead(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := startServer(t, nil, nil)
	createFleet(t, s, "car", 5, nil)
	stream, err := s.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{StartRevision: 7})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.OutOfRange || !strings.Contains(err.Error(), "current revision 5") {
		t.Errorf("WatchTwins from revision 7 at revision 5 = %v; want OUT_OF_RANGE naming the current revision 5", err)
	}
	// The next revision is fine: the watch waits for it.
	stream, err = s.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{StartRevision: 6})
	if err != nil {
		t.Fatal(err)
	}
	createFleet(t, s, "bus", 1, nil)
	resp, err := stream.Recv()
	if err != nil || resp.Event.Revision != 6 {
		t.Errorf("WatchTwins from the next revision 6 = %v, %v; want the event at revision 6", resp, err)
	}
}

func TestNonFiniteNumbersRefused(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1"}}); err != nil {
		t.Fatal(err)
	}
	nested := func(f float64) *structpb.Struct {
		return &structpb.Struct{Fields: map[string]*structpb.Value{
			"location": structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
				"path": structpb.NewListValue(&structpb.ListValue{Values: []*structpb.Value{structpb.NewNumberValue(1), structpb.NewNumberValue(f)}}),
			}}),
		}}
	}
	for _, tt := range []struct {
		name string
		call func() error
		path string
	}{
		{"UpdateDesired NaN", func() error {
			_, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "car-1", Patch: nested(math.NaN())})
			return err
		}, "patch.location.path[1] is NaN"},
		{"ReportState +Inf", func() error {
			_, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "car-1", Patch: nested(math.Inf(1))})
			return err
		}, "patch.location.path[1] is +Inf"},
		{"CreateTwin -Inf", func() error {
			_, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-2",
				Reported: &structpb.Struct{Fields: map[string]*structpb.Value{"odd key": structpb.NewNumberValue(math.Inf(-1))}}}})
			return err
		}, `twin.reported["odd key"] is -Inf`},
		{"SendCommand params NaN", func() error {
			_, err := twinv1.NewCommandServiceClient(s.conn).SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "navigate", Params: nested(math.NaN())})
			return err
		}, "params.location.path[1] is NaN"},
		{"CreateTwin desired NaN", func() error {
			_, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-2", Desired: nested(math.NaN())}})
			return err
		}, `twin.desired.location.path[1] is NaN`},
	} {
		err := tt.call()
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tt.path) {
			t.Errorf("%s = %v; want INVALID_ARGUMENT naming %s", tt.name, err, tt.path)
		}
	}
	got, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-1"})
	if err != nil || got.Twin.Version != 1 {
		t.Errorf("GetTwin after refused patches = %v, %v; want version 1", got, err)
	}

	// Paths that do not check first still keep the number a number, which
	// the engine refuses, instead of storing the string "NaN".
	_, err = s.Engine().Report(ctx, twin.PatchRequest{ID: "car-1", Patch: document(nested(math.NaN()))})
	if !errors.Is(err, twin.ErrInvalidPatch) {
		t.Errorf("engine Report of document(NaN) = %v; want ErrInvalidPatch", err)
	}
	if v := document(nested(math.Inf(1)))["location"].(map[string]any)["path"].([]any)[1]; v != math.Inf(1) {
		t.Errorf("document(+Inf) holds %#v; want the number +Inf", v)
	}
}

// TestNegativeArgumentsRefused: a negative expected_version or wait is a
// mistake of the caller, not a version mismatch or nothing (issue 13).
func TestNegativeArgumentsRefused(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1"}}); err != nil {
		t.Fatal(err)
	}
	_, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "car-1", Patch: &structpb.Struct{}, ExpectedVersion: -1})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("UpdateDesired expected_version -1 = %v; want INVALID_ARGUMENT", err)
	}
	_, err = twinv1.NewCommandServiceClient(s.conn).SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "car-1", Name: "honk", Wait: durationpb.New(-time.Second)})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("SendCommand wait -1s = %v; want INVALID_ARGUMENT", err)
	}
}

// TestWatchFilterFailingEverywhere: a watch whose filter fails on every
// event (not merely a missing field) ends with INVALID_ARGUMENT instead of
// streaming nothing.
func TestWatchFilterFailingEverywhere(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s := startServer(t, nil, nil)
	for i := range filterProbe + 5 {
		if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: fmt.Sprint("w-", i)}}); err != nil {
			t.Fatal(err)
		}
	}
	w, err := s.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{Filter: "twin.id", StartRevision: 1})
	if err != nil {
		t.Fatal(err)
	}
	_, err = w.Recv()
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "the filter failed on each of the first") {
		t.Errorf("watch with filter twin.id = %v; want INVALID_ARGUMENT saying the filter fails", err)
	}
	// A filter that only reads a field some twins lack is fine.
	w, err = s.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{Filter: "twin.reported.temp_c > 1.0", StartRevision: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "w-1", Patch: jsonStruct(t, `{"temp_c": 5}`)}); err != nil {
		t.Fatal(err)
	}
	if ev, err := w.Recv(); err != nil || ev.GetEvent().GetTwin().GetId() != "w-1" {
		t.Errorf("watch with a filter on a missing field = %v, %v; want the matching event", ev, err)
	}
}
