package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// The test binary doubles as the daemon: with TWIND_TEST_DAEMON set it runs
// twind instead of the tests, so crash tests kill a real twind process.
func TestMain(m *testing.M) {
	if os.Getenv("TWIND_TEST_DAEMON") == "1" {
		if err := run(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "twind:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// daemon is a twind process started by a test.
type daemon struct {
	cmd  *exec.Cmd
	addr string
	done chan error
}

var servingLine = regexp.MustCompile(`msg="twind serving" addr=(\S+)`)

func startDaemon(t *testing.T, args ...string) *daemon {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, append([]string{"--addr", "localhost:0"}, args...)...)
	cmd.Env = append(os.Environ(), "TWIND_TEST_DAEMON=1")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{cmd: cmd, done: make(chan error, 1)}
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if m := servingLine.FindStringSubmatch(sc.Text()); m != nil {
				addr <- m[1]
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
