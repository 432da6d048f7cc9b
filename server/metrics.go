package server

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/twind-io/twind/twin"
)

// engineCollector exports the engine's counts as Prometheus metrics, read
// once per scrape.
type engineCollector struct {
	e     *twin.Engine
	descs map[string]*prometheus.Desc
}

var engineMetrics = []struct {
	name, help string
	counter    bool
	value      func(twin.Stats) float64
}{
	{"twind_twins", "Twins in the store.", false, func(s twin.Stats) float64 { return float64(s.Twins) }},
	{"twind_connected_devices", "Devices holding a Connect stream.", false, func(s twin.Stats) float64 { return float64(s.ConnectedDevices) }},
	{"twind_revision", "The store's current revision.", false, func(s twin.Stats) float64 { return float64(s.Revision) }},
	{"twind_changes_total", "Committed changes of twins.", true, func(s twin.Stats) float64 { return float64(s.Changes) }},
	{"twind_commits_total", "Synced Pebble commits (each holds many changes).", true, func(s twin.Stats) float64 { return float64(s.Commits) }},
	{"twind_commit_seconds_total", "Time from commit to durable, summed over commits.", true, func(s twin.Stats) float64 { return s.CommitSeconds }},
	{"twind_commands_sent_total", "Commands queued.", true, func(s twin.Stats) float64 { return float64(s.CommandsSent) }},
	{"twind_commands_finished_total", "Commands that reached a final state.", true, func(s twin.Stats) float64 { return float64(s.CommandsFinished) }},
	{"twind_rule_firings_total", "Rule firings.", true, func(s twin.Stats) float64 { return float64(s.RuleFirings) }},
	{"twind_rule_errors_total", "Rule evaluation errors.", true, func(s twin.Stats) float64 { return float64(s.RuleErrors) }},
	{"twind_cached_twins", "Twins in the twin cache.", false, func(s twin.Stats) float64 { return float64(s.CachedTwins) }},
	{"twind_twin_cache_bytes", "Estimated memory held by the twin cache.", false, func(s twin.Stats) float64 { return float64(s.CacheBytes) }},
	{"twind_twin_cache_hits_total", "Lookups of twins by the workers that found them cached.", true, func(s twin.Stats) float64 { return float64(s.CacheHits) }},
	{"twind_twin_cache_misses_total", "Twins the workers read from the store.", true, func(s twin.Stats) float64 { return float64(s.CacheMisses) }},
}

func newEngineCollector(e *twin.Engine) *engineCollector {
	c := &engineCollector{e: e, descs: map[string]*prometheus.Desc{}}
	for _, m := range engineMetrics {
		c.descs[m.name] = prometheus.NewDesc(m.name, m.help, nil, nil)
	}
	return c
}

func (c *engineCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

func (c *engineCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.e.Stats()
	for _, m := range engineMetrics {
		t := prometheus.GaugeValue
		if m.counter {
			t = prometheus.CounterValue
		}
		ch <- prometheus.MustNewConstMetric(c.descs[m.name], t, m.value(s))
	}
}
