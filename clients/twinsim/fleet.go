package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/twind-io/twind/clients/twind"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// fleetOptions configure `twinsim fleet`.
type fleetOptions struct {
	twins int
	// twind is the twind binary to run; empty builds one with `go build`
	// (from inside the repository) into the work directory.
	twind string
	// twindArgs are more flags for twind (--addr and --data are set).
	twindArgs []string
	// env is added to twind's environment.
	env []string
	// dir is the work directory (data and log); empty for a temporary one,
	// removed at the end unless keep.
	dir  string
	keep bool
	// skipCreate: the twins are there already (a kept --dir).
	skipCreate bool
	// create is how the twins are created: "import" (ImportTwins streams,
	// batches of 1,000) or "calls" (CreateTwin calls).
	create string
	// createClients is how many CreateTwin calls are in flight; clients
	// how many ReportState calls, over conns connections.
	createClients, clients, conns int
	// duration of each report phase; killAfter: how long the load runs
	// before twind is killed with SIGKILL.
	duration, killAfter time.Duration
	// countMax: the twins are counted with ListTwins after each restart
	// if there are at most this many (a full listing of millions takes
	// long); the first and last are always read.
	countMax int
	output   string // "text" or "json"
}

func (o *fleetOptions) ensureDefaults() error {
	if o.createClients <= 0 {
		o.createClients = 128
	}
	if o.clients <= 0 {
		o.clients = 64
	}
	if o.conns <= 0 {
		o.conns = 4
	}
	if o.killAfter <= 0 {
		o.killAfter = 2 * time.Second
	}
	if o.output == "" {
		o.output = "text"
	}
	if o.create == "" {
		o.create = "import"
	}
	if o.create != "import" && o.create != "calls" {
		return fmt.Errorf("--create must be import or calls, not %q", o.create)
	}
	if o.twins <= 0 || o.duration <= 0 {
		return fmt.Errorf("--twins and --duration must be positive")
	}
	if o.output != "text" && o.output != "json" {
		return fmt.Errorf("-o must be text or json, not %q", o.output)
	}
	if o.skipCreate && o.dir == "" {
		return fmt.Errorf("--skip-create needs the --dir of an earlier run that kept its twins")
	}
	return nil
}

// fridgeDoc is the fridge twin of issue 9 (8 reported leaves, one nested
// object, 2 desired, 1 label).
const fridgeDoc = `{"type": "fridge", "labels": {"site": "berlin"},
 "reported": {"temp_c": 2.3, "door": "closed", "power_w": 80, "compressor": false, "target_c": 4,
              "eco": true, "fw": "1.2.3", "site": {"city": "berlin", "floor": 3}},
 "desired": {"target_c": 4, "eco": true}}`

func fridgeID(i int) string { return "fridge-" + strconv.Itoa(i) }

// Startup is one start of twind.
type Startup struct {
	// Seconds from starting the process until its log says "twind
	// serving", and until its health check first answers SERVING.
	ServingLog    float64 `json:"serving_log_s"`
	ServingHealth float64 `json:"serving_health_s"`
	// RSSMiB is twind's resident memory once serving.
	RSSMiB float64 `json:"rss_mib"`
	// Listed is how many fridge twins ListTwins returned after the start
	// (-1: not counted, see --count-max); LastFound says whether
	// the first and the last twin (fridge-0 and fridge-<N-1>) were there.
	Listed    int  `json:"listed"`
	LastFound bool `json:"last_found"`
	// AckedChecked and AckedLost, after kill -9: the last acknowledged
	// report of each client, and how many of them the twin had lost.
	AckedChecked int `json:"acked_checked,omitempty"`
	AckedLost    int `json:"acked_lost,omitempty"`
}

// LoadPhase is a phase of calls.
type LoadPhase struct {
	Seconds   float64 `json:"seconds"`
	Calls     int64   `json:"calls"` // that succeeded
	PerSecond float64 `json:"per_second"`
	Errors    int64   `json:"errors"`
	// FirstError is the first error, if any.
	FirstError string  `json:"first_error,omitempty"`
	Latency    Latency `json:"latency"`
	// RSSMiB and PeakRSSMiB: twind's resident memory at the end of the
	// phase, and the most it has had since it started (VmHWM).
	RSSMiB     float64 `json:"rss_mib"`
	PeakRSSMiB float64 `json:"peak_rss_mib"`
}

