package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/twind-io/twind/clients/twind"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// benchType is the device type of the bench's twins: one of its own, so
// that rules for real appliances (the example planter rules) do not fire
// on them.
const benchType = "twinsim-bench"

// benchOptions configure `twinsim bench`.
type benchOptions struct {
	devices  int
	duration time.Duration
	rate     float64 // total reports per second; 0 for as fast as possible
	rules    int
	window   int    // reports in flight per stream
	name     string // the bench's name, the value of its twins' label twinsim; default "bench"
	prefix   string // of the twin and rule ids; default name + "-"
	keep     bool   // keep the twins at the end
	// pingEvery is how often a device's report makes the bench's first
	// rule fire: every pingEvery-th report; default 50.
	pingEvery int64
	output    string // "text" or "json"
}

func (o *benchOptions) ensureDefaults() error {
	if o.name == "" {
		o.name = "bench"
	}
	if o.prefix == "" {
		o.prefix = o.name + "-"
	}
	if o.pingEvery <= 0 {
		o.pingEvery = 50
	}
	if o.devices <= 0 || o.window <= 0 || o.duration <= 0 || o.rules < 0 {
		return fmt.Errorf("--devices, --window and --duration must be positive, and --rules not negative")
	}
	return checkName(o.name)
}

// Latency summarizes a latency distribution, in microseconds.
type Latency struct {
	Count int64   `json:"count"`
	P50   float64 `json:"p50_us"`
	P90   float64 `json:"p90_us"`
	P99   float64 `json:"p99_us"`
	Max   float64 `json:"max_us"`
}

// BenchResult is what `twinsim bench` measured.
type BenchResult struct {
	Devices         int     `json:"devices"`
	Rules           int     `json:"rules"`
	TargetRate      float64 `json:"target_rate"`
	Seconds         float64 `json:"seconds"`
	Acked           int64   `json:"acked"`
	AcksPerSecond   float64 `json:"acks_per_second"`
	Refused         int64   `json:"refused"`
	ReportToAck     Latency `json:"report_to_ack"`
	ReportToCommand Latency `json:"report_to_command"`
	// ActiveRules are the enabled rules that watched the bench's type when
	// it started: its own, and any other that watches all types.
	ActiveRules []string `json:"active_rules"`
	// OtherRules are those of ActiveRules that are not the bench's own.
	OtherRules []string `json:"other_rules"`
}

func summarize(d []time.Duration) Latency {
	if len(d) == 0 {
		return Latency{}
	}
	slices.Sort(d)
	us := func(x time.Duration) float64 { return float64(x.Nanoseconds()) / 1e3 }
	at := func(q float64) float64 { return us(d[min(len(d)-1, int(q*float64(len(d))))]) }
	return Latency{Count: int64(len(d)), P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: us(d[len(d)-1])}
}

