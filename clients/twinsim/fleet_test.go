package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/twind-io/twind/server"
)

// With TWINSIM_TEST_TWIND=1 the test binary is twind (--addr and --data
// only), so that the fleet benchmark's test runs a real twind process
// without building one.
func TestMain(m *testing.M) {
	if os.Getenv("TWINSIM_TEST_TWIND") == "1" {
		if err := runTestTwind(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "twind:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func runTestTwind(args []string) error {
	fs := flag.NewFlagSet("twind", flag.ContinueOnError)
	var opts server.Options
	fs.StringVar(&opts.Addr, "addr", "localhost:0", "")
	fs.StringVar(&opts.DataDir, "data", "", "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return server.Run(ctx, opts)
}

// The fleet benchmark runs every phase against a real twind process and
// measures something in each; the restarts, clean and after kill -9 under
// load, serve the whole fleet and every acknowledged report. Its figures
// are not checked: this is a functional test.
func TestFleetBench(t *testing.T) {
	if testing.Short() {
		t.Skip("runs twind three times")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	const n = 2000
	var out, progress bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := runFleetBench(ctx, fleetOptions{
		twins: n, twind: self, env: []string{"TWINSIM_TEST_TWIND=1"}, dir: t.TempDir(),
		createClients: 64, clients: 16, conns: 2, duration: 2 * time.Second, killAfter: time.Second,
		countMax: n, output: "json",
	}, &out, &progress)
	if err != nil {
		t.Fatalf("runFleetBench: %v\n%s", err, progress.String())
	}
	t.Logf("progress:\n%s", progress.String())
	var decoded FleetResult
	if err := json.Unmarshal(out.Bytes(), &decoded); err != nil {
		t.Fatalf("-o json: %v\n%s", err, out.String())
	}
	if d := cmp.Diff(*res, decoded); d != "" {
		t.Errorf("-o json differs from the result (-want +got):\n%s", d)
	}
	if res.Create.Calls != n || res.Existing != 0 || res.Create.Errors != 0 {
		t.Errorf("create: %d created, %d existing, %d errors; want %d, 0, 0", res.Create.Calls, res.Existing, res.Create.Errors, n)
	}
	for name, p := range map[string]LoadPhase{"uniform": res.Uniform, "80/20": res.Skewed, "until kill -9": res.Killed} {
		if p.Calls == 0 || p.PerSecond <= 0 || p.Latency.P50 <= 0 {
			t.Errorf("reports %s: %d calls, %.0f/s, p50 %.0f µs; want some", name, p.Calls, p.PerSecond, p.Latency.P50)
		}
		if name != "until kill -9" && p.Errors != 0 {
			t.Errorf("reports %s: %d errors (the first: %s); want 0", name, p.Errors, p.FirstError)
		}
	}
	for name, s := range map[string]Startup{"empty": res.Empty, "restart": res.Restart, "after kill -9": res.AfterKill} {
		if s.ServingLog <= 0 || s.ServingHealth <= 0 {
			t.Errorf("start %s: serving after %.3f s (log), %.3f s (health); want both measured", name, s.ServingLog, s.ServingHealth)
		}
		if _, err := os.Stat("/proc/self/status"); err == nil && s.RSSMiB <= 0 {
			t.Errorf("start %s: RSS %.1f MiB; want it measured", name, s.RSSMiB)
		}
		if name == "empty" {
			continue
		}
		if s.Listed != n || !s.LastFound {
			t.Errorf("start %s: %d twins listed, last found %v; want %d, true", name, s.Listed, s.LastFound, n)
		}
	}
	if res.AfterKill.AckedChecked == 0 || res.AfterKill.AckedLost != 0 {
		t.Errorf("after kill -9: %d of %d last acknowledged reports lost; want 0 of some", res.AfterKill.AckedLost, res.AfterKill.AckedChecked)
	}
	if res.StoreMiB <= 0 {
		t.Errorf("store %.1f MiB; want its size", res.StoreMiB)
	}
	var text bytes.Buffer
	if err := printFleet(&text, res, "text"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"restart after kill -9", "ReportState, 80/20", fmt.Sprintf("%d listed", n)} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text output lacks %q:\n%s", want, text.String())
		}
	}
}
