package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/structpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
)

// The test binary doubles as the daemon: with TWIND_TEST_DAEMON set it runs
// twind instead of the tests, so crash tests kill a real twind process.
func TestMain(m *testing.M) {
	if os.Getenv("TWIND_TEST_DAEMON") == "1" {
		run := run
		if suffix := os.Getenv("TWIND_TEST_FAIL_WRITES"); suffix != "" {
			run = func(args []string) error { return runFailingWrites(args, suffix) }
		}
		if err := run(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "twind:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runFailingWrites runs twind (only --addr and --data) on a filesystem
// whose writes to files whose names contain suffix fail once the process gets SIGUSR1,
// as a failing disk would; it logs "failing writes" when they start to.
// Memtables are small, so that flushes (and MANIFEST writes) come soon.
func runFailingWrites(args []string, suffix string) error {
	fs := flag.NewFlagSet("twind", flag.ContinueOnError)
	var opts server.Options
	fs.StringVar(&opts.Addr, "addr", "localhost:0", "")
	fs.StringVar(&opts.DataDir, "data", "", "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	var on atomic.Bool
	opts.Engine.FS = errorfs.Wrap(vfs.Default, errorfs.InjectorFunc(func(op errorfs.Op) error {
		if on.Load() && op.Kind.ReadOrWrite() == errorfs.OpIsWrite && strings.Contains(filepath.Base(op.Path), suffix) {
			return errorfs.ErrInjected
		}
		return nil
	}))
	opts.Engine.MemTableBytes = 256 << 10
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	go func() {
		<-usr1
		on.Store(true)
		opts.Logger.Info("failing writes", "files", "*"+suffix)
	}()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return server.Run(ctx, opts)
}

// daemon is a twind process started by a test.
type daemon struct {
	cmd  *exec.Cmd
	addr string
	done chan error
	// lines carries the lines of its log.
	lines chan string
}

var servingLine = regexp.MustCompile(`msg="twind serving" addr=(\S+)`)

func startDaemon(t *testing.T, args ...string) *daemon {
	t.Helper()
	return startDaemonEnv(t, nil, args...)
}

// startDaemonEnv starts twind with more environment variables.
func startDaemonEnv(t *testing.T, env []string, args ...string) *daemon {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, append([]string{"--addr", "localhost:0"}, args...)...)
	cmd.Env = append(append(os.Environ(), "TWIND_TEST_DAEMON=1"), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{cmd: cmd, done: make(chan error, 1), lines: make(chan string, 10000)}
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if m := servingLine.FindStringSubmatch(sc.Text()); m != nil {
				addr <- m[1]
			}
			select {
			case d.lines <- sc.Text():
			default: // nobody reads them
			}
		}
		d.done <- cmd.Wait()
	}()
	select {
	case d.addr = <-addr:
	case err := <-d.done:
		t.Fatalf("twind exited before serving: %v", err)
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("twind did not start serving within 30s")
	}
	t.Cleanup(func() { d.kill(t) })
	return d
}

// waitLog waits for a line of the daemon's log that contains s, and
// returns it with the lines before it.
func (d *daemon) waitLog(t *testing.T, s string) []string {
	t.Helper()
	var seen []string
	deadline := time.After(30 * time.Second)
	for {
		select {
		case l := <-d.lines:
			seen = append(seen, l)
			if strings.Contains(l, s) {
				return seen
			}
		case <-deadline:
			t.Fatalf("twind did not log %q within 30s; it logged:\n%s", s, strings.Join(seen, "\n"))
		}
	}
}

func (d *daemon) kill(t *testing.T) {
	if d.cmd.ProcessState != nil {
		return
	}
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
}

func dial(t *testing.T, addr string) twinv1.TwinServiceClient {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return twinv1.NewTwinServiceClient(conn)
}

// TestCrashLosesNoAcknowledgedWrite kills twind with SIGKILL while many
// clients write, restarts it, and checks that every acknowledged write is
// there. It does so for several rounds on the same store.
//
// SIGKILL ends the process but keeps the operating system's page cache, so
// this proves that an acknowledged write had reached the operating system,
// and that recovery replays it: it would pass with every fsync disabled.
// That acknowledged writes survive power loss is established by the crash
// tests of package twin, on Pebble's crashable filesystem.
func TestCrashLosesNoAcknowledgedWrite(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real processes")
	}
	dir := t.TempDir()
	const writers = 16
	acked := make([]float64, writers) // highest acknowledged counter per twin
	versions := make([]int64, writers)
	for round := range 3 {
		d := startDaemon(t, "--data", dir)
		c := dial(t, d.addr)
		ctx := context.Background()
		if round == 0 {
			for w := range writers {
				if _, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: fmt.Sprint("car-", w), Type: "car"}}); err != nil {
					t.Fatal(err)
				}
				versions[w] = 1
			}
		}
		// Everything acknowledged before the last crash is there.
		for w := range writers {
			got, err := c.GetTwin(ctx, &twinv1.GetTwinRequest{Id: fmt.Sprint("car-", w)})
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			n := got.Twin.Reported.GetFields()["odometer_km"].GetNumberValue()
			if n < acked[w] || got.Twin.Version < versions[w] {
				t.Errorf("round %d: car-%d has odometer %v at version %d; %v at version %d was acknowledged",
					round, w, n, got.Twin.Version, acked[w], versions[w])
			}
			acked[w], versions[w] = n, got.Twin.Version
		}
		// Write concurrently and kill the process mid-flight.
		var wg sync.WaitGroup
		stop := make(chan struct{})
		var writes atomic.Int64
		enough := make(chan struct{})
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := acked[w] + 1; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					resp, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: fmt.Sprint("car-", w),
						Patch: &structpb.Struct{Fields: map[string]*structpb.Value{"odometer_km": structpb.NewNumberValue(i)}}})
					if err != nil {
						return // the process is gone
					}
					acked[w], versions[w] = i, resp.Twin.Version
					if writes.Add(1) == 2000 {
						close(enough)
					}
				}
			}()
		}
		select { // kill once the load is well under way
		case <-enough:
		case <-time.After(time.Minute):
			t.Fatal("fewer than 2000 writes acknowledged in a minute")
		}
		d.kill(t)
		close(stop)
		wg.Wait()
		total := 0.0
		for _, n := range acked {
			total += n
		}
		t.Logf("round %d: %v writes acknowledged in all before SIGKILL", round, total)
	}
}