// FleetResult is what `twinsim fleet` measured.
type FleetResult struct {
	Twins   int    `json:"twins"`
	Clients int    `json:"clients"`
	Twind   string `json:"twind"`
	Dir     string `json:"dir"`
	// Empty is twind's first start: on an empty store, or with
	// --skip-create on the fleet already there (SkipCreate).
	Empty      Startup `json:"start_empty"`
	SkipCreate bool    `json:"skip_create,omitempty"`
	// Create is creating the twins with CreateTwin; Calls counts those
	// created, Existing those already there (a reused --dir).
	Create LoadPhase `json:"create"`
	// CreateMode is how the twins were created: "import" or "calls".
	CreateMode string `json:"create_mode"`
	Existing   int64  `json:"existing"`
	// Uniform and Skewed are durable ReportState calls to random twins:
	// uniformly, and 80 % of them to the first 20 % of the ids.
	Uniform LoadPhase `json:"reports_uniform"`
	Skewed  LoadPhase `json:"reports_skewed"`
	// Restart is a start after a clean shutdown (SIGTERM).
	Restart Startup `json:"restart"`
	// Killed is the uniform load during which twind got SIGKILL, and
	// AfterKill the start after it.
	Killed    LoadPhase `json:"reports_until_kill9"`
	AfterKill Startup   `json:"restart_after_kill9"`
	// StoreMiB is the size of the data directory at the end.
	StoreMiB float64 `json:"store_mib"`
}

