// Package server serves twind's gRPC API: it wires the twin engine and the
// rules together, validates every request, and translates errors to gRPC
// status codes in one place.
//
// Run is the whole daemon: it opens the store, serves until its context is
// done, then shuts down gracefully. The twind command and the end-to-end
// tests both call it.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/rules"
	"github.com/twind-io/twind/twin"
)

// Options configure a server. The zero value of every field is its default.
type Options struct {
	// Addr is the address to listen on. Default "localhost:50051".
	Addr string
	// TLSCertFile and TLSKeyFile, if set, make the server speak TLS with
	// this certificate chain and key (PEM). Default: plaintext.
	TLSCertFile, TLSKeyFile string
	// APIKeysFile, if set, is a file of API keys, one a line:
	// '<role> <sha256 of the key, hex> <name>', with blank lines and '#'
	// comments. Reload re-reads it. Once any key exists (from this file,
	// APIToken or KeyService.CreateKey), every call of the operator
	// services must carry a key as 'authorization: Bearer <key>' whose role
	// allows it. Devices use their own tokens. Default: none; with no key
	// at all, the operator API is open.
	APIKeysFile string
	// APIToken, if set, is an admin key named "api-token".
	APIToken string
	// APITokenFile, if set, is a file holding an admin key named
	// "api-token" (instead of APIToken, which the process list shows).
	// Reload re-reads it.
	APITokenFile string
	// DebugAddr, if set, is an HTTP address on which Run serves /metrics
	// (Prometheus) and /debug/pprof (Go's profiles) to callers with an API
	// key of any role; with no key configured, it must be a loopback
	// address, and serves anyone who can reach it.
	DebugAddr string
	// AllowOpenAPI lets Run serve the operator API without any API key on
	// an address other machines can reach; without it, that is refused.
	AllowOpenAPI bool
	// Listener, if set, is used instead of listening on Addr.
	Listener net.Listener
	// DataDir is the directory of the store. Default "./twind-data".
	DataDir string
	// Engine configures the twin engine; its Dir, Logger and Clock are
	// taken from this struct.
	Engine twin.Options
	// Logger receives the server's logs. Default slog.Default().
	Logger *slog.Logger
	// Clock tells the time. Default time.Now.
	Clock func() time.Time
	// ShutdownTimeout bounds how long shutdown waits for requests in
	// flight. Default 10s.
	ShutdownTimeout time.Duration
	// DeviceSendTimeout bounds how long a send on a device stream may wait
	// for the device to read: a device that reads nothing for that long is
	// disconnected with RESOURCE_EXHAUSTED, and its commands stay queued. A
	// device that reads, however slowly, is never cut off: desired changes
	// not yet sent to it are coalesced into one update, and its commands
	// are bounded by Engine.CommandQueueLimit. Default 30s.
	DeviceSendTimeout time.Duration
	// DeviceReportWindow bounds the reports (and desired acks) of one device
	// stream that the engine holds at once. A device that sends more
	// without waiting for acks is held back by gRPC's flow control, so that
	// it cannot fill its worker's inbox ahead of other devices. Default 32.
	DeviceReportWindow int
	// HelloTimeout bounds how long a new device stream may take to send its
	// hello. Default 10s.
	HelloTimeout time.Duration
	// WatchSendTimeout bounds how long a message of a WatchTwins or
	// WatchRuleEvents stream may wait for its client to read it; a client
	// that reads no more is ended with RESOURCE_EXHAUSTED and resumes from
	// the revision the message names. Default 30s.
	WatchSendTimeout time.Duration
	// ListCostBudget bounds the filtering work of one ListTwins page, in
	// CEL cost units: each twin whose filter it evaluates costs 50 (about
	// what presenting the twin to CEL takes) plus the evaluation's CEL
	// cost, and a page that has spent its budget ends early, with what it
	// matched so far (maybe nothing) and a next_page_token that continues
	// the scan. Default 10,000,000: about half a second of filtering on a
	// 2-core machine, 200,000 twins for a simple filter.
	ListCostBudget uint64
	// Metrics is where the server registers its Prometheus metrics (gRPC
	// calls by method and code, and the engine's counts). Default: a
	// registry of its own, with Go's runtime and process metrics, served
	// by MetricsHandler.
	Metrics *prometheus.Registry
	// Ready, if set, is called with the address the server listens on once
	// it accepts connections.
	Ready func(addr net.Addr)

	// Limits keeps twind up when clients misbehave (see the README's
	// Limits table); they are documented in limits.go.
	Limits Limits
	// DeviceCAFile, if set, is a PEM bundle of the certificate authorities
	// whose client certificates authenticate devices (see devicecert.go).
	// It needs TLSCertFile and TLSKeyFile. Default: none, and client
	// certificates are ignored.
	DeviceCAFile string
	// DeviceCRLFile, if set, is a certificate revocation list (PEM or
	// DER) signed by a CA of DeviceCAFile. Reload re-reads it.
	DeviceCRLFile string
	// Reload, if set, makes Run call Reload each time it receives (twind
	// sends it SIGHUP).
	Reload <-chan os.Signal
	// ClusterStatus, if set, answers ClusterService.GetClusterStatus, on a
	// node of a cluster (cluster.go). Default: none, and GetClusterStatus
	// answers FAILED_PRECONDITION.
	ClusterStatus ClusterStatusSource
	// Serving, if set, is asked before every call whether this node may
	// serve it; an error refuses the call with UNAVAILABLE and its
	// message. A cluster node serves only under its lease on the shards.
	Serving func() error
}

