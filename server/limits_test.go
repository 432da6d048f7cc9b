package server

import (
	"context"
	"io"
	"log/slog"
	"math"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// benchLimits are the limits of the benchmarks' servers: no report rate,
// which would measure refusals instead of reports.
var benchLimits = Limits{ReportRate: math.Inf(1)}

// startTCP starts a server on loopback TCP, for tests of what bufconn does
// not have: the listener and the connections' keepalive.
func startTCP(t *testing.T, mod func(*Options)) (*Server, string) {
	t.Helper()
	opts := Options{DataDir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if mod != nil {
		mod(&opts)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	t.Cleanup(func() {
		if err := s.Shutdown(); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, l.Addr().String()
}

// dialTCP is a plaintext client connection to addr, closed when the test ends.
func dialTCP(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestLimitDefaults(t *testing.T) {
	var o Options
	o.EnsureDefaults()
	want := Limits{
		MaxConcurrentStreams: 2048, MaxConnections: 10_000, MaxHelloWaiting: 1000, MaxHelloWaitingPerConn: 16,
		MaxHeaderBytes: 16 << 10, MaxWatchersPerConn: 100, MaxWatchers: 1000, ReportRate: 100, ReportBurst: 200,
		MaxRecvMsgSize: 4 << 20, KeepaliveTime: 30 * time.Second, KeepaliveTimeout: 20 * time.Second,
		KeepaliveMinTime: 10 * time.Second,
	}
	if o.Limits != want {
		t.Errorf("default limits = %+v; want %+v", o.Limits, want)
	}
	if o.Limits.KeepaliveTime+o.Limits.KeepaliveTimeout > time.Minute {
		t.Errorf("a dead connection shows as disconnected after up to %v; want at most a minute", o.Limits.KeepaliveTime+o.Limits.KeepaliveTimeout)
	}
	if o.HelloTimeout != 10*time.Second {
		t.Errorf("default hello timeout = %v; want 10s", o.HelloTimeout)
	}
}

// TestMaxConcurrentStreams holds a connection's calls at the limit: a
// further call on it waits until one ends.
func TestMaxConcurrentStreams(t *testing.T) {
	s := startServer(t, nil, func(o *Options) { o.Limits.MaxConcurrentStreams = 2 })
	ctx := context.Background()
	// A first call, so that the client knows the server's settings.
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1"}}); err != nil {
		t.Fatal(err)
	}
	var cancels []context.CancelFunc
	for range 2 {
		wctx, cancel := context.WithCancel(ctx)
		cancels = append(cancels, cancel)
		w, err := s.twins.WatchTwins(wctx, &twinv1.WatchTwinsRequest{StartRevision: 1})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Recv(); err != nil { // the creation: the watch is being served
			t.Fatal(err)
		}
	}
	tctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, err := s.twins.GetTwin(tctx, &twinv1.GetTwinRequest{Id: "car-1"}); status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("a third call on a connection with 2 streams open, the most allowed = %v; want it to wait (DEADLINE_EXCEEDED)", err)
	}
	cancels[0]()
	tctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := s.twins.GetTwin(tctx, &twinv1.GetTwinRequest{Id: "car-1"}); err != nil {
		t.Errorf("a call once a stream ended: %v", err)
	}
	cancels[1]()
}

// TestMaxConnections holds the server at its connection limit: a further
// connection waits, unaccepted, until one closes.
func TestMaxConnections(t *testing.T) {
	_, addr := startTCP(t, func(o *Options) { o.Limits.MaxConnections = 2 })
	ctx := context.Background()
	var conns []*grpc.ClientConn
	for i := range 2 {
		conn := dialTCP(t, addr)
		conns = append(conns, conn)
		if _, err := twinv1.NewTwinServiceClient(conn).CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-" + string(rune('1'+i))}}); err != nil {
			t.Fatal(err)
		}
	}
	third := twinv1.NewTwinServiceClient(dialTCP(t, addr))
	tctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	if _, err := third.GetTwin(tctx, &twinv1.GetTwinRequest{Id: "car-1"}, grpc.WaitForReady(true)); status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("a call on a third connection, beyond the limit of 2 = %v; want it to wait (DEADLINE_EXCEEDED)", err)
	}
	conns[0].Close()
	tctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := third.GetTwin(tctx, &twinv1.GetTwinRequest{Id: "car-1"}, grpc.WaitForReady(true)); err != nil {
		t.Errorf("the third connection once another closed: %v", err)
	}
}

// TestMaxHelloWaiting refuses a Connect stream at once while the most
// streams allowed wait for their hello.
func TestMaxHelloWaiting(t *testing.T) {
	s := startServer(t, nil, func(o *Options) {
		o.Limits.MaxHelloWaiting = 2
		o.HelloTimeout = time.Minute
	})
	tok := createDevice(t, s, "fridge-1", "fridge")
	silent := []*device{connect(t, s, nil, true), connect(t, s, nil, true)}
	waitFor(t, func() bool { return s.devices.hellos.waiting.Load() == 2 })
	d := connect(t, s, nil, true)
	err := d.end()
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--max-hello-waiting") {
		t.Errorf("a stream beyond 2 waiting for their hello ended with %v; want RESOURCE_EXHAUSTED naming --max-hello-waiting", err)
	}
	// A stream that says hello leaves its place to another.
	silent[0].send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{DeviceId: "fridge-1", Token: tok}}})
	if silent[0].next().GetWelcome() == nil {
		t.Fatal("no welcome")
	}
	waitFor(t, func() bool { return s.devices.hellos.waiting.Load() == 1 })
	d = connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, true)
	if d.next().GetWelcome() == nil {
		t.Error("no welcome for a stream once a place was free")
	}
}