// runFleetBench runs a twind on a fresh store, creates o.twins fridge
// twins (fridge-0, fridge-1, ...), and measures start-up, resident memory
// and durable report throughput, writing progress to progress and the
// result to out.
func runFleetBench(ctx context.Context, o fleetOptions, out, progress io.Writer) (*FleetResult, error) {
	if err := o.ensureDefaults(); err != nil {
		return nil, err
	}
	dir := o.dir
	if dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
	} else {
		d, err := os.MkdirTemp("", "twinsim-fleet-")
		if err != nil {
			return nil, err
		}
		dir = d
		if !o.keep {
			defer os.RemoveAll(dir)
		}
	}
	bin := o.twind
	if bin == "" {
		bin = filepath.Join(dir, "twind")
		fmt.Fprintf(progress, "building twind into %s...\n", bin)
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/twind-io/twind/server/cmd/twind")
		cmd.Stdout, cmd.Stderr = progress, progress
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("go build twind (run twinsim fleet inside the repository, or pass --twind): %w", err)
		}
	}
	res := &FleetResult{Twins: o.twins, Clients: o.clients, Twind: bin, Dir: dir}
	data := filepath.Join(dir, "data")
	logf := func(format string, args ...any) { fmt.Fprintf(progress, format+"\n", args...) }

	d, err := startDaemon(ctx, bin, data, filepath.Join(dir, "twind.log"), o)
	if err != nil {
		return nil, err
	}
	defer func() {
		if d != nil {
			d.kill()
		}
	}()
	res.Empty, res.SkipCreate, res.CreateMode = d.startup(), o.skipCreate, o.create
	logf("%s: serving after %.2f s, RSS %.0f MiB", firstStart(res), res.Empty.ServingLog, res.Empty.RSSMiB)

	if err := func() error {
		conns, err := dialAll(d.addr, o.conns)
		if err != nil {
			return err
		}
		defer closeAll(conns)
		if o.skipCreate {
			logf("not creating the twins (--skip-create)")
		} else {
			var existing atomic.Int64
			if o.create == "import" {
				logf("importing %d twins over %d streams...", o.twins, len(conns))
				res.Create, err = importFleet(ctx, conns, o, &existing, progress)
			} else {
				logf("creating %d twins with %d calls in flight...", o.twins, o.createClients)
				res.Create, err = createFleet(ctx, conns, o, &existing, progress)
			}
			res.Existing = existing.Load()
			if err != nil {
				return err
			}
			res.Create.RSSMiB, res.Create.PeakRSSMiB = d.rss()
			logf("created %d twins in %.1f s (%.0f/s), RSS %.0f MiB", res.Create.Calls, res.Create.Seconds, res.Create.PerSecond, res.Create.RSSMiB)
		}
		for _, p := range []struct {
			name string
			hot  float64 // share of the reports to the first 20 % of the twins; 0 for uniform
			res  *LoadPhase
		}{{"uniform", 0, &res.Uniform}, {"80/20", 0.8, &res.Skewed}} {
			logf("reports, %s, %d clients, %s...", p.name, o.clients, o.duration)
			*p.res, _ = reportLoad(ctx, conns, o, p.hot, time.Now().Add(o.duration), nil, nil)
			p.res.RSSMiB, p.res.PeakRSSMiB = d.rss()
			logf("  %.0f reports/s, p50 %.1f ms, p99 %.1f ms, %d errors, RSS %.0f MiB", p.res.PerSecond,
				p.res.Latency.P50/1e3, p.res.Latency.P99/1e3, p.res.Errors, p.res.RSSMiB)
			if p.res.Errors > 0 {
				logf("  first error: %s", p.res.FirstError)
			}
			if p.res.Calls == 0 {
				return fmt.Errorf("no report succeeded (%d errors): see %s", p.res.Errors, d.logPath)
			}
		}
		return nil
	}(); err != nil {
		return nil, err
	}

	logf("restarting twind (SIGTERM)...")
	if err := d.stop(); err != nil {
		return nil, err
	}
	if d, err = startDaemon(ctx, bin, data, filepath.Join(dir, "twind.log"), o); err != nil {
		return nil, err
	}
	res.Restart = d.startup()
	logf("restart: serving after %.2f s, RSS %.0f MiB", res.Restart.ServingLog, res.Restart.RSSMiB)
	if err := verifyFleet(ctx, d.addr, o, &res.Restart); err != nil {
		return nil, err
	}

	logf("reports for %s, then kill -9...", o.killAfter)
	var lastAcks []ack
	if err := func() error {
		conns, err := dialAll(d.addr, o.conns)
		if err != nil {
			return err
		}
		defer closeAll(conns)
		killing, killed := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(killed)
			t := time.NewTimer(o.killAfter)
			defer t.Stop()
			select {
			case <-t.C:
			case <-ctx.Done():
			}
			d.rss() // kept in d.lastRSS, d.lastPeak
			close(killing)
			d.kill()
		}()
		// The load runs until the kill cuts it off (or a minute more).
		res.Killed, lastAcks = reportLoad(ctx, conns, o, 0, time.Now().Add(o.killAfter+time.Minute), killing, killed)
		<-killed
		return nil
	}(); err != nil {
		return nil, err
	}
	res.Killed.RSSMiB, res.Killed.PeakRSSMiB = d.lastRSS, d.lastPeak
	logf("  %d reports acknowledged before the kill", res.Killed.Calls)
	if d, err = startDaemon(ctx, bin, data, filepath.Join(dir, "twind.log"), o); err != nil {
		return nil, err
	}
	res.AfterKill = d.startup()
	logf("restart after kill -9: serving after %.2f s, RSS %.0f MiB", res.AfterKill.ServingLog, res.AfterKill.RSSMiB)
	if err := verifyFleet(ctx, d.addr, o, &res.AfterKill); err != nil {
		return nil, err
	}
	if err := verifyAcks(ctx, d.addr, lastAcks, &res.AfterKill); err != nil {
		return nil, err
	}
	if err := d.stop(); err != nil {
		return nil, err
	}
	res.StoreMiB = float64(dirSize(data)) / (1 << 20)
	if o.keep {
		logf("kept %s (data and twind.log)", dir)
	}
	return res, printFleet(out, res, o.output)
}

