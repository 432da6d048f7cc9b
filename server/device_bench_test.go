package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// benchFleet is a real server on loopback TCP and an on-disk store, with n
// devices created and given tokens.
type benchFleet struct {
	s      *Server
	conns  []*grpc.ClientConn
	tokens []string
}

func startFleet(b *testing.B, n, conns int) *benchFleet {
	b.Helper()
	s, err := New(Options{DataDir: b.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Limits: benchLimits})
	if err != nil {
		b.Fatal(err)
	}
	l, err := net.Listen("tcp", "localhost:0")
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve(l)
	f := &benchFleet{s: s}
	b.Cleanup(func() {
		for _, c := range f.conns {
			c.Close()
		}
		s.Shutdown()
	})
	for range conns {
		c, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		f.conns = append(f.conns, c)
	}
	ctx := context.Background()
	tc := twinv1.NewTwinServiceClient(f.conns[0])
	for i := range n {
		id := fmt.Sprint("planter-", i)
		if _, err := tc.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id, Type: "planter"}}); err != nil {
			b.Fatal(err)
		}
		tok, err := tc.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: id})
		if err != nil {
			b.Fatal(err)
		}
		f.tokens = append(f.tokens, tok.Token)
	}
	return f
}

// open connects device i and waits for its welcome.
func (f *benchFleet) open(ctx context.Context, i int) (twinv1.DeviceService_ConnectClient, error) {
	st, err := twinv1.NewDeviceServiceClient(f.conns[i%len(f.conns)]).Connect(ctx)
	if err != nil {
		return nil, err
	}
	err = st.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{
		DeviceId: fmt.Sprint("planter-", i), Token: f.tokens[i]}}})
	if err != nil {
		return nil, err
	}
	if _, err := st.Recv(); err != nil {
		return nil, err
	}
	return st, nil
}

// BenchmarkDeviceReports measures acknowledged, durable reports over 1,000
// concurrent device streams, each keeping up to 4 reports in flight, and
// the latency from sending a report to receiving its ack.
func BenchmarkDeviceReports(b *testing.B) {
	const devices, window = 1000, 4
	f := startFleet(b, devices, 8)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	streams := make([]twinv1.DeviceService_ConnectClient, devices)
	for i := range streams {
		st, err := f.open(ctx, i)
		if err != nil {
			b.Fatal(err)
		}
		streams[i] = st
	}
	var (
		mu   sync.Mutex
		lats []time.Duration
		wg   sync.WaitGroup
	)
	b.ReportAllocs()
	b.ResetTimer()
	per := b.N/devices + 1
	for i, st := range streams {
		wg.Add(2)
		sent := make(chan time.Time, window) // the window of reports in flight
		go func() {
			defer wg.Done()
			for j := range per {
				sent <- time.Now()
				patch := &structpb.Struct{Fields: map[string]*structpb.Value{
					"soil_moisture": structpb.NewNumberValue(float64(j % 100)), "light_lux": structpb.NewNumberValue(float64(i)),
				}}
				if err := st.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: int64(j), Patch: patch}}}); err != nil {
					b.Error(err)
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			my := make([]time.Duration, 0, per)
			for len(my) < per {
				m, err := st.Recv()
				if err != nil {
					b.Error(err)
					return
				}
				if m.GetReportAck() != nil {
					my = append(my, time.Since(<-sent))
				}
			}
			mu.Lock()
			lats = append(lats, my...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	b.StopTimer()
	slices.Sort(lats)
	b.ReportMetric(float64(len(lats))/b.Elapsed().Seconds(), "acks/s")
	if len(lats) > 0 {
		b.ReportMetric(float64(lats[len(lats)/2].Microseconds()), "p50-µs")
		b.ReportMetric(float64(lats[len(lats)*99/100].Microseconds()), "p99-µs")
	}
}

// BenchmarkIdleDevices measures the memory each idle connected device costs:
// the heap of server and client together, in this one process, divided by
// the devices connected.
func BenchmarkIdleDevices(b *testing.B) {
	const devices = 2000
	f := startFleet(b, devices, 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse + m.StackInuse
	}
	b.ResetTimer()
	for range b.N {
		before := heap()
		var streams []twinv1.DeviceService_ConnectClient
		for i := range devices {
			st, err := f.open(ctx, i)
			if err != nil {
				b.Fatal(err)
			}
			streams = append(streams, st)
		}
		after := heap()
		b.ReportMetric(float64(after-before)/devices, "bytes/device")
		for _, st := range streams {
			st.CloseSend()
		}
		for _, st := range streams {
			for {
				if _, err := st.Recv(); err != nil {
					break
				}
			}
		}
	}
}

// BenchmarkSessionDesiredChanged measures what a desired change costs the
// engine's goroutine for a connected device whose stream has not sent the
// previous change yet: it is coalesced into the waiting update.
func BenchmarkSessionDesiredChanged(b *testing.B) {
	ss := newSession("planter-1", 0, time.Minute)
	defer ss.sendTimer.Stop()
	t := &twin.Twin{ID: "planter-1", Version: 1, Desired: twin.Document{"pump": "on"}}
	ss.Welcome(t, nil)
	patch := twin.Document{"pump": "on"}
	b.ReportAllocs()
	for b.Loop() {
		ss.DesiredChanged(t, patch)
	}
}

// BenchmarkDiffPatch measures the patch of a coalesced desired update: from
// a 40-key desired state to one with two keys changed, one removed and a
// shared subtree.
func BenchmarkDiffPatch(b *testing.B) {
	shared := twin.Document{"a": 1.0, "b": "x"}
	from := twin.Document{"sub": shared}
	for i := range 40 {
		from[fmt.Sprint("k", i)] = float64(i)
	}
	to := maps.Clone(from)
	to["k1"], to["k2"] = "on", 3.5
	delete(to, "k3")
	b.ReportAllocs()
	for b.Loop() {
		diffPatch(from, to)
	}
}