// TestMaxHelloWaitingPerConn: one connection cannot take every place of
// the streams waiting for their hello; another connection still gets one.
func TestMaxHelloWaitingPerConn(t *testing.T) {
	s := startServer(t, nil, func(o *Options) {
		o.Limits.MaxHelloWaitingPerConn = 2
		o.HelloTimeout = time.Minute
	})
	tok := createDevice(t, s, "fridge-1", "fridge")
	connect(t, s, nil, true)
	connect(t, s, nil, true)
	waitFor(t, func() bool { return s.devices.hellos.waiting.Load() == 2 })
	err := connect(t, s, nil, true).end()
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--max-hello-waiting-per-conn") {
		t.Errorf("a third stream waiting for its hello on one connection ended with %v; want RESOURCE_EXHAUSTED naming --max-hello-waiting-per-conn", err)
	}
	other, err := grpc.NewClient("passthrough:///bufnet", grpc.WithContextDialer(s.dialer), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	s2 := *s
	s2.conn = other
	if d := connect(t, &s2, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, true); d.next().GetWelcome() == nil {
		t.Error("no welcome for a stream on another connection")
	}
}

// TestMaxHeaderBytes: a call whose metadata is bigger than the limit is
// refused before any handler (or the API key check) reads it.
func TestMaxHeaderBytes(t *testing.T) {
	s := startServer(t, nil, func(o *Options) { o.Limits.MaxHeaderBytes = 4 << 10 })
	ctx := context.Background()
	if _, err := s.twins.ListTwins(metadata.AppendToOutgoingContext(ctx, "x-small", strings.Repeat("a", 1<<10)), &twinv1.ListTwinsRequest{}); err != nil {
		t.Fatalf("a call with 1 KiB of metadata: %v", err)
	}
	_, err := s.twins.ListTwins(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+strings.Repeat("a", 64<<10)), &twinv1.ListTwinsRequest{})
	if code := status.Code(err); code != codes.ResourceExhausted && code != codes.Internal && code != codes.Unavailable {
		t.Errorf("a call with 64 KiB of metadata = %v; want it refused", err)
	}
	if err == nil {
		t.Error("a call with 64 KiB of metadata succeeded")
	}
}

