package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// BenchmarkWatchers measures what live watchers with selective filters cost
// the server: changes of fridges go through the engine (64 writers) while
// the watchers, over loopback gRPC, each watch a type or a label no fridge
// has (a CEL filter that pins it) or a fridge condition that rarely holds.
// cpu-µs/change is the process's CPU (server, engine and the watching
// clients) per change; the difference between watchers=100 and
// watchers=0 is what the watchers cost.
func BenchmarkWatchers(b *testing.B) {
	pinned := []string{
		`twin.type == "car" && twin.reported.speed > 120.0`,
		`twin.labels.site == "paris"`,
		`twin.type in ["planter", "oven"]`,
	}
	mixed := append(slices.Clone(pinned), `twin.type == "fridge" && twin.reported.temp_c > 1000.0`)
	// The same, but each of the 25 fridge watchers with a filter of its
	// own: none shares another's evaluation (filterMemo).
	var distinct []string
	for i := range 25 {
		distinct = append(distinct, pinned...)
		distinct = append(distinct, fmt.Sprintf(`twin.type == "fridge" && twin.reported.temp_c > %d.0`, 1000+i))
	}
	for _, bc := range []struct {
		name     string
		watchers int
		filters  []string
	}{
		{"watchers=0", 0, nil},
		// Every filter pins a type or label that no fridge has: the
		// watchers drop each event before any CEL.
		{"watchers=100/pinned-elsewhere", 100, pinned},
		// A quarter watch fridges with a condition that is evaluated on
		// every change and rarely holds.
		{"watchers=100/quarter-evaluate", 100, mixed},
		{"watchers=100/quarter-evaluate-distinct", 100, distinct},
	} {
		watchers, filters := bc.watchers, bc.filters
		b.Run(bc.name, func(b *testing.B) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			s, err := New(Options{DataDir: b.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Limits: benchLimits})
			if err != nil {
				b.Fatal(err)
			}
			l, err := net.Listen("tcp", "localhost:0")
			if err != nil {
				b.Fatal(err)
			}
			go s.Serve(l)
			defer s.Shutdown()
			conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			c := twinv1.NewTwinServiceClient(conn)
			const twins = 64
			for i := range twins {
				if _, err := s.engine.Create(ctx, twin.CreateRequest{ID: fmt.Sprint("fridge-", i), Type: "fridge",
					Labels: map[string]string{"site": "berlin"}}); err != nil {
					b.Fatal(err)
				}
			}
			var wg sync.WaitGroup
			var received atomic.Int64
			for i := range watchers {
				st, err := c.WatchTwins(ctx, &twinv1.WatchTwinsRequest{Filter: filters[i%len(filters)]})
				if err != nil {
					b.Fatal(err)
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						if _, err := st.Recv(); err != nil {
							return
						}
						received.Add(1)
					}
				}()
			}
			time.Sleep(100 * time.Millisecond) // the watches are established
			var n atomic.Int64
			b.SetParallelism(32)
			cpu0 := cpuTime()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				id := fmt.Sprint("fridge-", n.Add(1)%twins)
				i := 0
				for pb.Next() {
					i++
					if _, err := s.engine.Report(ctx, twin.PatchRequest{ID: id, Patch: twin.Document{"temp_c": float64(i % 50)}}); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(b.N), "cpu-µs/change")
			cancel()
			wg.Wait()
		})
	}
}
