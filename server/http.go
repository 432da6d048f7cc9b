package server

import (
	"bytes"
	connectrpc "connectrpc.com/connect"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/vanguard"
	"connectrpc.com/vanguard/vanguardgrpc"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/soheilhy/cmux"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/twind-io/twind/server/console"
)

// One port serves every protocol. Each connection is routed by what it
// says first (github.com/soheilhy/cmux):
//
//   - HTTP/2 whose first request has content-type application/grpc: a
//     native gRPC client, served by grpc-go's own transport
//     (grpc.Server.Serve), so its keepalive, stream limits and flow control
//     hold unchanged;
//   - everything else (HTTP/1.1, and HTTP/2 without TLS, "h2c"): an
//     http.Server whose handler transcodes the Connect protocol (JSON or
//     binary), gRPC-Web, and gRPC with another content type (such as
//     application/grpc+json) onto the same grpc.Server's handlers
//     (connectrpc.com/vanguard, through grpc.Server.ServeHTTP), so there is
//     one implementation, and the same interceptors (auth, metrics, logs)
//     run for every call; other paths serve the web console.
//
// With TLS, the listener terminates TLS first and the sniffing reads the
// plaintext; ALPN offers h2 and http/1.1.

const (
	// sniffTimeout bounds how long a new connection may take to show what
	// it speaks. A gRPC client says nothing but its preface until it makes
	// its first call, so this is generous; a connection that says no more
	// within it goes to the http.Server, whose own timeouts apply.
	sniffTimeout = 2 * time.Minute
)

// netConnKey is the context key of an HTTP request's connection.
type netConnKey struct{}

// withConnTLS gives a request over TLS its connection's TLS state: TLS is
// terminated under the routing (serve), so net/http sees a plain
// connection and leaves r.TLS nil, and grpc-go, which the transcoder calls,
// learns the peer's certificate from r.TLS (device certificates,
// revocation).
func withConnTLS(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, ok := r.Context().Value(netConnKey{}).(net.Conn); ok && r.TLS == nil {
			if tc := tlsConnOf(c); tc != nil {
				st := tc.ConnectionState()
				r.TLS = &st
			}
		}
		h.ServeHTTP(w, r)
	})
}

// httpBuffer bounds one message of a Connect or gRPC-Web call as the
// transcoder buffers it: twice the gRPC limit (--max-recv-msg-size), since
// JSON is bigger than the protobuf encoding it becomes, on which the gRPC
// server's limit then applies.
func httpBuffer(maxRecvMsgSize int) uint32 {
	return uint32(min(2*int64(maxRecvMsgSize), math.MaxUint32))
}

// strictCodec makes a request that does not decode an INVALID_ARGUMENT
// that says so, not the transcoder's INTERNAL or UNKNOWN. Embedding keeps
// the codec's other methods (stable and REST encodings).
type strictCodec struct{ vanguard.Codec }

func (c strictCodec) Unmarshal(data []byte, msg proto.Message) error {
	if err := c.Codec.Unmarshal(data, msg); err != nil {
		return connectrpc.NewError(connectrpc.CodeInvalidArgument, fmt.Errorf(
			"the request does not decode as %s (%s): %w", msg.ProtoReflect().Descriptor().FullName(), c.Name(), err))
	}
	return nil
}

// httpGate answers, before the transcoder reads a body, what needs no
// body: a call of the operator API without a valid API key (so that a
// stranger's large bodies cost nothing), and, on a server without keys
// open to this machine only, a request whose Host names another (a web
// page that rebinds its name to 127.0.0.1 cannot call the API).
func (s *Server) httpGate(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A small compressed body can inflate to far more than the
		// limits allow before anything checks its size: refused.
		for _, h := range []string{"Content-Encoding", "Connect-Content-Encoding", "Grpc-Encoding"} {
			if v := r.Header.Get(h); v != "" && !strings.EqualFold(v, "identity") {
				http.Error(w, fmt.Sprintf("twind takes requests uncompressed; send the body without %s: %s", h, v), http.StatusUnsupportedMediaType)
				return
			}
		}
		set := s.keys.current()
		if set.empty() {
			if !s.opts.AllowOpenAPI && !loopbackHost(hostPort(r.Host)) {
				http.Error(w, fmt.Sprintf("twind serves its open API to this machine only, and the request names host %q: "+
					"call it as localhost, or configure API keys", r.Host), http.StatusForbidden)
				return
			}
			h.ServeHTTP(w, r)
			return
		}
		method, ok := rpcMethod(r.URL.Path)
		if !ok || openMethod(method) || method == twinv1.TwinService_ReportState_FullMethodName {
			// The console's files, open services, and ReportState, which
			// a device may call with its token or certificate.
			h.ServeHTTP(w, r)
			return
		}
		if tok, ok := bearer(metadata.MD{"authorization": r.Header.Values("Authorization")}); ok && set.lookup(tok) != nil {
			h.ServeHTTP(w, r)
			return
		}
		refuseUnauthenticated(w, r, "this server requires an API key: send the header 'Authorization: Bearer <key>'")
	})
}