func printFleet(w io.Writer, r *FleetResult, output string) error {
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	fmt.Fprintf(w, "fleet of %d fridge twins, %d report clients; store %.0f MiB\n", r.Twins, r.Clients, r.StoreMiB)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "phase\tseconds\tper second\tp50 ms\tp99 ms\terrors\tRSS MiB\tpeak RSS MiB\t")
	start := func(name string, s Startup) {
		fmt.Fprintf(tw, "%s\t%.2f\t\t\t\t\t%.0f\t\t\n", name, s.ServingLog, s.RSSMiB)
	}
	load := func(name string, p LoadPhase) {
		fmt.Fprintf(tw, "%s\t%.1f\t%.0f\t%.1f\t%.1f\t%d\t%.0f\t%.0f\t\n", name, p.Seconds, p.PerSecond,
			p.Latency.P50/1e3, p.Latency.P99/1e3, p.Errors, p.RSSMiB, p.PeakRSSMiB)
	}
	start(firstStart(r), r.Empty)
	if !r.SkipCreate {
		load(map[bool]string{true: "ImportTwins (twins)", false: "CreateTwin"}[r.CreateMode != "calls"], r.Create)
	}
	load("ReportState, uniform", r.Uniform)
	load("ReportState, 80/20", r.Skewed)
	start("restart (SIGTERM)", r.Restart)
	load("ReportState until kill -9", r.Killed)
	start("restart after kill -9", r.AfterKill)
	if err := tw.Flush(); err != nil {
		return err
	}
	counted := func(s Startup) string {
		if s.Listed < 0 {
			return "not counted"
		}
		return fmt.Sprintf("%d listed", s.Listed)
	}
	fmt.Fprintf(w, "start-up is until the log says \"twind serving\"; the health check answered SERVING after %.2f / %.2f / %.2f s\n",
		r.Empty.ServingHealth, r.Restart.ServingHealth, r.AfterKill.ServingHealth)
	fmt.Fprintf(w, "after the restart: %s, last twin found %v; after kill -9: %s, last twin found %v, %d of %d last acknowledged reports lost\n",
		counted(r.Restart), r.Restart.LastFound, counted(r.AfterKill), r.AfterKill.LastFound, r.AfterKill.AckedLost, r.AfterKill.AckedChecked)
	if !r.SkipCreate {
		fmt.Fprintf(w, "memory per twin: %.1f KB after creating them, %.1f KB after the restart\n",
			(r.Create.RSSMiB-r.Empty.RSSMiB)*(1<<20)/1e3/float64(r.Twins), (r.Restart.RSSMiB-r.Empty.RSSMiB)*(1<<20)/1e3/float64(r.Twins))
	}
	return nil
}

func firstStart(r *FleetResult) string {
	if r.SkipCreate {
		return "start, existing fleet"
	}
	return "start, empty store"
}

// daemon is a twind process.
type daemon struct {
	cmd     *exec.Cmd
	started time.Time
	addr    string
	logPath string
	// servingLog and servingHealth are when twind said it serves and
	// when its health check first answered SERVING.
	servingLog, servingHealth time.Duration
	exited                    chan struct{} // closed when cmd.Wait returned
	waitErr                   error
	// lastRSS and lastPeak are the memory read last, by rss.
	lastRSS, lastPeak float64
}

// startDaemon starts twind on the data directory and returns once it
// serves: once its log says so and its health check answers SERVING. Its
// log is appended to logPath.
func startDaemon(ctx context.Context, bin, data, logPath string, o fleetOptions) (*daemon, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	l.Close()
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, append([]string{"--addr", addr, "--data", data}, o.twindArgs...)...)
	cmd.Env = append(os.Environ(), o.env...)
	dieWithParent(cmd)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		logFile.Close()
		return nil, err
	}
	d := &daemon{cmd: cmd, addr: addr, logPath: logPath, exited: make(chan struct{})}
	d.started = time.Now()
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	serving := make(chan time.Duration, 1)
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		defer logFile.Close()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		said := false
		for sc.Scan() {
			if !said && strings.Contains(sc.Text(), `msg="twind serving"`) {
				serving <- time.Since(d.started)
				said = true
			}
			logFile.Write(append(sc.Bytes(), '\n'))
		}
		io.Copy(logFile, stderr)
	}()
	go func() {
		<-scanned // Wait closes the pipe: read it all first
		d.waitErr = cmd.Wait()
		close(d.exited)
	}()
	health := make(chan time.Duration, 1)
	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		if err := awaitServing(hctx, addr); err == nil {
			health <- time.Since(d.started)
		}
	}()
	for d.servingLog == 0 || d.servingHealth == 0 {
		select {
		case t := <-serving:
			d.servingLog = t
		case t := <-health:
			d.servingHealth = t
		case <-d.exited:
			return nil, fmt.Errorf("twind exited before serving (%v): see %s", d.waitErr, logPath)
		case <-ctx.Done():
			d.kill()
			return nil, ctx.Err()
		}
	}
	return d, nil
}