// EnsureDefaults fills the zero fields of o with their defaults.
func (o *Options) EnsureDefaults() {
	if o.Addr == "" {
		o.Addr = "localhost:50051"
	}
	if o.DataDir == "" {
		o.DataDir = "./twind-data"
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	if o.ShutdownTimeout <= 0 {
		o.ShutdownTimeout = 10 * time.Second
	}
	if o.DeviceSendTimeout <= 0 {
		o.DeviceSendTimeout = 30 * time.Second
	}
	if o.DeviceReportWindow <= 0 {
		o.DeviceReportWindow = 32
	}
	if o.Metrics == nil {
		o.Metrics = prometheus.NewRegistry()
		o.Metrics.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	if o.WatchSendTimeout <= 0 {
		o.WatchSendTimeout = 30 * time.Second
	}
	if o.HelloTimeout <= 0 {
		o.HelloTimeout = 10 * time.Second
	}
	if o.ListCostBudget == 0 {
		o.ListCostBudget = defaultListCostBudget
	}
	o.Limits.ensureDefaults()
	o.Engine.Dir = o.DataDir
	o.Engine.Logger = o.Logger
	o.Engine.Clock = o.Clock
}

// Server is a running twind: the engine and the gRPC services over it.
type Server struct {
	opts       Options
	engine     *twin.Engine
	keys       *keyring
	rules      *rules.Registry
	ruleEvents *ruleHub
	devices    *deviceService
	grpc       *grpc.Server
	health     *health.Server
	// reports is each device's report rate limit; certs, if set,
	// authenticates devices by their client certificates.
	reports *reportLimits
	certs   *deviceCerts
	web     web // HTTP/JSON, gRPC-Web and the console (http.go)

	// stopCtx is cancelled when shutdown begins; streams end on it.
	stopCtx  context.Context
	stopping context.CancelFunc
	// flusher stores rule statuses periodically until shutdown.
	flusher sync.WaitGroup
	// healthWG is watchStore, which keeps health in step with the store
	// and closes storeFailed when the store fails fatally.
	healthWG    sync.WaitGroup
	storeFailed chan struct{}

	shutdownOnce sync.Once
	shutdownErr  error

	// inflight counts the calls being served, for the shutdown log.
	inflight inflight
}

// inflight counts the calls in progress by method.
type inflight struct {
	mu    sync.Mutex
	calls map[string]int // protected by mu
}

func (f *inflight) enter(method string) func() {
	f.mu.Lock()
	f.calls[method]++
	f.mu.Unlock()
	return func() {
		f.mu.Lock()
		if f.calls[method]--; f.calls[method] == 0 {
			delete(f.calls, method)
		}
		f.mu.Unlock()
	}
}

func (f *inflight) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	defer f.enter(info.FullMethod)()
	return handler(ctx, req)
}

func (f *inflight) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	defer f.enter(info.FullMethod)()
	return handler(srv, ss)
}

// endAtShutdown gives the health service's Watch streams a context that
// ends when shutdown begins, as twind's own streams have: grpc-go's health
// server ends a Watch only when its context does, and a graceful stop
// would otherwise wait its whole timeout for every watching client.
func (s *Server) endAtShutdown(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if info.FullMethod != healthpb.Health_Watch_FullMethodName {
		return handler(srv, ss)
	}
	ctx, cancel := s.streamContext(ss.Context())
	defer cancel()
	return handler(srv, contextStream{ServerStream: ss, ctx: ctx})
}

// contextStream is a grpc.ServerStream with a context of its own.
type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (c contextStream) Context() context.Context { return c.ctx }