// refuseUnauthenticated answers a call with UNAUTHENTICATED in its
// protocol's form: the end of a Connect stream, a gRPC-Web trailers-only
// answer, or a Connect unary error (HTTP 401).
func refuseUnauthenticated(w http.ResponseWriter, r *http.Request, msg string) {
	ct := r.Header.Get("Content-Type")
	body, _ := json.Marshal(map[string]string{"code": "unauthenticated", "message": msg})
	switch {
	case strings.HasPrefix(ct, "application/connect+"):
		w.Header().Set("Content-Type", ct)
		w.WriteHeader(http.StatusOK)
		end, _ := json.Marshal(map[string]json.RawMessage{"error": body})
		frame := binary.BigEndian.AppendUint32([]byte{2}, uint32(len(end))) // flag 2: the end of the stream
		w.Write(append(frame, end...))
	case strings.HasPrefix(ct, "application/grpc-web"):
		w.Header().Set("Content-Type", ct)
		w.Header().Set("Grpc-Status", strconv.Itoa(int(codes.Unauthenticated)))
		w.Header().Set("Grpc-Message", url.PathEscape(msg))
		w.WriteHeader(http.StatusOK)
	default:
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		w.Write(body)
	}
}

// rpcMethod returns the gRPC method a request's path names, if it names
// one: /<package>.<Service>/<Method>.
func rpcMethod(path string) (string, bool) {
	svc, m, ok := strings.Cut(strings.TrimPrefix(path, "/"), "/")
	if !ok || m == "" || strings.Contains(m, "/") || !strings.Contains(svc, ".") {
		return "", false
	}
	return path, true
}

// hostPort returns a Host header as host:port, for loopbackHost.
func hostPort(host string) string {
	if _, _, err := net.SplitHostPort(host); err == nil {
		return host
	}
	return net.JoinHostPort(strings.Trim(host, "[]"), "0")
}

// web is the HTTP side of a server: the handler and the serving state that
// Shutdown stops.
type web struct {
	handler   http.Handler
	tlsConfig *tls.Config // nil: plaintext
	conns     *prometheus.CounterVec

	mu      sync.Mutex
	stopped bool          // protected by mu; set when shutdown begins
	serving []*webServing // protected by mu
}

// webServing is one Serve call's HTTP state.
type webServing struct {
	root  net.Listener
	conns *sniffTracker
	http  *http.Server
}

// newWeb builds the HTTP handler over the registered gRPC services. Call it
// after every service is registered.
func (s *Server) newWeb() error {
	jsonCodec := func(res vanguard.TypeResolver) vanguard.Codec {
		// Proto field names (snake_case), as the API and its docs spell
		// them, and no zero values: what grpcurl users read too. An
		// unknown field is an error, as it is for grpcurl: a misspelt
		// expected_version must not write unguarded.
		return strictCodec{&vanguard.JSONCodec{
			MarshalOptions:   protojson.MarshalOptions{Resolver: res, UseProtoNames: true},
			UnmarshalOptions: protojson.UnmarshalOptions{Resolver: res},
		}}
	}
	protoCodec := func(res vanguard.TypeResolver) vanguard.Codec { return strictCodec{vanguard.NewProtoCodec(res)} }
	var services []string
	for name := range s.grpc.GetServiceInfo() {
		services = append(services, name)
	}
	consoleHandler := console.Handler(console.Config{
		Services:        services,
		AuthRequiredNow: func() bool { return !s.keys.current().empty() },
	})
	t, err := vanguardgrpc.NewTranscoder(s.grpc,
		vanguard.WithCodec(jsonCodec),
		vanguard.WithCodec(protoCodec),
		vanguard.WithUnknownHandler(consoleHandler),
		// This replaces vanguardgrpc's defaults, so it repeats them: calls
		// reach the gRPC server as gRPC with protobuf.
		vanguard.WithDefaultServiceOptions(
			vanguard.WithTargetProtocols(vanguard.ProtocolGRPC),
			vanguard.WithTargetCodecs(vanguard.CodecProto),
			vanguard.WithMaxMessageBufferBytes(httpBuffer(s.opts.Limits.MaxRecvMsgSize))),
	)
	if err != nil {
		return fmt.Errorf("HTTP transcoder: %w", err)
	}
	s.web.handler = s.httpGate(connectByDefault(t))
	s.web.conns = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "twind_connections_total",
		Help: "Connections accepted, by what they speak: grpc (served by grpc-go's own transport) or http (Connect, gRPC-Web, the console).",
	}, []string{"protocol"})
	if err := s.opts.Metrics.Register(s.web.conns); err != nil {
		return fmt.Errorf("register metrics: %w", err)
	}
	return nil
}