func TestFlags(t *testing.T) {
	for _, args := range [][]string{
		{"--no-such-flag"},
		{"--log-level", "loud"},
		{"extra"},
	} {
		if err := run(args); err == nil {
			t.Errorf("run(%q) = nil; want an error", args)
		}
	}
	if err := run([]string{"--help"}); err != nil {
		t.Errorf("run(--help) = %v; want nil", err)
	}
}

// TestCommandsSurviveCrash queues commands for an offline device, kills
// twind with SIGKILL, restarts it, and checks that the device receives every
// acknowledged command, in order, when it connects.
// Like every SIGKILL test, it proves "written to the OS", not "durable".
func TestCommandsSurviveCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real processes")
	}
	dir := t.TempDir()
	d := startDaemon(t, "--data", dir)
	conn, err := grpc.NewClient(d.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	tc := twinv1.NewTwinServiceClient(conn)
	cc := twinv1.NewCommandServiceClient(conn)
	if _, err := tc.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "planter-1", Type: "planter"}}); err != nil {
		t.Fatal(err)
	}
	tok, err := tc.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: "planter-1"})
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for i := range 20 {
		c, err := cc.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "planter-1", Name: "water",
			Params: &structpb.Struct{Fields: map[string]*structpb.Value{"seconds": structpb.NewNumberValue(float64(i))}}})
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, c.Command.Id)
	}
	conn.Close()
	d.kill(t)

	d = startDaemon(t, "--data", dir)
	conn, err = grpc.NewClient(d.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	st, err := twinv1.NewDeviceServiceClient(conn).Connect(sctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{DeviceId: "planter-1", Token: tok.Token}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := st.Recv(); err != nil || m.GetWelcome() == nil {
		t.Fatalf("first message = %v, %v; want the welcome", m, err)
	}
	var got []string
	for len(got) < len(want) {
		m, err := st.Recv()
		if err != nil {
			t.Fatalf("after %d commands: %v", len(got), err)
		}
		got = append(got, m.GetCommand().GetId())
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("after SIGKILL and restart the device received %v; want %v", got, want)
	}
}

// TestRuleEffectsAreAtomic runs a rule whose firing sends a command and sets
// desired state, kills twind with SIGKILL while many twins make it fire,
// and checks after the restart that every firing left both effects or
// neither: each twin holds exactly as many `water` commands from the rule as
// its history holds desired changes by the rule that turned the pump on.
// SIGKILL keeps the page cache: twin's crash tests check the same atomicity
// across power loss.
func TestRuleEffectsAreAtomic(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real processes")
	}
	dir := t.TempDir()
	d := startDaemon(t, "--data", dir)
	conn, err := grpc.NewClient(d.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	tc := twinv1.NewTwinServiceClient(conn)
	rc := twinv1.NewRuleServiceClient(conn)
	for _, r := range []*twinv1.Rule{
		{Id: "dry", Types: []string{"planter"}, Condition: "twin.reported.soil_moisture < 30.0 && twin.desired.?pump.orValue('off') != 'on'",
			Actions: []*twinv1.Action{
				{Action: &twinv1.Action_Command{Command: &twinv1.CommandAction{Name: "water", Params: "{'seconds': 30}"}}},
				{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{Patch: "{'pump': 'on'}"}}},
			}},
		{Id: "wet", Types: []string{"planter"}, Condition: "twin.reported.soil_moisture > 55.0 && twin.desired.?pump.orValue('off') == 'on'",
			Actions: []*twinv1.Action{{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{Patch: "{'pump': 'off'}"}}}}},
	} {
		if _, err := rc.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: r}); err != nil {
			t.Fatal(err)
		}
	}
	const planters, cycles = 16, 20 // within the history and command retention
	for i := range planters {
		if _, err := tc.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: fmt.Sprint("planter-", i), Type: "planter"}}); err != nil {
			t.Fatal(err)
		}
	}
	var writes atomic.Int64
	enough := make(chan struct{})
	var wg sync.WaitGroup
	for i := range planters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 2 * cycles {
				moisture := 20.0
				if j%2 == 1 {
					moisture = 60
				}
				_, err := tc.ReportState(ctx, &twinv1.ReportStateRequest{Id: fmt.Sprint("planter-", i),
					Patch: &structpb.Struct{Fields: map[string]*structpb.Value{"soil_moisture": structpb.NewNumberValue(moisture)}}})
				if err != nil {
					return // killed
				}
				if writes.Add(1) == planters*cycles {
					close(enough)
				}
			}
		}()
	}
	select {
	case <-enough:
	case <-time.After(time.Minute):
		t.Fatal("the load did not get under way within a minute")
	}
	d.kill(t)
	wg.Wait()
	conn.Close()

	d = startDaemon(t, "--data", dir)
	conn, err = grpc.NewClient(d.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tc = twinv1.NewTwinServiceClient(conn)
	cc := twinv1.NewCommandServiceClient(conn)
	total := 0
	for i := range planters {
		id := fmt.Sprint("planter-", i)
		cmds, err := cc.ListCommands(ctx, &twinv1.ListCommandsRequest{DeviceId: id, PageSize: 1000})
		if err != nil {
			t.Fatal(err)
		}
		h, err := tc.ListTwinHistory(ctx, &twinv1.ListTwinHistoryRequest{Id: id, PageSize: 1000})
		if err != nil {
			t.Fatal(err)
		}
		pumpOn := 0
		for _, ev := range h.Events {
			if ev.Source == "rule:dry" && ev.Patch.GetFields()["pump"].GetStringValue() == "on" {
				pumpOn++
			}
		}
		if len(cmds.Commands) != pumpOn {
			t.Errorf("%s: %d water commands but %d pump-on changes by the rule", id, len(cmds.Commands), pumpOn)
		}
		total += pumpOn
	}
	if total == 0 {
		t.Error("no rule fired before the kill")
	}
	t.Logf("%d firings, each with both effects or neither", total)
}