// String lists the calls in progress, e.g. "Connect×3, WatchTwins×1".
func (f *inflight) String() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var parts []string
	for m, n := range f.calls {
		parts = append(parts, fmt.Sprintf("%s×%d", m[strings.LastIndexByte(m, '/')+1:], n))
	}
	slices.Sort(parts)
	return strings.Join(parts, ", ")
}

// New opens the store and builds the server. The caller must Close it.
func New(opts Options) (*Server, error) {
	opts.EnsureDefaults()
	hub := newRuleHub()
	hub.logger = opts.Logger
	opts.Engine.OnFirings = hub.publish
	e, err := twin.Open(opts.Engine)
	if err != nil {
		return nil, err
	}
	reg, err := newRuleRegistry(e, hub, opts)
	if err != nil {
		e.Close()
		return nil, err
	}
	keys, err := newKeyring(e, opts.Clock, opts.APIKeysFile, opts.APIToken, opts.APITokenFile)
	if err != nil {
		e.Close()
		return nil, err
	}
	s := &Server{
		opts:        opts,
		engine:      e,
		keys:        keys,
		rules:       reg,
		ruleEvents:  hub,
		health:      health.NewServer(),
		storeFailed: make(chan struct{}),
	}
	s.stopCtx, s.stopping = context.WithCancel(context.Background())
	s.inflight.calls = map[string]int{}
	auth := &apiAuth{keys: keys, certDevice: s.certDevice, logger: opts.Logger, failures: newSampledLog()}
	grpcMetrics := grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram())
	if err := opts.Limits.check(opts.Engine.Limits); err != nil {
		e.Close()
		return nil, err
	}
	s.reports = newReportLimits(opts.Limits.ReportRate, opts.Limits.ReportBurst)
	watchers := &watchLimits{perConn: int64(opts.Limits.MaxWatchersPerConn), all: int64(opts.Limits.MaxWatchers)}
	serverOpts := opts.Limits.serverOptions()
	if opts.TLSCertFile != "" || opts.TLSKeyFile != "" || opts.DeviceCAFile != "" {
		// TLS is terminated on the listener (serve), under the routing
		// of gRPC and HTTP connections; grpc-go learns each connection's
		// TLS state from it (terminatedTLS), client certificates too.
		cfg, certs, err := serverTLS(opts)
		if err != nil {
			e.Close()
			return nil, err
		}
		s.certs = certs
		s.web.tlsConfig = cfg
		serverOpts = append(serverOpts, grpc.Creds(terminatedTLS{}))
	}
	s.grpc = grpc.NewServer(append(serverOpts,
		grpc.ChainUnaryInterceptor(grpcMetrics.UnaryServerInterceptor(), s.inflight.unary, s.servingUnary, auth.unary),
		grpc.ChainStreamInterceptor(grpcMetrics.StreamServerInterceptor(), s.inflight.stream, s.servingStream, s.endAtShutdown, auth.stream, watchers.stream),
		grpc.StatsHandler(rpcLog{logger: opts.Logger, decode: newSampledLog()}),
		// Stop, after the shutdown timeout, waits for the handlers it
		// cancels: the store closes under none of them.
		grpc.WaitForHandlers(true),
		// A fixed pool of stream workers saves a goroutine per call.
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
	)...)
	twinv1.RegisterTwinServiceServer(s.grpc, &twinService{s: s, sendTimeout: opts.WatchSendTimeout})
	s.devices = &deviceService{s: s, refusals: newSampledLog(), ends: newSampledLog(), hellos: &helloGate{max: int64(opts.Limits.MaxHelloWaiting), perConn: int64(opts.Limits.MaxHelloWaitingPerConn)}}
	twinv1.RegisterDeviceServiceServer(s.grpc, s.devices)
	twinv1.RegisterCommandServiceServer(s.grpc, &commandService{s: s})
	twinv1.RegisterRuleServiceServer(s.grpc, &ruleService{s: s})
	twinv1.RegisterKeyServiceServer(s.grpc, &keyService{s: s})
	twinv1.RegisterClusterServiceServer(s.grpc, clusterService{source: opts.ClusterStatus})
	healthpb.RegisterHealthServer(s.grpc, s.health)
	grpcMetrics.InitializeMetrics(s.grpc)
	if err := opts.Metrics.Register(grpcMetrics); err != nil {
		e.Close()
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	if err := opts.Metrics.Register(newEngineCollector(e)); err != nil {
		e.Close()
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	if err := opts.Metrics.Register(newStoreCollector(e)); err != nil {
		e.Close()
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	reflection.Register(s.grpc)
	if err := s.newWeb(); err != nil { // HTTP/JSON and the console: http.go
		e.Close()
		return nil, err
	}
	s.setServing(healthpb.HealthCheckResponse_SERVING)
	s.healthWG.Add(1)
	go s.watchStore()
	s.flusher.Add(1)
	go s.flushRules()
	return s, nil
}

// MetricsHandler serves the server's metrics in the Prometheus format.
func (s *Server) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(s.opts.Metrics, promhttp.HandlerOpts{})
}

// Engine returns the server's twin engine.
func (s *Server) Engine() *twin.Engine { return s.engine }

// Serve serves on l until Shutdown. It returns nil after a shutdown.
//
// It serves gRPC, and the same services over HTTP/JSON (Connect) and
// gRPC-Web, and the web console at /, on the one listener (see http.go).
// At most Limits.MaxConnections connections are served at once, of every
// protocol; further ones wait to be accepted.
func (s *Server) Serve(l net.Listener) error {
	return s.serve(netutil.LimitListener(l, s.opts.Limits.MaxConnections))
}

// Shutdown stops accepting connections, ends streams with UNAVAILABLE,
// waits up to the shutdown timeout for requests in flight, and closes the
// store. Every acknowledged write is durable before Shutdown returns. Calls
// after the first return the first one's result.
func (s *Server) Shutdown() error {
	s.shutdownOnce.Do(func() { s.shutdownErr = s.shutdown() })
	return s.shutdownErr
}

func (s *Server) shutdown() error {
	var unclean error // set if shutdown gives up on calls
	s.stopping()
	s.flusher.Wait()
	s.healthWG.Wait()
	s.health.Shutdown()
	done := make(chan struct{})
	webCtx, forceWeb := context.WithCancel(context.Background())
	defer forceWeb()
	go func() {
		s.stopWeb(webCtx) // waits for HTTP calls, which GracefulStop would cancel
		s.grpc.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(s.opts.ShutdownTimeout)
	defer t.Stop()
	// Once every handler has returned, the reader of a device stream may
	// still be ending (it does nothing more with the engine): wait for it
	// too, so that nothing of the server runs after Shutdown.
	select {
	case <-done:
		s.devices.readers.Wait()
	case <-t.C:
		s.opts.Logger.Warn("calls still in flight after the shutdown timeout; cancelling them",
			"timeout", s.opts.ShutdownTimeout, "waiting_for", s.inflight.String())
		forceWeb()
		stopped := make(chan struct{})
		go func() {
			s.grpc.Stop() // waits for the handlers to return
			close(stopped)
		}()
		t.Reset(s.opts.ShutdownTimeout)
		select {
		case <-stopped:
			<-done // GracefulStop returns once Stop has
			s.devices.readers.Wait()
		case <-t.C:
			// A handler ignores its cancellation: a bug, but the store
			// must still close, and every engine call after that fails
			// with ErrClosed.
			abandoned := s.inflight.String()
			s.opts.Logger.Error("calls did not end after being cancelled; giving up on them and closing the store",
				"waiting_for", abandoned)
			unclean = fmt.Errorf("shutdown gave up on calls that did not end: %s", abandoned)
		}
	}
	if s.engine.Health().Fatal == nil { // a failed store takes no more writes
		if err := s.rules.Flush(); err != nil {
			s.opts.Logger.Error("storing rule statuses failed", "err", err)
		}
	}
	return errors.Join(unclean, s.engine.Close())
}

// flushRules stores rule statuses every 30 seconds until shutdown begins.
func (s *Server) flushRules() {
	defer s.flusher.Done()
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			if s.engine.Health().Fatal != nil {
				continue // a failed store takes no more writes
			}
			if err := s.rules.Flush(); err != nil {
				s.opts.Logger.Error("storing rule statuses failed", "err", err)
			}
		case <-s.stopCtx.Done():
			return
		}
	}
}

