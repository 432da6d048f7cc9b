package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/soheilhy/cmux"
	"golang.org/x/net/netutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// A standby node of a cluster serves no twin itself: its Forwarder relays
// every call to the owner, unchanged, so that clients may call any node
// (a plain TCP load balancer in front of the nodes is enough):
//
//   - native gRPC goes through a transparent proxy: grpc-go's unknown
//     service handler relays each call's messages as raw bytes (rawCodec),
//     whatever its method and kind (unary, client, server or bidi
//     streaming), with its metadata, deadline and cancellation, and
//     relays back the owner's headers, messages, trailers and status;
//   - HTTP (Connect, gRPC-Web, the console) goes through a reverse proxy.
//
// Each client connection gets its own connection to the owner, so that
// the owner's per-connection limits (streams, watches, devices waiting
// for their hello) apply to each client as they would without the
// standby, not to the standby as a whole.
//
// The forwarder answers two services itself: health (by
// ForwardOptions.Healthy) and ClusterService (the node's own view).

// forwardedKey is the metadata a forwarder sets on the calls it forwards.
// A node that receives a forwarded call and is no owner refuses it, so
// that two nodes that each think the other owns the shards do not pass a
// call back and forth.
const forwardedKey = "twind-forwarded"

// errLoop answers a forwarded call that reached a node that is no owner.
var errLoop = status.Error(codes.Unavailable, "the owner changed; retry")

// ForwardOptions configure a standby node's server, which forwards every
// call to the owner.
type ForwardOptions struct {
	// Owner returns the API address (host:port) of the node that owns the
	// shards now, or an error when none is known (answered as UNAVAILABLE
	// with its message). It is called on every call, concurrently.
	Owner func() (addr string, err error)
	// Healthy reports whether this node can serve (through the owner);
	// health answers SERVING or NOT_SERVING by it. Default: always.
	Healthy func() bool
	// ClusterStatus answers ClusterService.GetClusterStatus locally (not
	// forwarded). Default: none, and GetClusterStatus answers
	// FAILED_PRECONDITION.
	ClusterStatus ClusterStatusSource
	// Logger receives the forwarder's logs. Default slog.Default().
	Logger *slog.Logger
	// MaxRecvMsgSize bounds a message the forwarder receives from a
	// client. Default as the server's (Limits.MaxRecvMsgSize).
	MaxRecvMsgSize int
}

func (o *ForwardOptions) ensureDefaults() {
	if o.Healthy == nil {
		o.Healthy = func() bool { return true }
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.MaxRecvMsgSize <= 0 {
		o.MaxRecvMsgSize = defaultMaxRecvMsgSize
	}
}

// healthPoll is how often the forwarder asks Healthy for the health
// service's Watch streams; Check asks it on every call.
const healthPoll = time.Second

// Forwarder serves a standby's API port. It is safe for concurrent use.
type Forwarder struct {
	opts   ForwardOptions
	limits Limits // the server's defaults, MaxRecvMsgSize aside
	grpc   *grpc.Server
	health *forwardHealth
	// proxy serves the HTTP connections (Connect, gRPC-Web, the console),
	// over transport's connections to the owner.
	proxy     *httputil.ReverseProxy
	transport *http.Transport

	// stopCtx ends when Stop begins.
	stopCtx context.Context
	stop    context.CancelFunc
	// wg is the forwarder's goroutines other than grpc-go's handlers: the
	// health poller, and each call's reader of its client's messages.
	wg sync.WaitGroup
	// httpCalls is the HTTP calls in progress, which http.Server.Close
	// does not wait for. Added to under mu, while not stopped.
	httpCalls sync.WaitGroup

	mu      sync.Mutex
	stopped bool                   // protected by mu
	serving []*forwardServing      // protected by mu
	ups     map[*upstream]struct{} // protected by mu; every client connection's
	owner   string                 // protected by mu; the last owner address seen, for the log
}

// forwardServing is one Serve call's state, for Stop.
type forwardServing struct {
	root  net.Listener
	conns *sniffTracker
	http  *http.Server
}

// NewForwarder builds a forwarder. Serve it on a listener; Stop it.
func NewForwarder(o ForwardOptions) *Forwarder {
	o.ensureDefaults()
	f := &Forwarder{opts: o, ups: map[*upstream]struct{}{}}
	f.stopCtx, f.stop = context.WithCancel(context.Background())
	limits := Limits{MaxRecvMsgSize: o.MaxRecvMsgSize}
	limits.ensureDefaults()
	f.limits = limits
	f.grpc = grpc.NewServer(
		grpc.MaxConcurrentStreams(limits.MaxConcurrentStreams),
		grpc.MaxRecvMsgSize(limits.MaxRecvMsgSize),
		grpc.MaxHeaderListSize(uint32(min(limits.MaxHeaderBytes, math.MaxUint32))),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: limits.KeepaliveTime, Timeout: limits.KeepaliveTimeout}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: limits.KeepaliveMinTime, PermitWithoutStream: true}),
		// Health and ClusterService are served here, with protobuf;
		// everything else is relayed as raw bytes.
		grpc.ForceServerCodecV2(rawCodec{}),
		grpc.UnknownServiceHandler(f.forward),
		grpc.StatsHandler(forwardConns{f}),
		grpc.WaitForHandlers(true),
	)
	f.health = &forwardHealth{Server: health.NewServer(), healthy: o.Healthy}
	healthpb.RegisterHealthServer(f.grpc, f.health)
	twinv1.RegisterClusterServiceServer(f.grpc, clusterService{source: o.ClusterStatus})
	f.health.check()
	f.wg.Go(f.pollHealth)
	f.transport = &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 100,
		IdleConnTimeout:     90 * time.Second,
	}
	f.proxy = &httputil.ReverseProxy{
		Rewrite: f.rewriteHTTP,
		// Streams flow as they come, and their headers go to the client
		// as soon as the owner's come (a browser's fetch resolves on
		// them): ReverseProxy flushes them at once.
		FlushInterval: -1,
		Transport:     f.transport,
		ErrorHandler:  f.httpError,
		ErrorLog:      slog.NewLogLogger(o.Logger.Handler(), slog.LevelDebug),
	}
	return f
}

