package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// BenchmarkReportState measures durable ReportState calls through a real
// server on loopback TCP and a real on-disk store, from 64 concurrent
// clients sharing 4 connections.
func BenchmarkReportState(b *testing.B) {
	ctx := context.Background()
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
	const conns, clients = 4, 64
	cs := make([]twinv1.TwinServiceClient, conns)
	for i := range cs {
		conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		cs[i] = twinv1.NewTwinServiceClient(conn)
	}
	for i := range clients {
		if _, err := cs[0].CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: fmt.Sprint("fridge-", i), Type: "fridge"}}); err != nil {
			b.Fatal(err)
		}
	}
	var n atomic.Int64
	b.SetParallelism(clients / 2) // 64 goroutines at GOMAXPROCS=2
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := n.Add(1)
		c := cs[i%conns]
		id := fmt.Sprint("fridge-", i%clients)
		temp := 0.0
		for pb.Next() {
			temp++
			_, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: id, Patch: &structpb.Struct{Fields: map[string]*structpb.Value{
				"temp_c": structpb.NewNumberValue(temp), "door": structpb.NewStringValue("closed"),
			}}})
			if err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "reports/s")
}