// TestWatcherLimits refuses watches beyond the limits per connection and
// in all, naming the flag to raise.
func TestWatcherLimits(t *testing.T) {
	s := startServer(t, nil, func(o *Options) {
		o.Limits.MaxWatchersPerConn = 2
		o.Limits.MaxWatchers = 3
	})
	ctx := context.Background()
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1"}}); err != nil {
		t.Fatal(err)
	}
	other, err := grpc.NewClient("passthrough:///bufnet", grpc.WithContextDialer(s.dialer), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	a, b := s.twins, twinv1.NewTwinServiceClient(other)
	// watch opens a watch and returns its first answer: its first event,
	// or why it was refused.
	watch := func(c twinv1.TwinServiceClient) (context.CancelFunc, error) {
		wctx, cancel := context.WithCancel(ctx)
		w, err := c.WatchTwins(wctx, &twinv1.WatchTwinsRequest{StartRevision: 1})
		if err == nil {
			_, err = w.Recv()
		}
		return cancel, err
	}
	var open []context.CancelFunc
	for _, c := range []twinv1.TwinServiceClient{a, a, b} {
		cancel, err := watch(c)
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, cancel)
	}
	defer func() {
		for _, c := range open {
			c()
		}
	}()
	if _, err := watch(a); status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--max-watchers-per-conn") {
		t.Errorf("a third watch on a connection = %v; want RESOURCE_EXHAUSTED naming --max-watchers-per-conn", err)
	}
	rules := twinv1.NewRuleServiceClient(other)
	// A watch that is let in waits for events: its Recv ends at the
	// deadline, which fails the check below.
	rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
	defer rcancel()
	rw, err := rules.WatchRuleEvents(rctx, &twinv1.WatchRuleEventsRequest{})
	if err == nil {
		_, err = rw.Recv()
	}
	if status.Code(err) != codes.ResourceExhausted || !strings.HasSuffix(status.Convert(err).Message(), "raise twind's --max-watchers") {
		t.Errorf("a fourth watch in all (WatchRuleEvents) = %v; want RESOURCE_EXHAUSTED naming --max-watchers", err)
	}
	// Once a watch ends, another may open.
	open[0]()
	waitFor(t, func() bool {
		cancel, err := watch(b)
		if err != nil {
			return false
		}
		open = append(open, cancel)
		return true
	})
}

// TestReportRate refuses a device's reports beyond its token bucket, with
// an error ack on its stream, which goes on, and with RESOURCE_EXHAUSTED
// from ReportState.
func TestReportRate(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, func(o *Options) {
		o.Limits.ReportRate = 2
		o.Limits.ReportBurst = 3
	})
	tok := createDevice(t, s, "fridge-1", "fridge")
	d := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, true)
	d.next() // welcome
	for seq := range int64(5) {
		d.report(seq+1, `{"temp_c": `+string(rune('1'+seq))+`}`)
	}
	for seq := range int64(5) {
		ack := d.next().GetReportAck()
		if seq < 3 {
			if ack.GetSeq() != seq+1 || ack.GetError() != "" || ack.GetVersion() == 0 {
				t.Errorf("ack of report %d, within the burst = %v; want it applied", seq+1, ack)
			}
			continue
		}
		if ack.GetSeq() != seq+1 || ack.GetVersion() != 0 || ack.GetErrorCode() != "RESOURCE_EXHAUSTED" ||
			!strings.Contains(ack.GetError(), "--report-rate") {
			t.Errorf("ack of report %d, beyond the burst = %v; want RESOURCE_EXHAUSTED naming --report-rate", seq+1, ack)
		}
	}
	tw, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"})
	if err != nil {
		t.Fatal(err)
	}
	if got := tw.Twin.Reported.AsMap()["temp_c"]; got != 3.0 {
		t.Errorf("reported temp_c = %v; want 3, the last report within the burst", got)
	}
	// The stream goes on: a report once the bucket refilled is applied.
	for seq := int64(6); ; seq++ {
		d.report(seq, `{"temp_c": 9}`)
		ack := d.next().GetReportAck()
		if ack.GetError() == "" {
			break
		}
		if seq > 200 {
			t.Fatalf("no report applied after the refusals; last ack %v", ack)
		}
		time.Sleep(20 * time.Millisecond) // pacing a device, as a device paces itself
	}

	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1"}}); err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		_, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "car-1", Patch: mustStruct(t, map[string]any{"n": i})})
		if i < 3 && err != nil {
			t.Errorf("ReportState %d, within the burst: %v", i, err)
		}
		if i == 3 && (status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--report-rate")) {
			t.Errorf("ReportState beyond the burst = %v; want RESOURCE_EXHAUSTED naming --report-rate", err)
		}
	}
}