// connectByDefault marks a plain JSON (or binary protobuf) POST as the
// Connect protocol's unary call, which it is, so that curl needs no
// Connect-Protocol-Version header: with no REST mappings, vanguard would
// otherwise take it for REST and find no route.
func connectByDefault(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.Header.Get("Connect-Protocol-Version") == "" {
			ct, _, _ := strings.Cut(r.Header.Get("Content-Type"), ";")
			if ct = strings.TrimSpace(ct); ct == "application/json" || ct == "application/proto" {
				r.Header.Set("Connect-Protocol-Version", "1")
			}
		}
		if ct := r.Header.Get("Content-Type"); strings.HasPrefix(ct, "application/connect+") || strings.HasPrefix(ct, "application/grpc-web") {
			w = headerFlusher{w}
		}
		h.ServeHTTP(w, r)
	})
}

// headerFlusher sends a stream's response headers as soon as they are
// written. The transcoder writes them when the gRPC handler sends its
// headers (as WatchTwins does once its watch is in place) but does not
// flush them until the first message, and a browser's fetch resolves only
// on them.
type headerFlusher struct{ http.ResponseWriter }

func (f headerFlusher) WriteHeader(code int) {
	f.ResponseWriter.WriteHeader(code)
	f.Flush()
}

func (f headerFlusher) Flush() { http.NewResponseController(f.ResponseWriter).Flush() }

func (f headerFlusher) Unwrap() http.ResponseWriter { return f.ResponseWriter }

// serve serves every protocol on l until Shutdown.
func (s *Server) serve(l net.Listener) error {
	if s.web.tlsConfig != nil {
		l = tls.NewListener(l, s.web.tlsConfig)
	}
	conns := &sniffTracker{Listener: l, sniffing: map[net.Conn]struct{}{}}
	m := cmux.New(conns)
	m.SetReadTimeout(sniffTimeout)
	// grpc-go clients wait for the server's SETTINGS before they send a
	// request, so the matcher sends them (cmux's SendSettings matchers).
	grpcL := handoff{m.MatchWithWriters(matchGRPC),
		conns, false, s.web.conns.WithLabelValues("grpc")}
	httpL := handoff{m.Match(cmux.Any()), conns, true, s.web.conns.WithLabelValues("http")}
	hs := &http.Server{
		Handler: withConnTLS(s.web.handler),
		// Each HTTP connection has its own connState, as a gRPC one has,
		// so that per-connection limits count its calls together; and
		// its TLS state, for withConnTLS.
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(context.WithValue(ctx, connKey{}, &connState{}), netConnKey{}, c)
		},
		ReadHeaderTimeout: 10 * time.Second,
		MaxHeaderBytes:    s.opts.Limits.MaxHeaderBytes,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.opts.Logger.Handler(), slog.LevelDebug),
		Protocols:         new(http.Protocols),
	}
	hs.Protocols.SetHTTP1(true)
	hs.Protocols.SetUnencryptedHTTP2(true) // h2c with prior knowledge; over TLS too, terminated below
	ws := &webServing{root: l, conns: conns, http: hs}
	s.web.mu.Lock()
	if s.web.stopped {
		s.web.mu.Unlock()
		return nil
	}
	s.web.serving = append(s.web.serving, ws)
	s.web.mu.Unlock()

	var wg sync.WaitGroup
	errs := make([]error, 3)
	wg.Go(func() { errs[0] = m.Serve() })
	wg.Go(func() { errs[1] = s.grpc.Serve(grpcL) })
	wg.Go(func() { errs[2] = hs.Serve(httpL) })
	wg.Wait()
	if s.stopCtx.Err() != nil {
		return nil // shutdown closed the listeners: every error above is its doing
	}
	// Serving failed on its own (the listener broke): stop the rest too.
	return errors.Join(errs...)
}

