package cluster

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are a member's Prometheus metrics. They outlive the member's
// roles: a node's owner phases each register them with their server.
type metrics struct {
	m       *Member
	append  prometheus.Histogram
	changes *prometheus.Desc
	owner   *prometheus.Desc
	logLast *prometheus.Desc
	applied *prometheus.Desc
	lag     *prometheus.Desc
}

func newMetrics(m *Member) *metrics {
	return &metrics{
		m: m,
		append: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "twind_cluster_append_seconds",
			Help:    "How long an append to the replicated log took, from the owner's request to the quorum's acknowledgement (fsync included).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		changes: prometheus.NewDesc("twind_cluster_ownership_changes_total", "How many times this node took the shards over.", nil, nil),
		owner:   prometheus.NewDesc("twind_cluster_owner", "1 while this node owns the shards, else 0.", nil, nil),
		logLast: prometheus.NewDesc("twind_cluster_log_last", "The replicated log's last position, as this node last read it.", nil, nil),
		applied: prometheus.NewDesc("twind_cluster_applied", "The last log position each node has applied to its store, as it last reported.", []string{"node"}, nil),
		lag:     prometheus.NewDesc("twind_cluster_lag", "How far each node's store is behind the log's last position, in log records.", []string{"node"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *metrics) Describe(ch chan<- *prometheus.Desc) {
	c.append.Describe(ch)
	ch <- c.changes
	ch <- c.owner
	ch <- c.logLast
	ch <- c.applied
	ch <- c.lag
}

// Collect implements prometheus.Collector.
func (c *metrics) Collect(ch chan<- prometheus.Metric) {
	c.append.Collect(ch)
	ch <- prometheus.MustNewConstMetric(c.changes, prometheus.CounterValue, float64(c.m.changes.Load()))
	owner := 0.0
	if c.m.role.Load().(Role) == RoleOwner {
		owner = 1
	}
	ch <- prometheus.MustNewConstMetric(c.owner, prometheus.GaugeValue, owner)
	st, err := c.m.Status(context.Background())
	if err != nil {
		return
	}
	ch <- prometheus.MustNewConstMetric(c.logLast, prometheus.GaugeValue, float64(st.LogLast))
	for _, n := range st.Nodes {
		ch <- prometheus.MustNewConstMetric(c.applied, prometheus.GaugeValue, float64(n.Applied), n.Name)
		ch <- prometheus.MustNewConstMetric(c.lag, prometheus.GaugeValue, float64(n.Lag), n.Name)
	}
}

// Metrics returns the member's Prometheus collector: append latency,
// ownership changes, and each node's applied position and lag.
func (m *Member) Metrics() prometheus.Collector { return m.metrics }
