package server

import (
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// The defaults of the limits in Options. The README's Limits table states
// them; TestLimitDefaults holds them to it.
const (
	defaultMaxConcurrentStreams = 2048
	defaultMaxConnections       = 10_000
	defaultMaxHelloWaiting      = 1000
	defaultMaxHelloWaitingConn  = 16
	defaultMaxHeaderBytes       = 16 << 10
	defaultMaxWatchersPerConn   = 100
	defaultMaxWatchers          = 1000
	defaultReportRate           = 100
	defaultReportBurst          = 200
	defaultMaxRecvMsgSize       = 4 << 20
	defaultKeepaliveTime        = 30 * time.Second
	defaultKeepaliveTimeout     = 20 * time.Second
	defaultKeepaliveMinTime     = 10 * time.Second
)

// Limits bound what clients may hold of the server at once. The zero value
// of every field is its default.
type Limits struct {
	// MaxConcurrentStreams bounds the calls (streams) in progress on one
	// connection; further calls on it wait, in the client, for one to end.
	// Default 2048.
	MaxConcurrentStreams uint32
	// MaxConnections bounds the connections in all; a further connection
	// waits, unaccepted in the listen backlog, until one closes. Default
	// 10,000.
	MaxConnections int
	// MaxHelloWaiting bounds the Connect streams, in all, that wait for
	// their hello (at most HelloTimeout each); a further one ends at once
	// with RESOURCE_EXHAUSTED. Default 1000.
	MaxHelloWaiting int
	// MaxHelloWaitingPerConn bounds them on one connection, so that one
	// client cannot take every place. Default 16.
	MaxHelloWaitingPerConn int
	// MaxHeaderBytes bounds the metadata (headers) of a call; a call with
	// more is refused before any handler reads it (RESOURCE_EXHAUSTED
	// or, beyond it, the connection closed). Default 16 KiB.
	MaxHeaderBytes int
	// MaxWatchersPerConn and MaxWatchers bound the WatchTwins and
	// WatchRuleEvents streams open on one connection and in all; a further
	// one ends at once with RESOURCE_EXHAUSTED. Defaults 100 and 1000.
	MaxWatchersPerConn, MaxWatchers int
	// ReportRate and ReportBurst are each device's token bucket for its
	// reports: ReportRate a second on average, ReportBurst at once. A
	// stream report beyond them gets a ReportAck with the error
	// RESOURCE_EXHAUSTED (the stream goes on); a ReportState call fails
	// with it. math.Inf(1) means no limit. Defaults 100 and 200.
	ReportRate  float64
	ReportBurst int
	// MaxRecvMsgSize bounds the size of a message the server receives; a
	// bigger one fails with RESOURCE_EXHAUSTED. It must be at least twice
	// Engine.Limits.MaxDocumentBytes, so that a document over its own limit
	// gets that limit's clearer error. Default 4 MiB.
	MaxRecvMsgSize int
	// KeepaliveTime and KeepaliveTimeout: the server pings a connection it
	// has read nothing from for KeepaliveTime, and closes it if the ping is
	// not answered within KeepaliveTimeout, ending its streams; so a
	// device whose connection silently died shows as disconnected within
	// their sum. KeepaliveTime is at least 1s. Defaults 30s and 20s.
	KeepaliveTime, KeepaliveTimeout time.Duration
	// KeepaliveMinTime is how often a client may ping, with or without
	// calls in progress; a client that pings more often is disconnected
	// (GOAWAY "too_many_pings"). Default 10s.
	KeepaliveMinTime time.Duration
}

func (l *Limits) ensureDefaults() {
	if l.MaxConcurrentStreams == 0 {
		l.MaxConcurrentStreams = defaultMaxConcurrentStreams
	}
	if l.MaxConnections <= 0 {
		l.MaxConnections = defaultMaxConnections
	}
	if l.MaxHelloWaiting <= 0 {
		l.MaxHelloWaiting = defaultMaxHelloWaiting
	}
	if l.MaxHelloWaitingPerConn <= 0 {
		l.MaxHelloWaitingPerConn = defaultMaxHelloWaitingConn
	}
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = defaultMaxHeaderBytes
	}
	if l.MaxWatchersPerConn <= 0 {
		l.MaxWatchersPerConn = defaultMaxWatchersPerConn
	}
	if l.MaxWatchers <= 0 {
		l.MaxWatchers = defaultMaxWatchers
	}
	if l.ReportRate <= 0 || math.IsNaN(l.ReportRate) {
		l.ReportRate = defaultReportRate
	}
	if l.ReportBurst <= 0 {
		l.ReportBurst = defaultReportBurst
	}
	if l.MaxRecvMsgSize <= 0 {
		l.MaxRecvMsgSize = defaultMaxRecvMsgSize
	}
	if l.KeepaliveTime <= 0 {
		l.KeepaliveTime = defaultKeepaliveTime
	}
	if l.KeepaliveTimeout <= 0 {
		l.KeepaliveTimeout = defaultKeepaliveTimeout
	}
	if l.KeepaliveMinTime <= 0 {
		l.KeepaliveMinTime = defaultKeepaliveMinTime
	}
}