// Serve serves gRPC and HTTP on l until Stop; it returns nil after Stop.
// It serves at most the server's default Limits.MaxConnections
// connections at once.
func (f *Forwarder) Serve(l net.Listener) error {
	conns := &sniffTracker{Listener: netutil.LimitListener(l, f.limits.MaxConnections), sniffing: map[net.Conn]struct{}{}}
	m := cmux.New(conns)
	m.SetReadTimeout(sniffTimeout)
	uncounted := prometheus.NewCounter(prometheus.CounterOpts{Name: "unused"})
	grpcL := handoff{m.MatchWithWriters(matchGRPC), conns, false, uncounted}
	httpL := handoff{m.Match(cmux.Any()), conns, true, uncounted}
	hs := &http.Server{
		Handler:           http.HandlerFunc(f.serveHTTP),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(f.opts.Logger.Handler(), slog.LevelDebug),
		Protocols:         new(http.Protocols),
	}
	hs.Protocols.SetHTTP1(true)
	hs.Protocols.SetUnencryptedHTTP2(true)
	fs := &forwardServing{root: l, conns: conns, http: hs}
	f.mu.Lock()
	if f.stopped {
		f.mu.Unlock()
		return nil
	}
	f.serving = append(f.serving, fs)
	f.mu.Unlock()

	var wg sync.WaitGroup
	errs := make([]error, 3)
	wg.Go(func() { errs[0] = m.Serve() })
	wg.Go(func() { errs[1] = f.grpc.Serve(grpcL) })
	wg.Go(func() { errs[2] = hs.Serve(httpL) })
	wg.Wait()
	if f.stopCtx.Err() != nil {
		return nil
	}
	return errors.Join(errs...)
}

// Stop ends every call and connection (clients see UNAVAILABLE and
// retry), closes the connections to the owner, and returns once nothing
// of the forwarder runs. Calls after the first do nothing.
func (f *Forwarder) Stop() {
	f.mu.Lock()
	if f.stopped {
		f.mu.Unlock()
		return
	}
	f.stopped = true
	serving := f.serving
	f.mu.Unlock()
	f.stop()
	f.health.Shutdown()
	for _, fs := range serving {
		fs.root.Close()
		fs.conns.closeSniffing()
		fs.http.Close() // ends the HTTP calls in flight
	}
	f.grpc.Stop() // waits for the handlers
	f.wg.Wait()
	f.httpCalls.Wait()
	f.transport.CloseIdleConnections()
	f.mu.Lock()
	ups := f.ups
	f.ups = nil
	f.mu.Unlock()
	for u := range ups {
		u.close()
	}
}

