package server_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
)

// Run is the whole daemon: here it serves on a free port with its store in
// a temporary directory, answers one call, and shuts down cleanly.
func ExampleRun() {
	dir, _ := os.MkdirTemp("", "twind-example")
	defer os.RemoveAll(dir)
	ctx, stop := context.WithCancel(context.Background())
	ready := make(chan net.Addr, 1)
	done := make(chan error, 1)
	go func() {
		done <- server.Run(ctx, server.Options{Addr: "localhost:0", DataDir: dir,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Ready: func(a net.Addr) { ready <- a }})
	}()
	conn, err := grpc.NewClient((<-ready).String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		panic(err)
	}
	resp, err := twinv1.NewTwinServiceClient(conn).CreateTwin(ctx, &twinv1.CreateTwinRequest{
		Twin: &twinv1.Twin{Id: "fridge-1", Type: "fridge"}})
	if err != nil {
		panic(err)
	}
	fmt.Println(resp.Twin.Id, "at version", resp.Twin.Version)
	conn.Close()
	stop()
	fmt.Println("stopped:", <-done)
	// Output:
	// fridge-1 at version 1
	// stopped: <nil>
}