// serverOptions returns the gRPC options that enforce the limits.
func (l *Limits) serverOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxConcurrentStreams(l.MaxConcurrentStreams),
		grpc.MaxRecvMsgSize(l.MaxRecvMsgSize),
		grpc.MaxHeaderListSize(uint32(min(l.MaxHeaderBytes, math.MaxUint32))),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: l.KeepaliveTime, Timeout: l.KeepaliveTimeout}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: l.KeepaliveMinTime, PermitWithoutStream: true}),
		grpc.StatsHandler(connTagger{}),
	}
}

// check reports a limit that contradicts another option.
func (l *Limits) check(docs twin.Limits) error {
	docs.EnsureDefaults()
	maxDocumentBytes := docs.MaxDocumentBytes
	if l.MaxRecvMsgSize < 2*maxDocumentBytes {
		return fmt.Errorf("--max-recv-msg-size %d is less than twice --max-document-bytes %d: a document within its limit could not be received; raise --max-recv-msg-size", l.MaxRecvMsgSize, maxDocumentBytes)
	}
	return nil
}

// errRateLimited: a device reported faster than Options.ReportRate allows.
var errRateLimited = fmt.Errorf("server: too many reports")

// connKey is the context key of a connection's connState.
type connKey struct{}

// connState is what the server counts per connection. Every call's
// context carries its connection's (see connTagger).
type connState struct {
	watchers atomic.Int64 // WatchTwins and WatchRuleEvents streams open
	hellos   atomic.Int64 // Connect streams waiting for their hello
}

// connTagger is a gRPC stats handler that gives each connection a
// connState, which the contexts of its calls inherit.
type connTagger struct{}

func (connTagger) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	if _, ok := ctx.Value(connKey{}).(*connState); ok {
		// A call over HTTP (grpc-go tags each such call as a
		// connection): the HTTP connection's state, which the HTTP
		// server put in the request's context (http.go).
		return ctx
	}
	return context.WithValue(ctx, connKey{}, &connState{})
}
func (connTagger) HandleConn(context.Context, stats.ConnStats)                     {}
func (connTagger) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (connTagger) HandleRPC(context.Context, stats.RPCStats)                       {}

// watchLimits bounds the watches (WatchTwins, WatchRuleEvents) open per
// connection and in all. It is safe for concurrent use.
type watchLimits struct {
	perConn, all int64
	open         atomic.Int64 // watches open in all
}

// isWatch reports whether a method is one of the watches watchLimits counts.
func isWatch(method string) bool {
	return method == twinv1.TwinService_WatchTwins_FullMethodName || method == twinv1.RuleService_WatchRuleEvents_FullMethodName
}