// runBench drives o.devices concurrent device streams and measures
// acknowledged reports and latencies. Its twins are of type benchType,
// labelled twinsim=<name>; it removes them when it ends unless o.keep, and
// its rules always.
func runBench(ctx context.Context, c *twind.Client, o benchOptions, out, progress io.Writer) (*BenchResult, error) {
	if err := o.ensureDefaults(); err != nil {
		return nil, err
	}
	fmt.Fprintf(progress, "setting up %d devices of type %s and %d rules...\n", o.devices, benchType, o.rules)
	ids := make([]string, o.devices)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s%d", o.prefix, i)
	}
	defer func() {
		ctx, cancel := cleanupContext()
		defer cancel()
		if _, err := removeRules(ctx, c, o.name); err != nil {
			fmt.Fprintf(progress, "removing the bench's rules: %v\n", err)
		}
		if o.keep {
			fmt.Fprintf(progress, "keeping the bench's twins: 'twinsim clean --name %s' removes them\n", o.name)
			return
		}
		// By the label, to catch those whose creation an interrupt cut off.
		fmt.Fprintf(progress, "removing the bench's twins (--keep keeps them)\n")
		if _, err := removeTwins(ctx, c, o.name); err != nil {
			fmt.Fprintf(progress, "removing the bench's twins: %v\n", err)
		}
	}()
	if err := setupBenchRules(ctx, c, o); err != nil {
		return nil, err
	}
	active, others, err := activeRules(ctx, c, o.name)
	if err != nil {
		return nil, err
	}
	// The setup calls that started run to their end even when one fails
	// (no errgroup context), so that every twin created is there to be
	// removed by the deferred cleanup.
	tokens := make([]string, o.devices)
	var g errgroup.Group
	var failed atomic.Bool
	g.SetLimit(32)
	for i := range ids {
		g.Go(func() error {
			if failed.Load() {
				return nil
			}
			err := claim(ctx, c, ids[i], benchType, o.name)
			if err == nil {
				tokens[i], err = c.IssueDeviceToken(ctx, ids[i])
			}
			if err != nil {
				failed.Store(true)
			}
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}
	streams := make([]twinv1.DeviceService_ConnectClient, o.devices)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for i := range streams {
		st, err := c.Devices.Connect(sctx)
		if err == nil {
			err = st.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{DeviceId: ids[i], Token: tokens[i]}}})
		}
		if err == nil {
			_, err = st.Recv() // the welcome
		}
		if err != nil {
			return nil, fmt.Errorf("connect %s: %w", ids[i], err)
		}
		streams[i] = st
	}

	var (
		acked, refused atomic.Int64
		mu             sync.Mutex
		ackLat, cmdLat []time.Duration
		wg             sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(o.duration)
	var interval time.Duration
	if o.rate > 0 {
		interval = time.Duration(float64(o.devices) / o.rate * float64(time.Second))
	}
	for _, st := range streams {
		wg.Add(2)
		var sendMu sync.Mutex // stream.Send is not safe for concurrent use
		inflight := make(chan time.Time, o.window)
		go func() { // sender
			defer wg.Done()
			defer func() { sendMu.Lock(); st.CloseSend(); sendMu.Unlock() }()
			next := time.Now()
			for seq := int64(1); ; seq++ {
				if interval > 0 {
					if d := time.Until(next); d > 0 {
						time.Sleep(d) // pacing a load generator, not waiting for an event
					}
					next = next.Add(interval)
				}
				now := time.Now()
				if now.After(deadline) {
					return
				}
				inflight <- now // blocks while the window is full
				p := &structpb.Struct{Fields: map[string]*structpb.Value{
					"soil_moisture": structpb.NewNumberValue(float64(seq % 100)),
					"ping":          structpb.NewBoolValue(seq%o.pingEvery == 0),
					"sent_ns":       structpb.NewNumberValue(float64(now.UnixNano())),
				}}
				sendMu.Lock()
				err := st.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: seq, Patch: p}}})
				sendMu.Unlock()
				if err != nil {
					return
				}
			}
		}()
		go func() { // receiver
			defer wg.Done()
			var myAck, myCmd []time.Duration
			defer func() {
				mu.Lock()
				ackLat = append(ackLat, myAck...)
				cmdLat = append(cmdLat, myCmd...)
				mu.Unlock()
			}()
			for {
				m, err := st.Recv()
				if err != nil {
					return
				}
				switch msg := m.GetMsg().(type) {
				case *twinv1.ConnectResponse_ReportAck:
					sent := <-inflight
					if msg.ReportAck.Error != "" {
						refused.Add(1)
						continue
					}
					acked.Add(1)
					myAck = append(myAck, time.Since(sent))
				case *twinv1.ConnectResponse_Command:
					cmd := msg.Command
					if ns := cmd.GetParams().GetFields()["sent_ns"].GetNumberValue(); ns > 0 {
						myCmd = append(myCmd, time.Since(time.Unix(0, int64(ns))))
					}
					sendMu.Lock()
					st.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_CommandUpdate{CommandUpdate: &twinv1.CommandUpdate{
						CommandId: cmd.Id, State: twinv1.CommandState_COMMAND_STATE_SUCCEEDED}}})
					sendMu.Unlock()
				}
			}
		}()
	}
	// Progress.
	done, progressDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(progressDone)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		last := int64(0)
		for {
			select {
			case <-done:
				return
			case <-t.C:
				n := acked.Load()
				fmt.Fprintf(progress, "%5.0fs  %8d acks/s  %10d acked\n", time.Since(start).Seconds(), n-last, n)
				last = n
			}
		}
	}()
	wg.Wait()
	close(done)
	<-progressDone
	elapsed := time.Since(start)
	res := &BenchResult{
		Devices: o.devices, Rules: o.rules, TargetRate: o.rate, Seconds: elapsed.Seconds(),
		Acked: acked.Load(), AcksPerSecond: float64(acked.Load()) / elapsed.Seconds(), Refused: refused.Load(),
		ReportToAck: summarize(ackLat), ReportToCommand: summarize(cmdLat),
		ActiveRules: active, OtherRules: others,
	}
	if o.output == "json" {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return res, enc.Encode(res)
	}
	fmt.Fprintf(out, "devices %d, rules %d, %.1fs: %d reports acknowledged (%.0f/s), %d refused\n",
		res.Devices, res.Rules, res.Seconds, res.Acked, res.AcksPerSecond, res.Refused)
	fmt.Fprintf(out, "rules active for type %s: %d of the bench's", benchType, len(active)-len(others))
	if len(others) > 0 {
		fmt.Fprintf(out, " and %d other(s): %s", len(others), strings.Join(others, ", "))
	}
	fmt.Fprintln(out)
	fmt.Fprintf(out, "report -> ack      p50 %8.0f µs  p90 %8.0f µs  p99 %8.0f µs  max %8.0f µs\n",
		res.ReportToAck.P50, res.ReportToAck.P90, res.ReportToAck.P99, res.ReportToAck.Max)
	fmt.Fprintf(out, "report -> command  p50 %8.0f µs  p90 %8.0f µs  p99 %8.0f µs  max %8.0f µs  (%d rule firings)\n",
		res.ReportToCommand.P50, res.ReportToCommand.P90, res.ReportToCommand.P99, res.ReportToCommand.Max, res.ReportToCommand.Count)
	return res, nil
}