// forward relays one call to the owner: the unknown service handler.
func (f *Forwarder) forward(_ any, ss grpc.ServerStream) error {
	method, ok := grpc.MethodFromServerStream(ss)
	if !ok {
		return status.Error(codes.Internal, "the forwarder found no method in the call")
	}
	ctx := ss.Context()
	in, _ := metadata.FromIncomingContext(ctx)
	if len(in.Get(forwardedKey)) > 0 {
		return errLoop
	}
	addr, err := f.opts.Owner()
	if err != nil {
		return status.Error(codes.Unavailable, err.Error())
	}
	up, _ := ctx.Value(upstreamKey{}).(*upstream)
	if up == nil {
		return status.Error(codes.Internal, "the forwarder lost the call's connection")
	}
	cc, err := up.conn(f, addr)
	if err != nil {
		return err
	}

	out := metadata.MD{}
	for k, v := range in {
		if !hopHeader(k) {
			out[k] = v
		}
	}
	out.Set(forwardedKey, "1")
	ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(ctx, out))
	defer cancel()
	callOpts := []grpc.CallOption{grpc.ForceCodecV2(rawCodec{})}
	if ct := in.Get("content-type"); len(ct) > 0 {
		if _, sub, ok := strings.Cut(ct[0], "+"); ok && sub != "" {
			callOpts = append(callOpts, grpc.CallContentSubtype(sub))
		}
	}
	cs, err := cc.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, method, callOpts...)
	if err != nil {
		return f.upstreamStatus(ss, err)
	}

	// The client's messages go to the owner on a goroutine of their own;
	// the owner's go back to the client on this one.
	f.wg.Go(func() {
		for {
			var msg rawFrame
			if err := ss.RecvMsg(&msg); err != nil {
				if err == io.EOF {
					cs.CloseSend()
				} else {
					// The client left, or sent what cannot be received
					// (a message over MaxRecvMsgSize), which grpc-go has
					// answered already: the owner's call ends too.
					cancel()
				}
				return
			}
			if err := cs.SendMsg(&msg); err != nil {
				// The owner ended the call (io.EOF): its status comes
				// with RecvMsg below.
				return
			}
		}
	})

	// Headers go to the client as soon as the owner sends them (a watch
	// sends them once it is in place), even before any message.
	if md, err := cs.Header(); err == nil && md != nil {
		if err := ss.SendHeader(md); err != nil {
			cancel()
			return err
		}
	}
	for {
		var msg rawFrame
		err := cs.RecvMsg(&msg)
		if err == io.EOF {
			ss.SetTrailer(cs.Trailer())
			return nil
		}
		if err != nil {
			ss.SetTrailer(cs.Trailer())
			return f.upstreamStatus(ss, err)
		}
		if err := ss.SendMsg(&msg); err != nil {
			cancel()
			return err
		}
	}
}

// upstreamStatus is what the client sees of an error of the call to the
// owner: the owner's status unchanged, but for a cancellation the client
// did not ask for (the owner's connection closed as the owner changed or
// the forwarder stops), which is UNAVAILABLE so that the client retries.
func (f *Forwarder) upstreamStatus(ss grpc.ServerStream, err error) error {
	st := status.Convert(err)
	if st.Code() == codes.Canceled && ss.Context().Err() == nil {
		return status.Error(codes.Unavailable, "the owner changed; retry")
	}
	return st.Err()
}

// hopHeader reports whether a request header is the forwarder's own
// connection's, which grpc-go sets anew on the call to the owner.
func hopHeader(k string) bool {
	if strings.HasPrefix(k, ":") {
		return true
	}
	switch k {
	case "content-type", "user-agent", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
		"grpc-message-type", "grpc-message", "grpc-status", "grpc-status-details-bin", "grpc-previous-rpc-attempts":
		return true
	}
	return false
}

// upstream is a client connection's own connection to the owner, made on
// its first forwarded call and replaced when the owner changes.
type upstream struct {
	mu     sync.Mutex
	addr   string           // protected by mu
	cc     *grpc.ClientConn // protected by mu; nil until the first call
	closed bool             // protected by mu
}

type upstreamKey struct{}

// conn returns the connection to the owner at addr, closing one to a
// previous owner (whose calls then end with UNAVAILABLE).
func (u *upstream) conn(f *Forwarder, addr string) (*grpc.ClientConn, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return nil, status.Error(codes.Unavailable, "the connection is closing; retry")
	}
	if u.cc != nil && u.addr == addr {
		return u.cc, nil
	}
	cc, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)),
		// Find a dead owner as the owner finds a dead client; within the
		// owner's enforcement policy (Limits.KeepaliveMinTime).
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: defaultKeepaliveTime, Timeout: defaultKeepaliveTimeout, PermitWithoutStream: true}),
	)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "cannot connect to the owner at %s: %v", addr, err)
	}
	if u.cc != nil {
		u.cc.Close()
	}
	u.cc, u.addr = cc, addr
	f.noteOwner(addr)
	return cc, nil
}

func (u *upstream) close() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.closed = true
	if u.cc != nil {
		u.cc.Close()
		u.cc = nil
	}
}