// TestStoreFailureExits makes the store's writes fail under a running twind,
// as a failing or full disk does where a write cannot be retried safely (the
// WAL; the MANIFEST, which every flush writes): twind must say so and exit
// non-zero, and a restart on the healthy disk must serve every acknowledged
// write.
func TestStoreFailureExits(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real processes")
	}
	for _, tc := range []struct {
		name, files string
		logs        string // what the log says about the failure
	}{
		{"WAL", ".log", "a restart recovers"},
		{"MANIFEST", "MANIFEST-", "a restart recovers"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			d := startDaemonEnv(t, []string{"TWIND_TEST_FAIL_WRITES=" + tc.files}, "--data", dir)
			conn, err := grpc.NewClient(d.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			c := twinv1.NewTwinServiceClient(conn)
			const twins = 8
			for i := range twins {
				if _, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: fmt.Sprint("car-", i), Type: "car"}}); err != nil {
					t.Fatal(err)
				}
			}
			wctx, stopWatch := context.WithCancel(ctx)
			defer stopWatch()
			hw, err := healthpb.NewHealthClient(conn).Watch(wctx, &healthpb.HealthCheckRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if m, err := hw.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("health = %v, %v; want SERVING", m, err)
			}
			d.cmd.Process.Signal(syscall.SIGUSR1)
			d.waitLog(t, "failing writes")

			// Write until a write fails: at once for the WAL, at the first
			// flush for the MANIFEST. Every acknowledged write is recorded.
			acked := make([]float64, twins)
			blob := strings.Repeat("x", 1<<10)
		write:
			for i := 1; ; i++ {
				for w := range twins {
					_, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: fmt.Sprint("car-", w),
						Patch: &structpb.Struct{Fields: map[string]*structpb.Value{"odometer_km": structpb.NewNumberValue(float64(i)),
							"blob": structpb.NewStringValue(blob)}}})
					if err != nil {
						t.Logf("write %d failed: %v", i, err)
						break write
					}
					acked[w] = float64(i)
				}
			}
			// Health says NOT_SERVING if twind lives long enough to say it.
			if m, err := hw.Recv(); err == nil {
				if m.Status != healthpb.HealthCheckResponse_NOT_SERVING {
					t.Errorf("health after the store failed = %v; want NOT_SERVING", m.Status)
				}
				t.Logf("health after the store failed: %v", m.Status)
			}
			stopWatch() // an open watch would hold up the shutdown
			lines := d.waitLog(t, tc.logs)
			t.Logf("twind logged: %s", lines[len(lines)-1])
			select {
			case err := <-d.done:
				var exit *exec.ExitError
				if !errors.As(err, &exit) || exit.ExitCode() == 0 {
					t.Errorf("twind exited with %v after the store failed; want a non-zero exit", err)
				} else {
					t.Logf("twind exited with code %d", exit.ExitCode())
				}
			case <-time.After(30 * time.Second):
				t.Fatal("twind still running 30s after the store failed")
			}

			d = startDaemon(t, "--data", dir)
			conn2, err := grpc.NewClient(d.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer conn2.Close()
			c = twinv1.NewTwinServiceClient(conn2)
			for w := range twins {
				got, err := c.GetTwin(ctx, &twinv1.GetTwinRequest{Id: fmt.Sprint("car-", w)})
				if err != nil {
					t.Errorf("after the restart: %v", err)
					continue
				}
				if n := got.Twin.Reported.GetFields()["odometer_km"].GetNumberValue(); n < acked[w] {
					t.Errorf("after the restart car-%d has odometer %v; %v was acknowledged", w, n, acked[w])
				}
			}
			h, err := healthpb.NewHealthClient(conn2).Check(ctx, &healthpb.HealthCheckRequest{})
			if err != nil || h.Status != healthpb.HealthCheckResponse_SERVING {
				t.Errorf("health after the restart = %v, %v; want SERVING", h, err)
			}
		})
	}
}
