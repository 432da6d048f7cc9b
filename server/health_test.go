package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin/vfstest"
)

// healthWatch follows the server's overall health.
type healthWatch struct {
	t  *testing.T
	st grpc.ServerStreamingClient[healthpb.HealthCheckResponse]
}

func watchHealth(t *testing.T, ctx context.Context, conn *grpc.ClientConn) *healthWatch {
	st, err := healthpb.NewHealthClient(conn).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return &healthWatch{t, st}
}

// until reads statuses until want; it fails the test if the stream ends.
func (w *healthWatch) until(want healthpb.HealthCheckResponse_ServingStatus) {
	w.t.Helper()
	for {
		m, err := w.st.Recv()
		if err != nil {
			w.t.Fatalf("health watch ended waiting for %v: %v", want, err)
		}
		if m.Status == want {
			return
		}
	}
}

func metric(t *testing.T, s *testServer, name string) string {
	t.Helper()
	rec := httptest.NewRecorder()
	s.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for line := range strings.Lines(rec.Body.String()) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+" "); ok {
			return v
		}
	}
	t.Fatalf("metrics lack %s", name)
	return ""
}

// TestHealthFollowsBackgroundErrors makes the store's flushes fail, as on a
// full disk: health goes NOT_SERVING and the metric says why while it lasts,
// and both recover by themselves once the disk takes writes again.
func TestHealthFollowsBackgroundErrors(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var on atomic.Bool
	s := startServer(t, vfstest.FailWrites(vfs.NewMem(), ".sst", &on), func(o *Options) { o.Engine.MemTableBytes = 64 << 10 })
	hw := watchHealth(t, ctx, s.conn)
	hw.until(healthpb.HealthCheckResponse_SERVING)
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "fridge-1", Type: "fridge"}}); err != nil {
		t.Fatal(err)
	}
	on.Store(true)
	// Reports fill memtables until a flush fails; they then stall until
	// flushes work again, and go on.
	writes := make(chan error, 1)
	stop := make(chan struct{})
	go func() {
		blob := strings.Repeat("x", 1<<10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				writes <- nil
				return
			default:
			}
			_, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "fridge-1",
				Patch: mustStruct(t, map[string]any{"i": i, "blob": blob})})
			if err != nil {
				writes <- fmt.Errorf("report %d: %w", i, err)
				return
			}
		}
	}()
	hw.until(healthpb.HealthCheckResponse_NOT_SERVING)
	if got := metric(t, s, "twind_store_background_error"); got != "1" {
		t.Errorf("twind_store_background_error = %s while flushes fail; want 1", got)
	}
	on.Store(false)
	hw.until(healthpb.HealthCheckResponse_SERVING)
	close(stop)
	if err := <-writes; err != nil {
		t.Errorf("writes during the background error: %v; want them delayed, not failed", err)
	}
	if got := metric(t, s, "twind_store_background_error"); got != "0" {
		t.Errorf("twind_store_background_error = %s after recovery; want 0", got)
	}
	if got := metric(t, s, "twind_store_failed"); got != "0" {
		t.Errorf("twind_store_failed = %s; want 0", got)
	}
}

// TestRunStopsOnFatalStoreError makes the WAL fail under a running server:
// health goes NOT_SERVING, Run returns the store's error (so twind exits
// non-zero), and a restart serves everything acknowledged before.
func TestRunStopsOnFatalStoreError(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	mem := vfs.NewMem()
	var on atomic.Bool
	run := func(fs vfs.FS) (*grpc.ClientConn, chan error) {
		addrs := make(chan net.Addr, 1)
		done := make(chan error, 1)
		go func() {
			opts := Options{Addr: "localhost:0", DataDir: "db", Logger: quiet, Ready: func(a net.Addr) { addrs <- a }}
			opts.Engine.FS = fs
			done <- Run(ctx, opts)
		}()
		select {
		case a := <-addrs:
			conn, err := grpc.NewClient(a.String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { conn.Close() })
			return conn, done
		case err := <-done:
			t.Fatalf("Run: %v", err)
		}
		return nil, nil
	}
	conn, done := run(vfstest.FailOneWrite(mem, ".log", &on))
	tc := twinv1.NewTwinServiceClient(conn)
	for i := range 5 {
		if _, err := tc.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: fmt.Sprint("car-", i), Type: "car"}}); err != nil {
			t.Fatal(err)
		}
	}
	wctx, stopWatch := context.WithCancel(ctx)
	hw := watchHealth(t, wctx, conn)
	hw.until(healthpb.HealthCheckResponse_SERVING)
	on.Store(true)
	if _, err := tc.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-lost", Type: "car"}}); err == nil {
		t.Error("CreateTwin with a failing WAL succeeded")
	}
	// The health watch sees NOT_SERVING, or ends as the server stops.
	if m, err := hw.st.Recv(); err == nil && m.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health after the WAL failed = %v; want NOT_SERVING", m.Status)
	}
	stopWatch() // an open watch would hold up the graceful stop
	select {
	case err := <-done:
		if err == nil || !errors.Is(err, errorfs.ErrInjected) {
			t.Errorf("Run after the WAL failed = %v; want the store's error", err)
		}
	case <-ctx.Done():
		t.Fatal("Run still serving a minute after the WAL failed")
	}

	on.Store(false)
	conn, done = run(mem)
	tc = twinv1.NewTwinServiceClient(conn)
	for i := range 5 {
		if _, err := tc.GetTwin(ctx, &twinv1.GetTwinRequest{Id: fmt.Sprint("car-", i)}); err != nil {
			t.Errorf("after the restart: %v", err)
		}
	}
	wctx, stopWatch = context.WithCancel(ctx)
	hw = watchHealth(t, wctx, conn)
	hw.until(healthpb.HealthCheckResponse_SERVING)
	stopWatch()
	cancel()
	if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("Run after the restart returned %v", err)
	}
}
