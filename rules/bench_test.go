package rules_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twind-io/twind/rules"
	"github.com/twind-io/twind/twin"
)

var benchFridge = &twin.Twin{
	ID: "fridge-1", Type: "fridge", Version: 7,
	Reported: twin.Document{"temp_c": 5.5, "door": "closed", "power_w": 85.0, "compressor": true},
	Desired:  twin.Document{"target_c": 4.0, "eco": true},
}

// BenchmarkConditionEval measures one evaluation of a typical rule
// condition on a fridge.
func BenchmarkConditionEval(b *testing.B) {
	c, err := rules.Compile(rules.Definition{ID: "warm", Enabled: true,
		Condition: "twin.reported.temp_c > 8.0 && twin.reported.door == 'open' && twin.desired.?eco.orValue(false)"})
	if err != nil {
		b.Fatal(err)
	}
	set := rules.NewSet([]*rules.Compiled{c})
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		set.Evaluate(benchFridge, benchFridge, nil, now, false)
	}
}

// BenchmarkChange measures durable reports through the engine (64
// concurrent writers, on disk) with rules loaded across 10 device types:
//
//   - rules=0: no rules at all;
//   - rules=10: one rule per type, so one runs per change;
//   - rules=1000: 100 per type, so 100 run per change;
//   - rules=1000/other-types: one rule for the changed type and 999 for the
//     9 others, which the type index never evaluates.
func BenchmarkChange(b *testing.B) {
	types := []string{"fridge", "car", "planter", "oven", "lock", "meter", "thermostat", "camera", "pump", "light"}
	for _, bc := range []struct {
		name        string
		perType     int // rules for each type
		fridgeOnly1 bool
		total       int
	}{
		{"rules=0", 0, false, 0},
		{"rules=10", 1, false, 10},
		{"rules=1000", 100, false, 1000},
		{"rules=1000/other-types", 111, true, 1000},
	} {
		b.Run(bc.name, func(b *testing.B) {
			e, err := twin.Open(twin.Options{Dir: b.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			var compiled []*rules.Compiled
			for i := 0; len(compiled) < bc.total; i++ {
				typ := types[i%len(types)]
				if bc.fridgeOnly1 && typ == "fridge" && i >= len(types) {
					continue
				}
				c, err := rules.Compile(rules.Definition{ID: fmt.Sprint("r", i), Enabled: true, Types: []string{typ},
					Condition: fmt.Sprintf("twin.reported.temp_c > %d.0 && twin.reported.door == 'open'", 50+i%40),
					Actions:   []rules.Action{{Emit: &rules.EmitAction{Message: "'hot'"}}}})
				if err != nil {
					b.Fatal(err)
				}
				compiled = append(compiled, c)
			}
			if bc.total > 0 {
				e.SetEvaluator(rules.NewSet(compiled))
			}
			ctx := context.Background()
			const twins = 64
			for i := range twins {
				if _, err := e.Create(ctx, twin.CreateRequest{ID: fmt.Sprint("fridge-", i), Type: "fridge"}); err != nil {
					b.Fatal(err)
				}
			}
			var n atomic.Int64
			b.SetParallelism(32)
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				id := fmt.Sprint("fridge-", n.Add(1)%twins)
				i := 0
				for pb.Next() {
					i++
					_, err := e.Report(ctx, twin.PatchRequest{ID: id, Patch: twin.Document{"temp_c": float64(i % 10), "door": "open"}})
					if err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkTick measures what a rule that reads `now` costs per twin per
// tick: the tick's walk over the fleet, reading each twin (from the cache,
// or from the store when the cache holds few), and the rule's evaluation.
// ns/op is per twin walked; nothing fires, so nothing is written.
func BenchmarkTick(b *testing.B) {
	for _, bc := range []struct {
		name  string
		cache int64
	}{{"cached", 0}, {"from-store", 1 << 20}} {
		b.Run(bc.name, func(b *testing.B) {
			clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
			var mu sync.Mutex
			now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
			e, err := twin.Open(twin.Options{Dir: b.TempDir(), Clock: now, RuleTick: 10 * time.Second, CacheBytes: bc.cache,
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			ctx := context.Background()
			const twins = 20_000
			for i := range twins {
				if _, err := e.Create(ctx, twin.CreateRequest{ID: fmt.Sprint("fridge-", i), Type: "fridge", Reported: benchFridge.Reported}); err != nil {
					b.Fatal(err)
				}
			}
			c, err := rules.Compile(rules.Definition{ID: "silent", Enabled: true, Types: []string{"fridge"},
				Condition: "now - twin.update_time > duration('100h')",
				Actions:   []rules.Action{{Emit: &rules.EmitAction{Message: "'silent'"}}}})
			if err != nil {
				b.Fatal(err)
			}
			e.SetEvaluator(rules.NewSet([]*rules.Compiled{c}))
			if err := e.RunTimers(ctx); err != nil { // starts the ticking
				b.Fatal(err)
			}
			b.ResetTimer()
			walked := 0
			for walked < b.N {
				mu.Lock()
				clock = clock.Add(20 * time.Second) // a tick, and past its pace
				mu.Unlock()
				// Each step of each worker walks one chunk of 256.
				for range twins/256 + 1 {
					if err := e.RunTimers(ctx); err != nil {
						b.Fatal(err)
					}
				}
				walked += twins
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(walked), "ns/twin")
		})
	}
}