// matchGRPC routes to grpc-go's own transport an HTTP/2 connection whose
// first request is gRPC ("application/grpc", or "application/grpc+<codec>":
// not gRPC-Web), as cmux's HTTP2MatchHeaderFieldSendSettings does, and one
// that pings before its first request: a gRPC client keeps an idle
// connection alive with pings (keepalive), which grpc-go answers and
// polices (--keepalive-min-time), while HTTP clients and browsers make a
// request first. Like cmux's matcher it sends the server's SETTINGS, which
// grpc-go clients wait for before their first request.
func matchGRPC(w io.Writer, r io.Reader) bool {
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(r, preface[:]); err != nil || string(preface[:]) != http2.ClientPreface {
		return false
	}
	fr := http2.NewFramer(w, r)
	matched, done := false, false
	hdec := hpack.NewDecoder(4<<10, func(hf hpack.HeaderField) {
		if hf.Name == "content-type" {
			matched = hf.Value == "application/grpc" || strings.HasPrefix(hf.Value, "application/grpc+")
		}
	})
	for !done {
		f, err := fr.ReadFrame()
		if err != nil {
			return false
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() && fr.WriteSettings() != nil {
				return false
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				return true
			}
		case *http2.HeadersFrame:
			if _, err := hdec.Write(f.HeaderBlockFragment()); err != nil {
				return false
			}
			done = f.HeadersEnded()
		case *http2.ContinuationFrame:
			if _, err := hdec.Write(f.HeaderBlockFragment()); err != nil {
				return false
			}
			done = f.HeadersEnded()
		}
	}
	return matched
}

// stopWeb stops accepting connections, closes those not yet routed, and
// waits for the HTTP calls in flight. The streams among them end as
// twind's streams do at shutdown (stopCtx). It runs before the gRPC
// server's GracefulStop, which would cancel HTTP calls rather than wait.
// When ctx ends first, it closes the HTTP connections instead.
func (s *Server) stopWeb(ctx context.Context) {
	s.web.mu.Lock()
	s.web.stopped = true
	serving := s.web.serving
	s.web.mu.Unlock()
	var wg sync.WaitGroup
	for _, ws := range serving {
		ws.root.Close()
		ws.conns.closeSniffing()
		wg.Go(func() {
			if ws.http.Shutdown(ctx) != nil {
				ws.http.Close()
			}
		})
	}
	wg.Wait()
}

// sniffTracker is the listener under cmux. It remembers the connections
// that cmux is still reading to route, so that shutdown can close them:
// cmux's Serve waits for every such read to end (soheilhy/cmux#76), and a
// gRPC client that connected but has made no call yet sends nothing.
type sniffTracker struct {
	net.Listener
	mu       sync.Mutex
	sniffing map[net.Conn]struct{} // protected by mu
	closed   bool                  // protected by mu
}

func (t *sniffTracker) Accept() (net.Conn, error) {
	var backoff time.Duration
	for {
		c, err := t.Listener.Accept()
		var ne net.Error
		if err != nil && errors.As(err, &ne) && ne.Temporary() { //nolint:staticcheck // as net/http does
			// Out of file descriptors, say: cmux retries at once, so
			// back off here, as net/http and grpc-go do.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			time.Sleep(backoff)
			continue
		}
		if err != nil {
			return nil, err
		}
		return t.track(c)
	}
}

func (t *sniffTracker) track(c net.Conn) (net.Conn, error) {
	tc := &trackedConn{Conn: c, t: t}
	tc.routing.Store(true)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		c.Close()
		return nil, net.ErrClosed
	}
	t.sniffing[tc] = struct{}{}
	return tc, nil
}

// routed forgets c: it is its server's now.
func (t *sniffTracker) routed(c net.Conn) {
	t.mu.Lock()
	delete(t.sniffing, c)
	t.mu.Unlock()
}

func (t *sniffTracker) closeSniffing() {
	t.mu.Lock()
	t.closed = true
	conns := t.sniffing
	t.sniffing = nil
	t.mu.Unlock()
	for c := range conns {
		c.Close()
	}
}

// trackedConn leaves its tracker when it closes.
type trackedConn struct {
	net.Conn
	t *sniffTracker
	// read counts the bytes read while the connection is routed: cmux
	// keeps them all, so a client that sends much before its first
	// request is cut off (maxSniffBytes).
	read    int
	routing atomic.Bool // false once routed
}

