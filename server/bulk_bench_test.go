package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// fridgeLine is the fridge twin as an NDJSON line: 8 reported
// leaves, one nested object, 2 desired, 1 label.
func fridgeLine(i int) string {
	return fmt.Sprintf(`{"id":"fridge-%d","type":"fridge","labels":{"site":"berlin"},`+
		`"reported":{"temp_c":2.3,"door":"closed","power_w":80,"compressor":false,"target_c":4,"eco":true,"fw":"1.2.3","site":{"city":"berlin","floor":3}},`+
		`"desired":{"target_c":4,"eco":true}}`+"\n", i)
}

// BenchmarkImportTwins measures ImportTwins of fridge twins as NDJSON, in
// batches of 1,000, through a real server on loopback TCP and a real
// on-disk store; one op is one twin imported and durable. Two streams run
// side by side, as `twinctl import` does.
func BenchmarkImportTwins(b *testing.B) {
	s, err := New(Options{DataDir: b.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
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
	const batch = 1000
	var chunks [][]byte
	for i := 0; i < b.N; i += batch {
		var buf []byte
		for j := i; j < min(i+batch, b.N); j++ {
			buf = append(buf, fridgeLine(j)...)
		}
		chunks = append(chunks, buf)
	}
	// As twind runs, unless GOGC is set.
	if _, ok := os.LookupEnv("GOGC"); !ok {
		defer debug.SetGCPercent(debug.SetGCPercent(400))
	}
	b.SetBytes(int64(len(fridgeLine(0))))
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	if err := importChunks(context.Background(), c, chunks); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	// The wall-clock rate depends on what else runs on the machine; the
	// CPU time per twin (client and server, this process) does not.
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "twins/s")
	b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(b.N), "cpu-µs/twin")
}

// importChunks streams the chunks, keeping a few in flight, and checks
// that every twin is imported.
func importChunks(ctx context.Context, c twinv1.TwinServiceClient, chunks [][]byte) error {
	stream, err := c.ImportTwins(ctx)
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() {
		for _, ch := range chunks {
			if err := stream.Send(&twinv1.ImportTwinsRequest{Ndjson: ch}); err != nil {
				errc <- err
				return
			}
		}
		errc <- stream.CloseSend()
	}()
	for {
		m, err := stream.Recv()
		if err != nil {
			return err
		}
		if len(m.GetErrors()) > 0 {
			return fmt.Errorf("import error: %v", m.GetErrors()[0])
		}
		if m.GetDone() {
			return <-errc
		}
	}
}