// stream is a stream interceptor that refuses a watch beyond the limits
// with RESOURCE_EXHAUSTED, naming the flag to raise.
func (l *watchLimits) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !isWatch(info.FullMethod) {
		return handler(srv, ss)
	}
	if c, ok := ss.Context().Value(connKey{}).(*connState); ok {
		if n := c.watchers.Add(1); n > l.perConn {
			c.watchers.Add(-1)
			return status.Errorf(codes.ResourceExhausted,
				"this connection has %d watches open (WatchTwins and WatchRuleEvents), the most twind allows on one connection; close one, use another connection, or raise twind's --max-watchers-per-conn", l.perConn)
		}
		defer c.watchers.Add(-1)
	}
	if n := l.open.Add(1); n > l.all {
		l.open.Add(-1)
		return status.Errorf(codes.ResourceExhausted,
			"twind has %d watches open (WatchTwins and WatchRuleEvents), the most it allows in all; close one, or raise twind's --max-watchers", l.all)
	}
	defer l.open.Add(-1)
	return handler(srv, ss)
}

// reportLimits is a token bucket per device for its reports, on streams
// and through ReportState alike. A device's bucket is forgotten once it is
// full again (the device has been quiet long enough to report a whole
// burst), so the map holds only the devices reporting lately. It is safe
// for concurrent use.
type reportLimits struct {
	limit rate.Limit // rate.Inf: no limit
	burst int

	mu      sync.Mutex
	buckets map[string]*rate.Limiter // protected by mu
	sweepAt int                      // protected by mu: len(buckets) that triggers the next sweep
}

func newReportLimits(perSecond float64, burst int) *reportLimits {
	l := rate.Limit(perSecond)
	if math.IsInf(perSecond, 1) {
		l = rate.Inf
	}
	return &reportLimits{limit: l, burst: burst, buckets: map[string]*rate.Limiter{}, sweepAt: 1024}
}

// allow takes a token from the device's bucket and reports whether there
// was one.
func (l *reportLimits) allow(id string) bool {
	if l.limit == rate.Inf {
		return true
	}
	now := time.Now() // real time, whatever the server's clock: it bounds real load
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[id]
	if b == nil {
		if len(l.buckets) >= l.sweepAt {
			for k, v := range l.buckets {
				if v.TokensAt(now) >= float64(l.burst) {
					delete(l.buckets, k)
				}
			}
			l.sweepAt = max(1024, 2*len(l.buckets))
		}
		b = rate.NewLimiter(l.limit, l.burst)
		l.buckets[id] = b
	}
	return b.AllowN(now, 1)
}

// refusal is the error a report over the limit gets.
func (l *reportLimits) refusal(id string) error {
	return fmt.Errorf("%w: device %.130q reports more than %g times a second (bursts of %d), the most twind allows; report less often, or raise twind's --report-rate",
		errRateLimited, id, float64(l.limit), l.burst)
}

// helloGate bounds the device streams waiting for their hello, in all and
// per connection. It is safe for concurrent use.
type helloGate struct {
	max, perConn int64
	waiting      atomic.Int64
}

// enter takes a place for a stream that waits for its hello; the caller
// must call the returned leave once the hello came (or did not). It fails
// with RESOURCE_EXHAUSTED when every place is taken, or every place of the
// stream's connection.
func (g *helloGate) enter(ctx context.Context) (leave func(), err error) {
	c, _ := ctx.Value(connKey{}).(*connState)
	if c != nil {
		if n := c.hellos.Add(1); n > g.perConn {
			c.hellos.Add(-1)
			return nil, status.Errorf(codes.ResourceExhausted,
				"this connection has %d device streams waiting for their hello, the most twind allows on one connection; send each hello as soon as its stream opens, or raise twind's --max-hello-waiting-per-conn", g.perConn)
		}
	}
	if n := g.waiting.Add(1); n > g.max {
		g.waiting.Add(-1)
		if c != nil {
			c.hellos.Add(-1)
		}
		return nil, status.Errorf(codes.ResourceExhausted,
			"%d device streams are waiting for their hello, the most twind allows; send the hello as soon as the stream opens and retry later, or raise twind's --max-hello-waiting", g.max)
	}
	return func() {
		g.waiting.Add(-1)
		if c != nil {
			c.hellos.Add(-1)
		}
	}, nil
}
