package main

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/twind-io/twind/clients/twind"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/rules/examples"
)

// appliance is the physics of one simulated device. Its methods are called
// from the device's own goroutines, under the device's lock.
type appliance interface {
	typ() string
	// step advances the model by one tick and returns the report.
	step(rng *rand.Rand) map[string]any
	// desired applies desired state.
	desired(d map[string]any)
	// command runs a command.
	command(name string, params map[string]any) twind.CommandResult
}

// fridge warms when its door is open and cools while its compressor runs.
type fridge struct {
	temp, target float64
	door         string
	doorTicks    int
	compressor   bool
	eco          bool
}

func newFridge(rng *rand.Rand) *fridge {
	return &fridge{temp: 4 + rng.Float64(), target: 4, door: "closed"}
}

func (f *fridge) typ() string { return "fridge" }

func (f *fridge) step(rng *rand.Rand) map[string]any {
	switch {
	case f.door == "closed" && rng.Float64() < 0.01:
		f.door, f.doorTicks = "open", 5+rng.IntN(200)
	case f.door == "open":
		if f.doorTicks--; f.doorTicks <= 0 {
			f.door = "closed"
		}
	}
	band := 0.5
	if f.eco {
		band = 1.5
	}
	if f.temp > f.target+band {
		f.compressor = true
	} else if f.temp < f.target-band {
		f.compressor = false
	}
	f.temp += 0.02 * (22 - f.temp) // the room
	if f.door == "open" {
		f.temp += 0.3
	}
	if f.compressor {
		f.temp -= 0.4
	}
	power := 4.0
	if f.compressor {
		power = 110 + 10*rng.Float64()
	}
	return map[string]any{"temp_c": round(f.temp, 2), "door": f.door, "power_w": round(power, 1), "compressor": f.compressor,
		"target_c": f.target, "eco": f.eco}
}

func (f *fridge) desired(d map[string]any) {
	if v, ok := d["target_c"].(float64); ok {
		f.target = v
	}
	if v, ok := d["eco"].(bool); ok {
		f.eco = v
	}
}

func (f *fridge) command(name string, params map[string]any) twind.CommandResult {
	if name != "defrost" {
		return twind.CommandResult{State: twinv1.CommandState_COMMAND_STATE_REJECTED, Message: "a fridge knows only defrost"}
	}
	f.temp += 2
	return twind.CommandResult{State: twinv1.CommandState_COMMAND_STATE_SUCCEEDED, Result: map[string]any{"defrosted": true}}
}

// car burns fuel as it drives, and refuels when told to navigate to a
// station.
type car struct {
	fuel, speed, odometer float64
	lat, lon              float64
	locked                bool
	dest                  *[2]float64
}

func newCar(rng *rand.Rand) *car {
	return &car{fuel: 0.15 + 0.8*rng.Float64(), lat: 52.45 + 0.1*rng.Float64(), lon: 13.3 + 0.2*rng.Float64(), locked: true}
}

func (c *car) typ() string { return "car" }

func (c *car) step(rng *rand.Rand) map[string]any {
	if c.locked || c.fuel <= 0 {
		c.speed = 0
	} else {
		c.speed = math.Max(0, math.Min(130, c.speed+rng.NormFloat64()*8))
	}
	km := c.speed / 3600
	c.odometer += km
	c.fuel = math.Max(0, c.fuel-km*0.0015)
	if c.dest != nil {
		c.lat += (c.dest[0] - c.lat) * 0.2
		c.lon += (c.dest[1] - c.lon) * 0.2
		if math.Abs(c.dest[0]-c.lat) < 0.001 && math.Abs(c.dest[1]-c.lon) < 0.001 {
			c.fuel, c.dest = 1, nil // at the station
		}
	} else {
		c.lat += km / 111 * (rng.Float64() - 0.5)
		c.lon += km / 70 * (rng.Float64() - 0.5)
	}
	return map[string]any{"fuel": round(c.fuel, 4), "speed_kmh": round(c.speed, 1), "odometer_km": round(c.odometer, 3),
		"locked": c.locked, "location": map[string]any{"lat": round(c.lat, 5), "lon": round(c.lon, 5)}}
}

func (c *car) desired(d map[string]any) {
	if v, ok := d["locked"].(bool); ok {
		c.locked = v
	}
}

func (c *car) command(name string, params map[string]any) twind.CommandResult {
	switch name {
	case "navigate":
		lat, ok1 := params["lat"].(float64)
		lon, ok2 := params["lon"].(float64)
		if !ok1 || !ok2 {
			return twind.CommandResult{State: twinv1.CommandState_COMMAND_STATE_REJECTED, Message: "navigate needs lat and lon"}
		}
		c.dest, c.locked = &[2]float64{lat, lon}, false
		return twind.CommandResult{State: twinv1.CommandState_COMMAND_STATE_SUCCEEDED, Result: map[string]any{"navigating": true}}
	case "honk":
		return twind.CommandResult{State: twinv1.CommandState_COMMAND_STATE_SUCCEEDED, Result: map[string]any{"honked": true}}
	}
	return twind.CommandResult{State: twinv1.CommandState_COMMAND_STATE_REJECTED, Message: "a car knows navigate and honk"}
}