// setupBenchRules loads o.rules rules for the bench's type: one that fires
// every o.pingEvery-th report with a command carrying the report's send time, and
// others that never fire but are evaluated on every report. It first
// removes what an earlier bench of the same name left.
func setupBenchRules(ctx context.Context, c *twind.Client, o benchOptions) error {
	if _, err := removeRules(ctx, c, o.name); err != nil {
		return err
	}
	own := ownFilter(o.name)
	for i := range o.rules {
		r := &twinv1.Rule{Id: fmt.Sprintf("%srule-%d", o.prefix, i), Types: []string{benchType},
			Description: ruleMark("bench", o.name) + "evaluated on every report, never fires",
			Condition:   fmt.Sprintf("%s && twin.reported.soil_moisture > %d.5", own, 1000+i)}
		if i == 0 {
			r.Description = ruleMark("bench", o.name) + fmt.Sprintf("a command on every %dth report", o.pingEvery)
			r.Condition = own + " && twin.reported.ping == true"
			r.Actions = []*twinv1.Action{{Action: &twinv1.Action_Command{Command: &twinv1.CommandAction{
				Name: "ping", Params: "{'sent_ns': twin.reported.sent_ns}"}}}}
		}
		if _, err := c.Rules.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: r}); err != nil {
			if twind.IsAlreadyExists(err) {
				return fmt.Errorf("rule %s exists and is not the bench's: choose another --prefix", r.Id)
			}
			return fmt.Errorf("rule %s: %w", r.Id, err)
		}
	}
	return nil
}

// activeRules returns the ids of the enabled rules that watch the bench's
// type, and which of them are not the bench name's own.
func activeRules(ctx context.Context, c *twind.Client, name string) (active, others []string, err error) {
	rules, err := listRules(ctx, c)
	if err != nil {
		return nil, nil, err
	}
	active, others = []string{}, []string{}
	for _, r := range rules {
		if r.Enabled != nil && !*r.Enabled || len(r.Types) > 0 && !slices.Contains(r.Types, benchType) {
			continue
		}
		active = append(active, r.Id)
		if !ownsRule(r, name) {
			others = append(others, r.Id)
		}
	}
	return active, others, nil
}
