// Package testserver runs a real twind in a test's process, for the tests
// of the clients and of the web console, exactly as the twind command runs it.
package testserver

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"

	"github.com/twind-io/twind/server"
)

// Server is a twind run by a test.
type Server struct {
	Addr   string
	cancel context.CancelFunc
	done   chan error
}

// Start runs twind on a loopback address (addr, or any free port if empty)
// with its store in dir, and stops it when the test ends.
func Start(t testing.TB, dir, addr string) *Server { return StartWith(t, dir, addr, server.Options{}) }

// StartWith is Start with more options.
func StartWith(t testing.TB, dir, addr string, opts server.Options) *Server {
	t.Helper()
	if addr == "" {
		addr = "localhost:0"
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{cancel: cancel, done: make(chan error, 1)}
	ready := make(chan net.Addr, 1)
	go func() {
		opts.Addr, opts.DataDir = addr, dir
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
		opts.Ready = func(a net.Addr) { ready <- a }
		s.done <- server.Run(ctx, opts)
	}()
	select {
	case a := <-ready:
		s.Addr = a.String()
	case err := <-s.done:
		cancel()
		t.Fatalf("twind: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Stop shuts the server down and waits for it. It may be called more than
// once.
func (s *Server) Stop() {
	if s.cancel != nil {
		s.cancel()
		<-s.done
		s.cancel = nil
	}
}