// awaitServing returns once the health check at addr answers SERVING.
func awaitServing(ctx context.Context, addr string) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
			BaseDelay: 2 * time.Millisecond, Multiplier: 1.2, MaxDelay: 10 * time.Millisecond}, MinConnectTimeout: time.Second}))
	if err != nil {
		return err
	}
	defer conn.Close()
	h := healthpb.NewHealthClient(conn)
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		resp, err := h.Check(cctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		cancel()
		if err == nil && resp.Status == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		time.Sleep(2 * time.Millisecond) // polling a process being started
	}
}

func (d *daemon) startup() Startup {
	s := Startup{ServingLog: d.servingLog.Seconds(), ServingHealth: d.servingHealth.Seconds(), Listed: -1}
	s.RSSMiB, _ = d.rss()
	return s
}

// rss reads the process's resident memory and its peak, in MiB, from
// /proc (Linux); zero elsewhere.
func (d *daemon) rss() (rss, peak float64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
	if err != nil {
		return d.lastRSS, d.lastPeak
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || k != "VmRSS" && k != "VmHWM" {
			continue
		}
		kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
		if k == "VmRSS" {
			rss = kb / 1024
		} else {
			peak = kb / 1024
		}
	}
	d.lastRSS, d.lastPeak = rss, peak
	return rss, peak
}

// stop shuts twind down with SIGTERM and waits for it.
func (d *daemon) stop() error {
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(2 * time.Minute):
		d.kill()
		return fmt.Errorf("twind did not stop within 2 minutes of SIGTERM: see %s", d.logPath)
	}
	if d.waitErr != nil {
		return fmt.Errorf("twind: %v: see %s", d.waitErr, d.logPath)
	}
	return nil
}

// kill kills twind with SIGKILL and waits for it.
func (d *daemon) kill() {
	select {
	case <-d.exited:
		return
	default:
	}
	d.cmd.Process.Kill()
	<-d.exited
}

func dialAll(addr string, n int) ([]*twind.Client, error) {
	var cs []*twind.Client
	for range n {
		c, err := twind.Dial(addr)
		if err != nil {
			closeAll(cs)
			return nil, err
		}
		cs = append(cs, c)
	}
	return cs, nil
}

func closeAll(cs []*twind.Client) {
	for _, c := range cs {
		c.Close()
	}
}

// createFleet creates fridge-0 ... fridge-<N-1> with o.createClients calls
// in flight, and counts in existing those that were there already.
func createFleet(ctx context.Context, conns []*twind.Client, o fleetOptions, existing *atomic.Int64, progress io.Writer) (LoadPhase, error) {
	var tmpl twinv1.Twin
	if err := protojson.Unmarshal([]byte(fridgeDoc), &tmpl); err != nil {
		panic(err)
	}
	var (
		next, created, failed atomic.Int64
		firstErr              error
		errOnce               sync.Once
		wg                    sync.WaitGroup
		lat                   = make([][]time.Duration, o.createClients)
	)
	start := time.Now()
	stopProgress := everySecond(func() {
		n := created.Load() + existing.Load()
		fmt.Fprintf(progress, "  %d of %d (%.0f/s)\n", n, o.twins, float64(n)/time.Since(start).Seconds())
	})
	for w := range o.createClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := conns[w%len(conns)]
			for {
				i := int(next.Add(1) - 1)
				if i >= o.twins || failed.Load() > 0 || ctx.Err() != nil {
					return
				}
				tw := &twinv1.Twin{Id: fridgeID(i), Type: tmpl.Type, Labels: tmpl.Labels, Reported: tmpl.Reported, Desired: tmpl.Desired}
				t0 := time.Now()
				_, err := c.Twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: tw})
				switch {
				case err == nil:
					created.Add(1)
					lat[w] = append(lat[w], time.Since(t0))
				case twind.IsAlreadyExists(err):
					existing.Add(1)
				default:
					failed.Add(1)
					errOnce.Do(func() { firstErr = fmt.Errorf("create %s: %w", tw.Id, err) })
					return
				}
			}
		}()
	}
	wg.Wait()
	stopProgress()
	return creationPhase(ctx, time.Since(start), created.Load(), failed.Load(), lat, firstErr)
}