// planter: soil dries, CO2 builds up and humidity drifts; the pump, the fan
// and the lamp counter them.
type planter struct {
	soil, lux, temp, co2, humidity, targetHumidity float64
	pump, fan, lamp                                string
}

func newPlanter(rng *rand.Rand) *planter {
	return &planter{soil: 35 + 30*rng.Float64(), lux: 300, temp: 21, co2: 600 + 200*rng.Float64(), humidity: 55,
		targetHumidity: 60, pump: "off", fan: "off", lamp: "off"}
}

func (p *planter) typ() string { return "planter" }

func (p *planter) step(rng *rand.Rand) map[string]any {
	p.soil = math.Max(0, p.soil-0.3-0.2*rng.Float64())
	if p.pump == "on" {
		p.soil = math.Min(100, p.soil+4)
	}
	p.co2 += 12 + 5*rng.NormFloat64()
	if p.fan == "on" {
		p.co2 -= 45
		p.humidity -= 0.3
	}
	p.co2 = math.Max(400, p.co2)
	p.humidity += 0.05*(p.targetHumidity-p.humidity) + 0.3*rng.NormFloat64()
	hour := float64(time.Now().UTC().Hour())
	daylight := math.Max(0, 800*math.Sin((hour-6)/12*math.Pi))
	p.lux = daylight * (0.2 + 0.1*rng.Float64())
	if p.lamp == "on" {
		p.lux += 1500
		p.temp += 0.02
	}
	p.temp += 0.05 * (21 - p.temp)
	return map[string]any{"soil_moisture": round(p.soil, 1), "light_lux": round(p.lux, 0), "temp_c": round(p.temp, 2),
		"co2_ppm": round(p.co2, 0), "humidity": round(p.humidity, 1), "pump": p.pump, "fan": p.fan, "lamp": p.lamp}
}

func (p *planter) desired(d map[string]any) {
	for k, dst := range map[string]*string{"pump": &p.pump, "fan": &p.fan, "lamp": &p.lamp} {
		if v, ok := d[k].(string); ok && (v == "on" || v == "off") {
			*dst = v
		}
	}
	if v, ok := d["target_humidity"].(float64); ok {
		p.targetHumidity = v
	}
}

func (p *planter) command(name string, params map[string]any) twind.CommandResult {
	if name != "water" {
		return twind.CommandResult{State: twinv1.CommandState_COMMAND_STATE_REJECTED, Message: "a planter knows only water"}
	}
	secs, _ := params["seconds"].(float64)
	if secs <= 0 {
		secs = 10
	}
	p.soil = math.Min(100, p.soil+secs*0.5)
	return twind.CommandResult{State: twinv1.CommandState_COMMAND_STATE_SUCCEEDED, Result: map[string]any{"watered_s": secs}}
}

func round(v float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(v*p) / p
}

// runOptions configure `twinsim run`.
type runOptions struct {
	fridges, cars, planters int
	tick, duration          time.Duration
	name                    string // the run's name, the value of its twins' label twinsim; default "sim"
	prefix                  string // of its twin and rule ids; default name + "-"
	noRules                 bool
}

func (o *runOptions) ensureDefaults() error {
	if o.name == "" {
		o.name = "sim"
	}
	if o.prefix == "" {
		o.prefix = o.name + "-"
	}
	return checkName(o.name)
}

// simStats counts what the fleet did.
type simStats struct {
	reports, desired, commands, ruleEvents, errors atomic.Int64
}

