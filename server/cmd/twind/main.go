// Command twind is the twind daemon: a digital-twin server for fleets of
// devices, with its store embedded.
//
//	twind [--addr localhost:50051] [--data ./twind-data] [--api-keys FILE]
//	twind check [--data ./twind-data] [--history-limit 0]
//
// `twind check` checks a stopped twind's store offline: it prints each key
// that breaks an invariant of the store, and exits 1 if there is any.
//
// Every flag can also be set in the environment: --addr as TWIND_ADDR,
// --data as TWIND_DATA. Flags win over the environment. SIGHUP re-reads
// --api-keys and --api-token-file.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/twind-io/twind/server"
	"github.com/twind-io/twind/twin"
)

// errUsage is a bad command line, already reported by the flag package.
var errUsage = errors.New("bad command line")

func main() {
	err := run(os.Args[1:])
	switch {
	case errors.Is(err, errUsage):
		os.Exit(2)
	case err != nil:
		fmt.Fprintln(os.Stderr, "twind:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) > 0 && args[0] == "check" {
		return check(args[1:], os.Stdout)
	}
	fs := flag.NewFlagSet("twind", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: twind [flags]           serve (see the flags below)")
		fmt.Fprintln(fs.Output(), "       twind check [--data DIR] check a stopped twind's store (twind check --help)")
		fmt.Fprintln(fs.Output(), "\nFlags:")
		fs.PrintDefaults()
	}
	var opts server.Options
	fs.StringVar(&opts.Addr, "addr", envOr("TWIND_ADDR", "localhost:50051"), "address to serve gRPC on (env TWIND_ADDR)")
	fs.StringVar(&opts.DataDir, "data", envOr("TWIND_DATA", "./twind-data"), "directory of the embedded store (env TWIND_DATA)")
	logLevel := fs.String("log-level", envOr("TWIND_LOG_LEVEL", "info"), "log level: debug, info, warn or error (env TWIND_LOG_LEVEL)")
	fs.IntVar(&opts.Engine.Workers, "workers", 0, "shard worker goroutines (0: twice the CPUs)")
	fs.DurationVar(&opts.Engine.RuleTick, "rule-tick", 10*time.Second, "how often rules that read the time (now) are re-evaluated for every twin")
	fs.DurationVar(&opts.Engine.PresenceGrace, "presence-grace", 10*time.Second, "after a restart, how long devices that were connected have to reconnect before their twins are marked disconnected")
	fs.DurationVar(&opts.ShutdownTimeout, "shutdown-timeout", 10*time.Second, "how long a shutdown waits for calls in flight before it cancels them")
	fs.DurationVar(&opts.DeviceSendTimeout, "device-send-timeout", 30*time.Second, "a device stream that reads nothing for this long is disconnected (its commands stay queued)")
	fs.DurationVar(&opts.WatchSendTimeout, "watch-send-timeout", 30*time.Second, "a watch whose client reads nothing for this long is ended; it resumes from the revision it is told")
	cacheSize, memoryLimit := byteSize(512<<20), byteSize(0)
	if err := envSize(&cacheSize, "TWIND_CACHE_SIZE"); err != nil {
		return err
	}
	if err := envSize(&memoryLimit, "TWIND_MEMORY_LIMIT"); err != nil {
		return err
	}
	fs.Var(&cacheSize, "cache-size", "memory for twins in use and the store's block cache together; twins beyond it are read from the store (env TWIND_CACHE_SIZE)")
	fs.Var(&memoryLimit, "memory-limit", "Go's soft memory limit (GOMEMLIMIT); 0: twice --cache-size plus 512MiB (env TWIND_MEMORY_LIMIT)")
	fs.Uint64Var(&opts.ListCostBudget, "list-cost-budget", 10_000_000, "CEL cost a ListTwins page may spend on its filter before it answers with a next_page_token (50 per twin plus the filter's cost)")
	fs.IntVar(&opts.Engine.HistoryLimit, "history-limit", 100, "versions of each twin kept for ListTwinHistory")
	fs.Int64Var(&opts.Engine.LogRetention, "log-retention", 1_000_000, "revisions kept in the watch log, for resuming watches")
	fs.IntVar(&opts.Engine.Limits.MaxDocumentBytes, "max-document-bytes", 64<<10, "maximum size of a reported or desired document")
	fs.IntVar(&opts.Engine.Limits.MaxDepth, "max-depth", 16, "maximum nesting depth of a document")
	fs.IntVar(&opts.Engine.Limits.MaxKeyBytes, "max-key-bytes", 256, "maximum length of a document key")
	fs.StringVar(&opts.TLSCertFile, "tls-cert", envOr("TWIND_TLS_CERT", ""), "serve TLS with this certificate chain (PEM; env TWIND_TLS_CERT)")
	fs.StringVar(&opts.TLSKeyFile, "tls-key", envOr("TWIND_TLS_KEY", ""), "the key of --tls-cert (PEM; env TWIND_TLS_KEY)")
	fs.StringVar(&opts.APIKeysFile, "api-keys", envOr("TWIND_API_KEYS", ""), "file of API keys, one a line: '<role> <sha256 of the key, hex> <name>'; re-read on SIGHUP (env TWIND_API_KEYS)")
	fs.StringVar(&opts.APIToken, "api-token", envOr("TWIND_API_TOKEN", ""), "an admin API key named api-token; visible in the process list, prefer --api-token-file (env TWIND_API_TOKEN)")
	fs.StringVar(&opts.APITokenFile, "api-token-file", envOr("TWIND_API_TOKEN_FILE", ""), "file holding an admin API key named api-token; re-read on SIGHUP (env TWIND_API_TOKEN_FILE)")
	fs.BoolVar(&opts.AllowOpenAPI, "allow-open-api", os.Getenv("TWIND_ALLOW_OPEN_API") == "true", "serve the operator API without API keys on an address other machines can reach (env TWIND_ALLOW_OPEN_API=true); without it twind refuses to start on such an address")
	fs.StringVar(&opts.DebugAddr, "debug-addr", envOr("TWIND_DEBUG_ADDR", ""), "if set, serve /metrics (Prometheus) and /debug/pprof on this HTTP address (env TWIND_DEBUG_ADDR)")
	finishLimits := limitFlags(fs, &opts)
	var cf clusterFlags
	cf.register(fs)
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		return nil
	} else if err != nil {
		return errUsage // the flag package has said what is wrong, and the usage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q; see twind --help", fs.Args())
	}
	if err := finishLimits(); err != nil {
		return err
	}
	// 0 means the default; a negative value is a mistake, not a default.
	var bad []string
	fs.Visit(func(f *flag.Flag) {
		switch v := f.Value.(flag.Getter).Get().(type) {
		case int:
			if v < 0 {
				bad = append(bad, fmt.Sprintf("--%s %s", f.Name, f.Value))
			}
		case int64:
			if v < 0 {
				bad = append(bad, fmt.Sprintf("--%s %s", f.Name, f.Value))
			}
		case time.Duration:
			if v < 0 {
				bad = append(bad, fmt.Sprintf("--%s %s", f.Name, f.Value))
			}
		}
	})
	if len(bad) > 0 {
		return fmt.Errorf("%s: must not be negative (0 means the default)", strings.Join(bad, ", "))
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	cacheSize, memoryLimit = memorySizes(cacheSize, memoryLimit)
	opts.Engine.CacheBytes = int64(cacheSize)
	if _, ok := os.LookupEnv("GOMEMLIMIT"); !ok {
		// The heap is bounded by the cache, not by the fleet: the limit
		// makes the collector work harder only as the heap nears it.
		debug.SetMemoryLimit(int64(memoryLimit))
	}
	if _, ok := os.LookupEnv("GOGC"); !ok {
		// twind's garbage is short-lived request state: collecting less
		// often is cheaper (a fifth more acknowledged stream reports on
		// two cores), and the memory limit, not GOGC, bounds the heap.
		debug.SetGCPercent(400)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var stopHangups func()
	opts.Reload, stopHangups = hangups()
	defer stopHangups()
	if cf.enabled() {
		if err := cf.check(&opts); err != nil {
			return err
		}
		return runCluster(ctx, cf, opts)
	}
	return server.Run(ctx, opts)
}

// check runs `twind check`: it checks the store offline, prints each
// violation to stdout, and fails if there is any.
// envSize sets *b from the environment variable name, if it is set.
func envSize(b *byteSize, name string) error {
	if v, ok := os.LookupEnv(name); ok {
		if err := b.Set(v); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

func check(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("twind check", flag.ContinueOnError)
	var opts twin.Options
	fs.StringVar(&opts.Dir, "data", envOr("TWIND_DATA", "./twind-data"), "directory of the store to check; twind must not be running on it (env TWIND_DATA)")
	fs.IntVar(&opts.HistoryLimit, "history-limit", 0, "history entries more than this many versions old are violations (0: the largest --history-limit the store was run with)")
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		return nil
	} else if err != nil {
		return errUsage // the flag package has said what is wrong, and the usage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q; see twind check --help", fs.Args())
	}
	opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	vs, err := twin.Check(opts)
	if err != nil {
		return err
	}
	for _, v := range vs {
		fmt.Fprintln(stdout, v)
	}
	if len(vs) > 0 {
		return fmt.Errorf("check: %d violations in %s", len(vs), opts.Dir)
	}
	fmt.Fprintf(stdout, "%s: no violations\n", opts.Dir)
	return nil
}

func envOr(key, def string) string {
	if v, ok := os.LookupEnv(key); ok {
		return v
	}
	return def
}