// importBatch is how many twins one ImportTwins request of the fleet
// carries.
const importBatch = 1000

// importFleet creates fridge-0 ... fridge-<N-1> with ImportTwins, one
// stream per connection, each with a few batches in flight, and counts in
// existing those that were there already. Calls counts the twins imported;
// the latency is each batch's, from sending it to its durable answer.
func importFleet(ctx context.Context, conns []*twind.Client, o fleetOptions, existing *atomic.Int64, progress io.Writer) (LoadPhase, error) {
	var tmpl twinv1.Twin
	if err := protojson.Unmarshal([]byte(fridgeDoc), &tmpl); err != nil {
		panic(err)
	}
	var (
		next, imported, failed atomic.Int64
		firstErr               error
		errOnce                sync.Once
		wg                     sync.WaitGroup
		lat                    = make([][]time.Duration, len(conns))
	)
	fail := func(err error) {
		failed.Add(1)
		errOnce.Do(func() { firstErr = err })
	}
	start := time.Now()
	stopProgress := everySecond(func() {
		n := imported.Load() + existing.Load()
		fmt.Fprintf(progress, "  %d of %d (%.0f/s)\n", n, o.twins, float64(n)/time.Since(start).Seconds())
	})
	const inFlight = 4 // batches sent and not yet answered, per stream
	for w, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			stream, err := c.Twins.ImportTwins(ctx)
			if err != nil {
				fail(fmt.Errorf("import: %w", err))
				return
			}
			sent := make(chan time.Time, inFlight)
			recvDone := make(chan struct{})
			go func() {
				defer close(recvDone)
				for {
					resp, err := stream.Recv()
					if err == io.EOF || (err == nil && resp.GetDone()) {
						return
					}
					if err != nil {
						fail(fmt.Errorf("import: %w", err))
						cancel()
						return
					}
					lat[w] = append(lat[w], time.Since(<-sent))
					imported.Add(resp.GetImported())
					for _, e := range resp.GetErrors() {
						if e.GetCode() == "ALREADY_EXISTS" {
							existing.Add(1)
						} else {
							fail(fmt.Errorf("import %s: %s", e.GetId(), e.GetMessage()))
						}
					}
				}
			}()
			for failed.Load() == 0 && ctx.Err() == nil {
				first := int(next.Add(importBatch) - importBatch)
				if first >= o.twins {
					break
				}
				req := &twinv1.ImportTwinsRequest{}
				for i := first; i < min(first+importBatch, o.twins); i++ {
					req.Twins = append(req.Twins, &twinv1.TwinRecord{Twin: &twinv1.Twin{Id: fridgeID(i), Type: tmpl.Type,
						Labels: tmpl.Labels, Reported: tmpl.Reported, Desired: tmpl.Desired}})
				}
				select {
				case sent <- time.Now():
				case <-recvDone:
				}
				if err := stream.Send(req); err != nil {
					break // Recv says why
				}
			}
			if err := stream.CloseSend(); err != nil {
				fail(fmt.Errorf("import: %w", err))
			}
			<-recvDone
		}()
	}
	wg.Wait()
	stopProgress()
	return creationPhase(ctx, time.Since(start), imported.Load(), failed.Load(), lat, firstErr)
}

// creationPhase sums up a phase that created the fleet: n twins in el, with
// each worker's latencies, and the first error that stopped it.
func creationPhase(ctx context.Context, el time.Duration, n, failed int64, lat [][]time.Duration, firstErr error) (LoadPhase, error) {
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	p := LoadPhase{Seconds: el.Seconds(), Calls: n, PerSecond: float64(n) / el.Seconds(), Errors: failed, Latency: summarize(all)}
	if firstErr != nil {
		p.FirstError = firstErr.Error()
	}
	if ctx.Err() != nil {
		return p, ctx.Err()
	}
	return p, firstErr
}

// everySecond calls f every second until the returned function is called.
func everySecond(f func()) (stop func()) {
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				f()
			}
		}
	}()
	return func() { close(done); <-stopped }
}

// ack is a report acknowledged by twind: the twin's version after it.
type ack struct {
	id      string
	version int64
}