// runFleet creates the run's twins and its copies of the example rules that
// do not exist yet, and runs the fleet, printing a summary line every few
// seconds. It drives only twins it created for the run (labelled
// twinsim=<name>): a twin of the same id that is not the run's is an error,
// and is left alone, token and commands included.
func runFleet(ctx context.Context, c *twind.Client, o runOptions, out io.Writer) error {
	if err := o.ensureDefaults(); err != nil {
		return err
	}
	type spec struct {
		id  string
		app appliance
	}
	var fleet []spec
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	for i := range o.fridges {
		fleet = append(fleet, spec{fmt.Sprintf("%sfridge-%d", o.prefix, i+1), newFridge(rng)})
	}
	for i := range o.cars {
		fleet = append(fleet, spec{fmt.Sprintf("%scar-%d", o.prefix, i+1), newCar(rng)})
	}
	for i := range o.planters {
		fleet = append(fleet, spec{fmt.Sprintf("%splanter-%d", o.prefix, i+1), newPlanter(rng)})
	}
	if len(fleet) == 0 {
		return fmt.Errorf("no devices: give --fridges, --cars or --planters")
	}
	// Every twin is the run's before any token is issued.
	ours := map[string]bool{}
	for _, s := range fleet {
		if err := claim(ctx, c, s.id, s.app.typ(), o.name); err != nil {
			return err
		}
		ours[s.id] = true
	}
	if !o.noRules {
		n, err := loadExampleRules(ctx, c, o)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "example rules, for this run's twins only (%s*): %d created, the others already there\n", o.prefix, n)
	}
	if o.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.duration)
		defer cancel()
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	var st simStats
	// Count the rule firings on the run's twins for the summary.
	wg.Add(1)
	go func() {
		defer wg.Done()
		stream, err := c.Rules.WatchRuleEvents(ctx, &twinv1.WatchRuleEventsRequest{})
		if err != nil {
			return
		}
		for {
			ev, err := stream.Recv()
			if err != nil {
				return
			}
			if ev.Event.Kind == twinv1.RuleEventKind_RULE_EVENT_KIND_FIRED && ours[ev.Event.TwinId] {
				st.ruleEvents.Add(1)
			}
		}
	}()
	for i, s := range fleet {
		tok, err := c.IssueDeviceToken(ctx, s.id)
		if err != nil {
			return fmt.Errorf("token for %s: %w", s.id, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			runDevice(ctx, c, s.id, tok, s.app, o.tick, uint64(i), &st)
		}()
	}
	fmt.Fprintf(out, "running %d devices (%d fridges, %d cars, %d planters) as run %q, a report every %v each; Ctrl-C to stop\n",
		len(fleet), o.fridges, o.cars, o.planters, o.name, o.tick)
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	start := time.Now()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			fmt.Fprintf(out, "stopped after %v: %d reports, %d desired changes applied, %d commands run, %d rule firings, %d errors\n",
				time.Since(start).Round(time.Second), st.reports.Load(), st.desired.Load(), st.commands.Load(), st.ruleEvents.Load(), st.errors.Load())
			fmt.Fprintf(out, "the run's twins and rules stay; 'twinsim clean --name %s' removes them\n", o.name)
			return nil
		case <-t.C:
			fmt.Fprintf(out, "%6s  reports %-8d desired %-6d commands %-6d rule firings %-6d errors %d\n",
				time.Since(start).Round(time.Second), st.reports.Load(), st.desired.Load(), st.commands.Load(), st.ruleEvents.Load(), st.errors.Load())
		}
	}
}

// runDevice runs one simulated device until ctx is done.
func runDevice(ctx context.Context, c *twind.Client, id, token string, app appliance, tick time.Duration, seed uint64, st *simStats) {
	var mu sync.Mutex // guards app
	rng := rand.New(rand.NewPCG(seed, uint64(time.Now().UnixNano())))
	dev := c.Device(twind.DeviceConfig{
		DeviceID: id, Token: token, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		OnDesired: func(ctx context.Context, d twind.DesiredChange) error {
			mu.Lock()
			defer mu.Unlock()
			if d.Full {
				app.desired(d.Desired)
			} else {
				app.desired(d.Patch)
			}
			st.desired.Add(1)
			return nil
		},
		OnCommand: func(ctx context.Context, cmd *twinv1.Command) twind.CommandResult {
			mu.Lock()
			defer mu.Unlock()
			st.commands.Add(1)
			return app.command(cmd.Name, cmd.GetParams().AsMap())
		},
	})
	running := make(chan struct{})
	go func() { defer close(running); dev.Run(ctx) }()
	defer func() { <-running }()
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		mu.Lock()
		r := app.step(rng)
		mu.Unlock()
		if _, err := dev.Report(ctx, r); err != nil {
			if ctx.Err() == nil {
				st.errors.Add(1)
			}
			continue
		}
		st.reports.Add(1)
	}
}

// loadExampleRules creates the run's copies of the example rules that do
// not exist yet and returns how many it created. A copy has the run's id
// prefix, a description that marks it as the run's, and a condition that
// holds only for the run's twins, so that it neither acts on other twins
// nor takes the place of the examples an operator loaded.
func loadExampleRules(ctx context.Context, c *twind.Client, o runOptions) (int, error) {
	files, err := fs.Glob(examples.FS, "*.json")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, f := range files {
		b, err := examples.FS.ReadFile(f)
		if err != nil {
			return n, err
		}
		req := &twinv1.CreateRuleRequest{}
		if err := protojson.Unmarshal(b, req); err != nil {
			return n, fmt.Errorf("%s: %w", f, err)
		}
		r := req.Rule
		r.Id = o.prefix + r.Id
		r.Description = ruleMark("run", o.name) + r.Description
		r.Condition = fmt.Sprintf("%s && (%s)", ownFilter(o.name), r.Condition)
		_, err = c.Rules.CreateRule(ctx, req)
		switch {
		case err == nil:
			n++
		case twind.IsAlreadyExists(err):
			got, err := c.Rules.GetRule(ctx, &twinv1.GetRuleRequest{Id: r.Id})
			if err != nil {
				return n, err
			}
			if !ownsRule(got.Rule, o.name) {
				return n, fmt.Errorf("rule %s exists and is not run %s's: choose another --prefix, or give --no-rules", r.Id, o.name)
			}
		default:
			return n, fmt.Errorf("rule %s: %w", r.Id, err)
		}
	}
	return n, nil
}
