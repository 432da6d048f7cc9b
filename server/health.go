package server

import (
	"github.com/prometheus/client_golang/prometheus"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// servedServices are the services whose health the health service reports;
// "" is the server as a whole.
var servedServices = []string{"", twinv1.TwinService_ServiceDesc.ServiceName, twinv1.DeviceService_ServiceDesc.ServiceName,
	twinv1.CommandService_ServiceDesc.ServiceName, twinv1.RuleService_ServiceDesc.ServiceName}

// setServing sets the status of every served service.
func (s *Server) setServing(st healthpb.HealthCheckResponse_ServingStatus) {
	for _, svc := range servedServices {
		s.health.SetServingStatus(svc, st)
	}
}

// watchStore keeps the health service in step with the store until
// shutdown begins: NOT_SERVING while the store has a background error (a
// flush or compaction failing, as on a full disk), SERVING again when it
// clears. A fatal store error (a failed WAL or MANIFEST write or sync) leaves
// it NOT_SERVING and closes s.storeFailed, on which Run stops the server:
// twind is crash-only there, and a restart recovers from what is durable.
func (s *Server) watchStore() {
	defer s.healthWG.Done()
	serving := true
	for {
		changed := s.engine.HealthChanged()
		h := s.engine.Health()
		if ok := h.Err() == nil; ok != serving {
			serving = ok
			switch {
			case ok:
				s.opts.Logger.Info("the store is healthy again; serving")
				s.setServing(healthpb.HealthCheckResponse_SERVING)
			case h.Fatal == nil:
				s.opts.Logger.Error("the store is failing; health is NOT_SERVING until it recovers", "err", h.Err().Error())
				s.setServing(healthpb.HealthCheckResponse_NOT_SERVING)
			default:
				s.setServing(healthpb.HealthCheckResponse_NOT_SERVING)
			}
		}
		if h.Fatal != nil {
			s.opts.Logger.Error("the store failed and cannot recover while running; stopping so that a restart recovers from what is durable",
				"err", h.Fatal.Error())
			close(s.storeFailed)
			return
		}
		select {
		case <-changed:
		case <-s.stopCtx.Done():
			return
		}
	}
}

// storeCollector exports the store's health as Prometheus metrics.
type storeCollector struct {
	e                          *twin.Engine
	failed, background, errors *prometheus.Desc
}

func newStoreCollector(e *twin.Engine) *storeCollector {
	return &storeCollector{
		e: e,
		failed: prometheus.NewDesc("twind_store_failed",
			"1 once the store failed fatally (a WAL or MANIFEST write or sync); twind then exits.", nil, nil),
		background: prometheus.NewDesc("twind_store_background_error",
			"1 while the store's background work (flushes, compactions) fails, for example on a full disk.", nil, nil),
		errors: prometheus.NewDesc("twind_store_background_errors_total",
			"Failed background jobs of the store (flushes, compactions).", nil, nil),
	}
}

func (c *storeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.failed
	ch <- c.background
	ch <- c.errors
}

func (c *storeCollector) Collect(ch chan<- prometheus.Metric) {
	h := c.e.Health()
	ch <- prometheus.MustNewConstMetric(c.failed, prometheus.GaugeValue, flag(h.Fatal != nil))
	ch <- prometheus.MustNewConstMetric(c.background, prometheus.GaugeValue, flag(h.Background != nil))
	ch <- prometheus.MustNewConstMetric(c.errors, prometheus.CounterValue, float64(h.BackgroundErrors))
}

func flag(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