// reportLoad makes o.clients clients call ReportState on random twins
// until the deadline or until stop is closed, each waiting for its call's
// answer before the next. Calls that fail once quiet is closed (twind is
// being killed) are not counted as errors. A share hot of the calls goes to the first 20 %
// of the twins (0: uniform over all). It returns what the calls did, and
// each client's last acknowledged report.
func reportLoad(ctx context.Context, conns []*twind.Client, o fleetOptions, hot float64, deadline time.Time, quiet, stop <-chan struct{}) (LoadPhase, []ack) {
	// Not a deadline on the calls: the server would end those in flight
	// at the end with DEADLINE_EXCEEDED.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if stop != nil {
		go func() {
			select {
			case <-stop:
				cancel()
			case <-ctx.Done():
			}
		}()
	}
	hotN := max(1, o.twins/5)
	var (
		calls, errs atomic.Int64
		firstErr    atomic.Value
		wg          sync.WaitGroup
		lat         = make([][]time.Duration, o.clients)
		last        = make([]ack, o.clients)
	)
	start := time.Now()
	for w := range o.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := conns[w%len(conns)]
			r := rand.New(rand.NewPCG(uint64(w), uint64(start.UnixNano())))
			for ctx.Err() == nil && time.Now().Before(deadline) {
				var i int
				switch {
				case hot == 0:
					i = r.IntN(o.twins)
				case r.Float64() < hot || hotN == o.twins:
					i = r.IntN(hotN)
				default:
					i = hotN + r.IntN(o.twins-hotN)
				}
				temp := float64(r.IntN(100)) / 10
				patch := &structpb.Struct{Fields: map[string]*structpb.Value{
					"temp_c":     structpb.NewNumberValue(temp),
					"compressor": structpb.NewBoolValue(temp > 4),
				}}
				t0 := time.Now()
				resp, err := c.Twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: fridgeID(i), Patch: patch})
				if err != nil {
					if ctx.Err() == nil && !closed(quiet) && errs.Add(1) == 1 {
						firstErr.Store(err.Error())
					}
					continue
				}
				lat[w] = append(lat[w], time.Since(t0))
				last[w] = ack{id: fridgeID(i), version: resp.GetTwin().GetVersion()}
				calls.Add(1)
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	first, _ := firstErr.Load().(string)
	return LoadPhase{Seconds: el.Seconds(), Calls: calls.Load(), PerSecond: float64(calls.Load()) / el.Seconds(),
		Errors: errs.Load(), FirstError: first, Latency: summarize(all)}, last
}

// closed reports whether c is closed; a nil c never is.
func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// verifyFleet checks that the first and last twins are served, and counts
// the fleet if it is small enough.
func verifyFleet(ctx context.Context, addr string, o fleetOptions, s *Startup) error {
	c, err := twind.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	s.LastFound = true
	for _, id := range []string{fridgeID(0), fridgeID(o.twins - 1)} {
		if _, err := c.GetTwin(ctx, id); twind.IsNotFound(err) {
			s.LastFound = false
		} else if err != nil {
			return fmt.Errorf("get %s: %w", id, err)
		}
	}
	if o.twins > o.countMax {
		return nil
	}
	s.Listed = 0
	for tw, err := range c.ListTwins(ctx, "") {
		if err != nil {
			return fmt.Errorf("list: %w", err)
		}
		if strings.HasPrefix(tw.Id, "fridge-") {
			s.Listed++
		}
	}
	return nil
}

// verifyAcks checks that every acknowledged report survived.
func verifyAcks(ctx context.Context, addr string, acks []ack, s *Startup) error {
	c, err := twind.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	for _, a := range acks {
		if a.id == "" {
			continue
		}
		tw, err := c.GetTwin(ctx, a.id)
		if err != nil && !twind.IsNotFound(err) {
			return fmt.Errorf("get %s: %w", a.id, err)
		}
		s.AckedChecked++
		if tw.GetVersion() < a.version {
			s.AckedLost++
		}
	}
	return nil
}

// dirSize is the size of the files under dir.
func dirSize(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(_ string, e fs.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			if info, err := e.Info(); err == nil {
				n += info.Size()
			}
		}
		return nil
	})
	return n
}