func TestReportLimitsForget(t *testing.T) {
	l := newReportLimits(1e9, 1) // a bucket is full again a nanosecond after a report
	for i := range 5000 {
		l.allow(string(rune('a' + i%26)))
		l.allow(strings.Repeat("x", i%50+1) + string(rune(i)))
	}
	l.mu.Lock()
	n := len(l.buckets)
	l.mu.Unlock()
	if n > 4096 {
		t.Errorf("%d buckets kept after 10,000 reports of mostly quiet devices; want the full ones forgotten", n)
	}
}

// TestMaxRecvMsgSize refuses a message over the limit, while a document
// over its own limit gets that limit's clearer error.
func TestMaxRecvMsgSize(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, func(o *Options) { o.Limits.MaxRecvMsgSize = 256 << 10 })
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1"}}); err != nil {
		t.Fatal(err)
	}
	_, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "car-1", Patch: mustStruct(t, map[string]any{"blob": strings.Repeat("x", 300<<10)})})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a 300 KiB message to a server that takes 256 KiB = %v; want RESOURCE_EXHAUSTED", err)
	}
	_, err = s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "car-1", Patch: mustStruct(t, map[string]any{"blob": strings.Repeat("x", 100<<10)})})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "65536") {
		t.Errorf("a 100 KiB document (the limit is 64 KiB) = %v; want INVALID_ARGUMENT naming the document limit", err)
	}
	_, err = New(Options{DataDir: t.TempDir(), Limits: Limits{MaxRecvMsgSize: 100 << 10}})
	if err == nil || !strings.Contains(err.Error(), "--max-recv-msg-size") {
		t.Errorf("New with messages smaller than twice the document limit = %v; want an error naming --max-recv-msg-size", err)
	}
}

// blackhole is a TCP proxy that can stop forwarding bytes without closing
// anything, as a connection that silently died.
type blackhole struct {
	l    net.Listener
	to   string
	mu   sync.Mutex
	dead bool // protected by mu
	wg   sync.WaitGroup
	done chan struct{}
	// conns are the proxy's connections, closed at the end.
	conns []net.Conn // protected by mu
}