// streamContext returns a context for a stream that is cancelled when the
// server begins to shut down.
func (s *Server) streamContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(s.stopCtx, func() { cancel(errShutdown) })
	return ctx, func() { stop(); cancel(context.Canceled) }
}

// streamStatus translates the error that ended a stream.
func (s *Server) streamStatus(method string, ctx context.Context, err error) error {
	if cause := context.Cause(ctx); errors.Is(cause, errShutdown) {
		return s.status(method, fmt.Errorf("%w: reconnect to another server or retry", errShutdown))
	}
	if cause := context.Cause(ctx); errors.Is(cause, errKeyRevoked) {
		return s.status(method, cause)
	}
	if errors.Is(err, twin.ErrClosed) {
		return s.status(method, errShutdown)
	}
	return s.status(method, err)
}

// status translates err for a method.
func (s *Server) status(method string, err error) error {
	return toStatus(s.opts.Logger, method, err)
}

// servingUnary and servingStream refuse a call with UNAVAILABLE while
// Options.Serving says this node may not serve (a cluster node whose lease
// on the shards lapsed): the client retries, and reaches the new owner.
func (s *Server) servingUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if s.opts.Serving != nil {
		if err := s.opts.Serving(); err != nil {
			return nil, status.Error(codes.Unavailable, err.Error())
		}
	}
	return handler(ctx, req)
}