// retireOwnersBut closes every connection to an owner other than addr, the
// owner now: its calls end with UNAVAILABLE at once, and their clients
// retry, instead of waiting on an owner that is paused or cut off until
// their deadlines.
func (f *Forwarder) retireOwnersBut(addr string) {
	f.mu.Lock()
	ups := make([]*upstream, 0, len(f.ups))
	for u := range f.ups {
		ups = append(ups, u)
	}
	f.mu.Unlock()
	for _, u := range ups {
		u.mu.Lock()
		if u.cc != nil && u.addr != addr {
			u.cc.Close()
			u.cc, u.addr = nil, ""
		}
		u.mu.Unlock()
	}
}

// noteOwner logs a change of the owner the calls go to.
func (f *Forwarder) noteOwner(addr string) {
	f.mu.Lock()
	changed := f.owner != addr
	f.owner = addr
	f.mu.Unlock()
	if changed {
		f.opts.Logger.Info("forwarding calls to the owner", "owner", addr)
	}
}

// forwardConns is the forwarder's stats handler: it gives each client
// connection an upstream, and closes it when the connection ends.
type forwardConns struct{ f *Forwarder }

func (h forwardConns) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	u := &upstream{}
	h.f.mu.Lock()
	if h.f.ups == nil { // stopped
		u.closed = true
	} else {
		h.f.ups[u] = struct{}{}
	}
	h.f.mu.Unlock()
	return context.WithValue(ctx, upstreamKey{}, u)
}

func (h forwardConns) HandleConn(ctx context.Context, s stats.ConnStats) {
	if _, ok := s.(*stats.ConnEnd); !ok {
		return
	}
	u, _ := ctx.Value(upstreamKey{}).(*upstream)
	if u == nil {
		return
	}
	u.close()
	h.f.mu.Lock()
	delete(h.f.ups, u)
	h.f.mu.Unlock()
}

func (forwardConns) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (forwardConns) HandleRPC(context.Context, stats.RPCStats)                       {}

// rawFrame is one message, relayed as its bytes.
type rawFrame struct{ data []byte }

// rawCodec relays rawFrames unchanged and encodes everything else
// (health, ClusterService) as protobuf.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if f, ok := v.(*rawFrame); ok {
		return mem.BufferSlice{mem.SliceBuffer(f.data)}, nil
	}
	return encoding.GetCodecV2("proto").Marshal(v)
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if f, ok := v.(*rawFrame); ok {
		f.data = data.Materialize()
		return nil
	}
	return encoding.GetCodecV2("proto").Unmarshal(data, v)
}

func (rawCodec) Name() string { return "proto" }

// forwardHealth answers Check by Healthy on every call; Watch streams
// follow it by polling (pollHealth).
type forwardHealth struct {
	*health.Server
	healthy func() bool
}

func (h *forwardHealth) check() healthpb.HealthCheckResponse_ServingStatus {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if h.healthy() {
		st = healthpb.HealthCheckResponse_SERVING
	}
	for _, svc := range servedServices {
		h.SetServingStatus(svc, st)
	}
	return st
}

func (h *forwardHealth) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	h.check()
	return h.Server.Check(ctx, req)
}

func (f *Forwarder) pollHealth() {
	t := time.NewTicker(healthPoll)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			f.health.check()
			if addr, err := f.opts.Owner(); err == nil {
				f.retireOwnersBut(addr)
			}
		case <-f.stopCtx.Done():
			return
		}
	}
}

// ownerKey is the context key of an HTTP request's owner address.
type ownerKey struct{}

// serveHTTP forwards an HTTP request (Connect, gRPC-Web, the console) to
// the owner, or refuses it with 503 and the reason.
func (f *Forwarder) serveHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	if f.stopped {
		f.mu.Unlock()
		http.Error(w, "this node is stopping; retry", http.StatusServiceUnavailable)
		return
	}
	f.httpCalls.Add(1)
	f.mu.Unlock()
	defer f.httpCalls.Done()
	if r.Header.Get(forwardedKey) != "" {
		http.Error(w, "the owner changed; retry", http.StatusServiceUnavailable)
		return
	}
	addr, err := f.opts.Owner()
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	f.proxy.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), ownerKey{}, addr)))
}

// rewriteHTTP addresses a request to the owner.
func (f *Forwarder) rewriteHTTP(r *httputil.ProxyRequest) {
	addr, _ := r.In.Context().Value(ownerKey{}).(string)
	r.SetURL(&url.URL{Scheme: "http", Host: addr})
	r.SetXForwarded()
	r.Out.Header.Set(forwardedKey, "1")
}

// httpError answers an HTTP request that could not reach the owner.
func (f *Forwarder) httpError(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return // the client left
	}
	addr, _ := r.Context().Value(ownerKey{}).(string)
	f.opts.Logger.Debug("forwarding an HTTP request failed", "path", r.URL.Path, "owner", addr, "err", err)
	http.Error(w, fmt.Sprintf("cannot reach the owner at %s: %v", addr, err), http.StatusBadGateway)
}