func newBlackhole(t *testing.T, to string) *blackhole {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &blackhole{l: l, to: to, done: make(chan struct{})}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", to)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			p.wg.Add(2)
			go p.pipe(c, u)
			go p.pipe(u, c)
		}
	}()
	t.Cleanup(func() {
		l.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

// pipe copies from src to dst until src fails; once the proxy is dead, it
// reads and drops everything.
func (p *blackhole) pipe(src, dst net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		p.mu.Lock()
		dead := p.dead
		p.mu.Unlock()
		if !dead {
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
	}
}

func (p *blackhole) kill() {
	p.mu.Lock()
	p.dead = true
	p.mu.Unlock()
}

// TestKeepaliveDeadConnection connects a device through a proxy that then
// drops every byte without closing the connection, and checks that the
// server's pings find it dead: the twin shows as disconnected within the
// keepalive time and timeout.
func TestKeepaliveDeadConnection(t *testing.T) {
	const keepTime, keepTimeout = time.Second, time.Second
	s, addr := startTCP(t, func(o *Options) {
		o.Limits.KeepaliveTime, o.Limits.KeepaliveTimeout = keepTime, keepTimeout
	})
	ctx := context.Background()
	direct := twinv1.NewTwinServiceClient(dialTCP(t, addr))
	if _, err := direct.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1", Type: "car"}}); err != nil {
		t.Fatal(err)
	}
	tok, err := direct.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: "car-1"})
	if err != nil {
		t.Fatal(err)
	}
	proxy := newBlackhole(t, addr)
	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := twinv1.NewDeviceServiceClient(dialTCP(t, proxy.l.Addr().String())).Connect(dctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{DeviceId: "car-1", Token: tok.Token}}}); err != nil {
		t.Fatal(err)
	}
	m, err := stream.Recv()
	if err != nil || m.GetWelcome() == nil {
		t.Fatalf("welcome = %v, %v", m, err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
	defer wcancel()
	w, err := direct.WatchTwins(wctx, &twinv1.WatchTwinsRequest{StartRevision: s.Engine().Revision() + 1})
	if err != nil {
		t.Fatal(err)
	}
	proxy.kill()
	died := time.Now()
	ev, err := w.Recv()
	if err != nil {
		t.Fatalf("no presence change within 20s of the connection's death: %v", err)
	}
	took := time.Since(died)
	if ev.Event.GetTwin().GetPresence().GetConnected() {
		t.Fatalf("event after the connection died = %v; want the device disconnected", ev.Event)
	}
	// Up to a keepalive time without reads, then the timeout; the rest is
	// slack for a loaded machine.
	if limit := keepTime + keepTimeout + 3*time.Second; took > limit {
		t.Errorf("the dead device showed as disconnected after %v; want within %v", took, limit)
	}
}

// TestKeepaliveEnforcement lets a client ping as often as the policy
// allows, with no call in progress, and disconnects one that pings more
// often. The connection makes no call at all: serve hands a connection
// that pings before its first request to grpc-go (matchGRPC).
func TestKeepaliveEnforcement(t *testing.T) {
	const minTime = 200 * time.Millisecond
	_, addr := startTCP(t, func(o *Options) { o.Limits.KeepaliveMinTime = minTime })
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	// next returns the next ping ack or GOAWAY.
	next := func() http2.Frame {
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				t.Fatalf("the connection ended: %v", err)
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					fr.WriteSettingsAck()
				}
			case *http2.PingFrame:
				if f.IsAck() {
					return f
				}
			case *http2.GoAwayFrame:
				return f
			}
		}
	}
	for i := range 5 {
		if i > 0 {
			time.Sleep(minTime + 100*time.Millisecond) // a client pinging at the pace allowed
		}
		if err := fr.WritePing(false, [8]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		if f, ok := next().(*http2.GoAwayFrame); ok {
			t.Fatalf("ping %d, %v after the one before: GOAWAY %v %q; want it allowed", i, minTime+100*time.Millisecond, f.ErrCode, f.DebugData())
		}
	}
	for i := range 5 {
		if err := fr.WritePing(false, [8]byte{byte(10 + i)}); err != nil {
			break // the server may have closed already
		}
	}
	for {
		if ga, ok := next().(*http2.GoAwayFrame); ok {
			if ga.ErrCode != http2.ErrCodeEnhanceYourCalm || string(ga.DebugData()) != "too_many_pings" {
				t.Errorf("GOAWAY %v %q; want ENHANCE_YOUR_CALM too_many_pings", ga.ErrCode, ga.DebugData())
			}
			return
		}
	}
}
