// Command twind is the twind daemon: a digital-twin server for fleets of
// devices, with its store embedded.
//
//	twind [--addr localhost:50051] [--data ./twind-data]
//
// Every flag can also be set in the environment: --addr as TWIND_ADDR,
// --data as TWIND_DATA. Flags win over the environment.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/twind-io/twind/server"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "twind:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("twind", flag.ContinueOnError)
	var opts server.Options
	fs.StringVar(&opts.Addr, "addr", envOr("TWIND_ADDR", "localhost:50051"), "address to serve gRPC on (env TWIND_ADDR)")
	fs.StringVar(&opts.DataDir, "data", envOr("TWIND_DATA", "./twind-data"), "directory of the embedded store (env TWIND_DATA)")
	logLevel := fs.String("log-level", envOr("TWIND_LOG_LEVEL", "info"), "log level: debug, info, warn or error (env TWIND_LOG_LEVEL)")
	fs.IntVar(&opts.Engine.Workers, "workers", 0, "shard worker goroutines (0: twice the CPUs)")
	fs.DurationVar(&opts.Engine.RuleTick, "rule-tick", 10*time.Second, "how often rules that read `now` are re-evaluated")
	fs.IntVar(&opts.Engine.HistoryLimit, "history-limit", 100, "versions of each twin kept for ListTwinHistory")
	fs.Int64Var(&opts.Engine.LogRetention, "log-retention", 1_000_000, "revisions kept in the watch log, for resuming watches")
	fs.IntVar(&opts.Engine.Limits.MaxDocumentBytes, "max-document-bytes", 64<<10, "maximum size of a reported or desired document")
	fs.IntVar(&opts.Engine.Limits.MaxDepth, "max-depth", 16, "maximum nesting depth of a document")
	fs.IntVar(&opts.Engine.Limits.MaxKeyBytes, "max-key-bytes", 256, "maximum length of a document key")
	fs.StringVar(&opts.TLSCertFile, "tls-cert", envOr("TWIND_TLS_CERT", ""), "serve TLS with this certificate chain (PEM; env TWIND_TLS_CERT)")
	fs.StringVar(&opts.TLSKeyFile, "tls-key", envOr("TWIND_TLS_KEY", ""), "the key of --tls-cert (PEM; env TWIND_TLS_KEY)")
	fs.StringVar(&opts.APIToken, "api-token", envOr("TWIND_API_TOKEN", ""), "if set, operator calls must carry 'authorization: Bearer <token>' (env TWIND_API_TOKEN)")
	fs.StringVar(&opts.DebugAddr, "debug-addr", envOr("TWIND_DEBUG_ADDR", ""), "if set, serve /metrics (Prometheus) and /debug/pprof on this HTTP address (env TWIND_DEBUG_ADDR)")
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		return nil
	} else if err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q; see twind --help", fs.Args())
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if _, ok := os.LookupEnv("GOGC"); !ok {
		// twind's garbage is short-lived request state over a large,
		// long-lived heap of twins: collecting less often is cheaper.
		debug.SetGCPercent(400)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return server.Run(ctx, opts)
}

func envOr(key, def string) string {
	if v, ok := os.LookupEnv(key); ok {
		return v
	}
	return def
}