// maxSniffBytes bounds what a connection may send before its first
// request: a client's preface and settings take a few hundred bytes.
const maxSniffBytes = 64 << 10

var errSniffTooLong = errors.New("the connection sent too much before its first request")

func (c *trackedConn) Read(b []byte) (int, error) {
	if !c.routing.Load() {
		return c.Conn.Read(b)
	}
	n, err := c.Conn.Read(b)
	if c.read += n; c.read > maxSniffBytes {
		return n, errSniffTooLong
	}
	return n, err
}

func (c *trackedConn) Close() error {
	c.t.routed(c)
	return c.Conn.Close()
}

// handoff is a cmux listener whose connections leave the tracker as they
// are accepted. For the HTTP server it also hides, on HTTP/2 connections,
// the client's acknowledgements of the SETTINGS that cmux's matcher sent.
type handoff struct {
	net.Listener
	t        *sniffTracker
	http     bool
	accepted prometheus.Counter
}

func (h handoff) Accept() (net.Conn, error) {
	c, err := h.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if mc, ok := c.(*cmux.MuxConn); ok {
		h.t.routed(mc.Conn)
		if tc, ok := mc.Conn.(*trackedConn); ok {
			tc.routing.Store(false)
		}
	}
	h.accepted.Inc()
	if h.http {
		c = &settingsAckFilter{Conn: c}
	}
	return c, nil
}

// settingsAckFilter hides from Go's HTTP/2 server the SETTINGS
// acknowledgements that answer the SETTINGS frames cmux's gRPC matcher
// wrote while it read the connection's first request (one for each
// SETTINGS frame of the client before its first HEADERS). Go's server
// ends a connection that acknowledges more SETTINGS than it sent
// (PROTOCOL_ERROR), which would break every h2c call that is not native
// gRPC. Anything that is not HTTP/2 passes through untouched.
type settingsAckFilter struct {
	net.Conn
	started     bool   // the preface check is done
	passthrough bool   // nothing more to filter
	beforeFirst bool   // no HEADERS frame seen yet
	owed        int    // acknowledgements still to hide
	pending     []byte // bytes read but not yet returned
	remaining   int    // payload bytes of the current frame still to pass
	discard     bool   // the current frame's payload is dropped
}

const (
	h2FrameHeaders  = 0x1
	h2FrameSettings = 0x4
	h2FlagAck       = 0x1
)

var h2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

func (f *settingsAckFilter) Read(p []byte) (int, error) {
	for {
		if len(f.pending) > 0 {
			n := copy(p, f.pending)
			f.pending = f.pending[n:]
			return n, nil
		}
		if f.passthrough {
			return f.Conn.Read(p)
		}
		if !f.started {
			// Read the preface a piece at a time: an HTTP/1 request may be
			// shorter than it.
			var head []byte
			for len(head) < len(h2Preface) {
				buf := make([]byte, len(h2Preface)-len(head))
				n, err := f.Conn.Read(buf)
				head = append(head, buf[:n]...)
				if !bytes.HasPrefix(h2Preface, head) {
					f.passthrough = true
					break
				}
				if err != nil {
					f.pending = head
					f.passthrough = true
					if len(head) == 0 {
						return 0, err
					}
					break
				}
			}
			f.started, f.beforeFirst = true, true
			f.pending = head
			continue
		}
		if f.remaining > 0 {
			n := min(len(p), f.remaining)
			if f.discard {
				n = min(n, 512)
				var junk [512]byte
				m, err := f.Conn.Read(junk[:n])
				f.remaining -= m
				if err != nil {
					return 0, err
				}
				continue
			}
			m, err := f.Conn.Read(p[:n])
			f.remaining -= m
			return m, err
		}
		if !f.beforeFirst && f.owed == 0 {
			f.passthrough = true
			continue
		}
		var h [9]byte
		if n, err := io.ReadFull(f.Conn, h[:]); err != nil {
			if n > 0 {
				f.pending = h[:n]
				f.passthrough = true
				continue
			}
			return 0, err
		}
		length := int(binary.BigEndian.Uint32(append([]byte{0}, h[:3]...)))
		typ, flags := h[3], h[4]
		f.remaining, f.discard = length, false
		switch {
		case typ == h2FrameSettings && flags&h2FlagAck != 0 && f.owed > 0:
			f.owed--
			f.discard = true
			continue
		case typ == h2FrameSettings && flags&h2FlagAck == 0 && f.beforeFirst:
			f.owed++
		case typ == h2FrameHeaders:
			f.beforeFirst = false
		}
		f.pending = h[:]
	}
}