func (s *Server) servingStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if s.opts.Serving != nil {
		if err := s.opts.Serving(); err != nil {
			return status.Error(codes.Unavailable, err.Error())
		}
	}
	return handler(srv, ss)
}

// Run runs a server until ctx is done, then shuts it down gracefully. It
// returns an error if the store cannot be opened or the address cannot be
// listened on.
func Run(ctx context.Context, opts Options) error {
	opts.EnsureDefaults()
	l := opts.Listener
	if l == nil {
		var err error
		if l, err = net.Listen("tcp", opts.Addr); err != nil {
			return fmt.Errorf("listen on %s: %w", opts.Addr, err)
		}
	}
	defer l.Close()
	s, err := New(opts)
	if err != nil {
		return err
	}
	if opts.DebugAddr != "" {
		loopback := loopbackHost(opts.DebugAddr)
		if !loopback && s.keys.current().empty() {
			s.Shutdown()
			return fmt.Errorf("--debug-addr %s is not a loopback address, and no API key is configured: "+
				"configure keys (--api-keys, --api-token-file) so that the debug endpoints require one, or serve them on localhost", opts.DebugAddr)
		}
		dl, err := net.Listen("tcp", opts.DebugAddr)
		if err != nil {
			s.Shutdown()
			return fmt.Errorf("listen on the debug address %s: %w", opts.DebugAddr, err)
		}
		hs := &http.Server{Handler: s.debugHandler(loopback), ReadHeaderTimeout: 10 * time.Second}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); hs.Serve(dl) }()
		defer func() { hs.Close(); wg.Wait() }()
		opts.Logger.Info("serving metrics and profiles", "addr", "http://"+dl.Addr().String()+"/metrics",
			"key_required", !s.keys.current().empty())
	}
	if opts.APIToken != "" {
		opts.Logger.Warn("--api-token is visible in the process list to every user of this machine; prefer --api-token-file or --api-keys")
	}
	exposed := exposedAddr(l.Addr())
	if set := s.keys.current(); set.empty() {
		if exposed && !opts.AllowOpenAPI {
			s.Shutdown()
			return fmt.Errorf("twind would serve its operator API on %s, beyond this machine, to anyone without an API key: "+
				"configure keys (--api-keys, --api-token-file), listen on localhost, or pass --allow-open-api to accept that", l.Addr())
		}
		opts.Logger.Warn("the operator API is open to anyone who can reach it; configure API keys (--api-keys, --api-token-file) to require one")
	} else {
		opts.Logger.Info("operator calls need an API key", "keys", len(set.keys))
		if exposed && opts.TLSCertFile == "" {
			opts.Logger.Warn("API keys and device tokens travel in cleartext on this address, beyond this machine; serve TLS (--tls-cert, --tls-key)",
				"addr", l.Addr().String())
		}
	}
	opts.Logger.Info("twind serving", "addr", l.Addr().String(), "tls", opts.TLSCertFile != "", "data", opts.DataDir,
		"twins", s.engine.Len(), "revision", s.engine.Revision())
	if opts.Ready != nil {
		opts.Ready(l.Addr())
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- s.Serve(l) }()
	served := false
serving:
	for {
		select {
		case <-opts.Reload:
			s.Reload() // logs what it did
			continue
		case <-ctx.Done():
			opts.Logger.Info("shutting down")
		case err = <-serveErr:
			served = true
			opts.Logger.Error("serving failed; shutting down", "err", err)
		case <-s.storeFailed:
			err = s.engine.Health().Fatal
			opts.Logger.Error("shutting down after a fatal store error; restart twind to recover", "err", err.Error())
		}
		break serving
	}
	if cerr := s.Shutdown(); cerr != nil && !errors.Is(cerr, twin.ErrClosed) {
		err = errors.Join(err, cerr)
	}
	if !served {
		err = errors.Join(err, <-serveErr)
	}
	if err == nil {
		opts.Logger.Info("stopped cleanly")
	}
	return err
}
