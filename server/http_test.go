package server

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// httpServer is a real server on loopback TCP, for HTTP clients and native
// gRPC alike.
type httpServer struct {
	*Server
	url  string // http://127.0.0.1:port
	addr string
}

func startHTTPServer(t *testing.T, mod func(*Options)) *httpServer {
	t.Helper()
	s, addr := startTCP(t, mod)
	return &httpServer{Server: s, addr: addr, url: "http://" + addr}
}

// grpcConn dials the server with a native gRPC client.
func (hs *httpServer) grpcConn(t *testing.T, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	if len(opts) == 0 {
		opts = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	conn, err := grpc.NewClient(hs.addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// postJSON makes a Connect unary call with a JSON body, as curl does, and
// returns the HTTP status and the decoded answer.
func postJSON(t *testing.T, c *http.Client, url, method, body string, header ...string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest("POST", url+method, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", method, err)
	}
	defer resp.Body.Close()
	var out map[string]any
	data, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(data, &out); err != nil {
		t.Fatalf("POST %s: %d %q is not JSON: %v", method, resp.StatusCode, data, err)
	}
	return resp.StatusCode, out
}

// envelope frames a Connect or gRPC-Web stream message.
func envelope(flags byte, msg []byte) []byte {
	b := make([]byte, 5, 5+len(msg))
	b[0] = flags
	binary.BigEndian.PutUint32(b[1:], uint32(len(msg)))
	return append(b, msg...)
}

// readEnvelope reads one framed message of a stream.
func readEnvelope(r *bufio.Reader) (flags byte, msg []byte, err error) {
	var h [5]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, err
	}
	msg = make([]byte, binary.BigEndian.Uint32(h[1:]))
	_, err = io.ReadFull(r, msg)
	return h[0], msg, err
}

// connectStream opens a Connect server stream with a JSON request.
func connectStream(t *testing.T, ctx context.Context, url, method, body string, header ...string) *bufio.Reader {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, "POST", url+method, bytes.NewReader(envelope(0, []byte(body))))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/connect+json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("stream %s: %v", method, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != 200 {
		t.Fatalf("stream %s: HTTP %d", method, resp.StatusCode)
	}
	return bufio.NewReader(resp.Body)
}

// TestHTTPJSON: the services answer JSON over HTTP/1.1 on the gRPC port,
// with Connect's error codes, as the README's curl examples use them.
func TestHTTPJSON(t *testing.T) {
	s := startHTTPServer(t, nil)
	c := http.DefaultClient
	code, out := postJSON(t, c, s.url, "/twin.v1.TwinService/CreateTwin", `{"twin": {"id": "fridge-1", "type": "fridge"}}`)
	if code != 200 {
		t.Fatalf("CreateTwin = %d %v", code, out)
	}
	code, out = postJSON(t, c, s.url, "/twin.v1.TwinService/ReportState", `{"id": "fridge-1", "patch": {"temp_c": 9.5}}`)
	if tw := out["twin"].(map[string]any); code != 200 || tw["version"] != "2" || tw["reported"].(map[string]any)["temp_c"] != 9.5 {
		t.Errorf("ReportState = %d %v; want version 2 with temp_c 9.5", code, out)
	}
	// What curl sends: no Connect-Protocol-Version header, and a charset.
	code, out = postJSON(t, c, s.url, "/twin.v1.TwinService/GetTwin", `{"id": "fridge-1"}`, "Content-Type", "application/json; charset=utf-8")
	if code != 200 || out["twin"].(map[string]any)["id"] != "fridge-1" {
		t.Errorf("GetTwin = %d %v", code, out)
	}
	code, out = postJSON(t, c, s.url, "/twin.v1.TwinService/GetTwin", `{"id": "nope"}`)
	if code != 404 || out["code"] != "not_found" || !strings.Contains(out["message"].(string), `"nope"`) {
		t.Errorf("GetTwin of a missing twin = %d %v; want 404 not_found naming it", code, out)
	}
	code, out = postJSON(t, c, s.url, "/twin.v1.TwinService/ListTwins", `{"filter": "twin.type == "}`)
	if code != 400 || out["code"] != "invalid_argument" || !strings.Contains(out["message"].(string), ":1:14:") {
		t.Errorf("ListTwins with bad CEL = %d %v; want 400 invalid_argument with the error's line and column", code, out)
	}
	code, out = postJSON(t, c, s.url, "/twin.v1.RuleService/ValidateRule", `{"rule": {"id": "r", "condition": "twin.reported.temp_c >"}}`)
	if issues, _ := out["issues"].([]any); code != 200 || len(issues) != 1 || issues[0].(map[string]any)["column"] == nil {
		t.Errorf("ValidateRule = %d %v; want one issue with its column", code, out)
	}
	code, out = postJSON(t, c, s.url, "/twin.v1.NoService/Nope", `{}`)
	if code != 404 || out["code"] != "unimplemented" {
		t.Errorf("an unknown method = %d %v; want 404 unimplemented", code, out)
	}
	// Proto field names in answers, as requests and the docs spell them.
	code, out = postJSON(t, c, s.url, "/twin.v1.TwinService/ListTwins", `{"page_size": 1}`)
	if _, ok := out["twins"].([]any)[0].(map[string]any)["create_time"]; code != 200 || !ok {
		t.Errorf("ListTwins = %d %v; want create_time spelled as in the proto", code, out)
	}
}

// TestHTTPRoutesByProtocol: native gRPC connections are served by grpc-go's
// own transport, everything else by the HTTP server, on one port.
func TestHTTPRoutesByProtocol(t *testing.T) {
	ctx := context.Background()
	s := startHTTPServer(t, nil)
	conns := func(proto string) float64 { return testutil.ToFloat64(s.web.conns.WithLabelValues(proto)) }
	twins := twinv1.NewTwinServiceClient(s.grpcConn(t))
	if _, err := twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1", Type: "car"}}); err != nil {
		t.Fatal(err)
	}
	if g, h := conns("grpc"), conns("http"); g != 1 || h != 0 {
		t.Errorf("after a native gRPC call: grpc, http connections = %v, %v; want 1, 0", g, h)
	}
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	if code, out := postJSON(t, &http.Client{Transport: tr}, s.url, "/twin.v1.TwinService/GetTwin", `{"id": "car-1"}`); code != 200 {
		t.Fatalf("GetTwin over HTTP = %d %v", code, out)
	}
	if g, h := conns("grpc"), conns("http"); g != 1 || h != 1 {
		t.Errorf("after an HTTP call: grpc, http connections = %v, %v; want 1, 1", g, h)
	}
	resp, err := http.Get(s.url + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Contains(body, []byte("<title>twind")) || resp.Header.Get("Content-Security-Policy") == "" {
		t.Errorf("GET / = %d %q (CSP %q); want the console", resp.StatusCode, body, resp.Header.Get("Content-Security-Policy"))
	}
	// "application/grpc+proto", as some gRPC libraries send, is native
	// gRPC too.
	g0, h0 := conns("grpc"), conns("http")
	sub := twinv1.NewTwinServiceClient(s.grpcConn(t))
	if _, err := sub.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-1"}, grpc.CallContentSubtype("proto")); err != nil {
		t.Fatal(err)
	}
	if g, h := conns("grpc"), conns("http"); g != g0+1 || h != h0 {
		t.Errorf("after a call as application/grpc+proto: grpc, http connections = %v, %v; want %v, %v", g, h, g0+1, h0)
	}
}

// TestHTTPh2c: a Connect client over HTTP/2 without TLS (prior knowledge,
// as connect-go's and curl --http2-prior-knowledge do) is served, though
// the gRPC matcher sent it SETTINGS that Go's HTTP/2 server never sent.
func TestHTTPh2c(t *testing.T) {
	s := startHTTPServer(t, nil)
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	postJSON(t, c, s.url, "/twin.v1.TwinService/CreateTwin", `{"twin": {"id": "p-1"}}`)
	for i := range 3 { // many calls on the connection, after its SETTINGS exchange settled
		req, _ := http.NewRequest("POST", s.url+"/twin.v1.TwinService/GetTwin", strings.NewReader(`{"id": "p-1"}`))
		req.Header.Set("Content-Type", "application/json")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("call %d over h2c: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
			t.Errorf("call %d over h2c = %d %s; want 200 over HTTP/2", i, resp.StatusCode, resp.Proto)
		}
	}
	if n := testutil.ToFloat64(s.web.conns.WithLabelValues("http")); n != 1 {
		t.Errorf("h2c calls used %v connections; want 1", n)
	}
}

// TestHTTPAuth: with an API token, a call over HTTP without it is refused
// by the same interceptor as over gRPC, unary and streaming.
func TestHTTPAuth(t *testing.T) {
	s := startHTTPServer(t, func(o *Options) { o.APIToken = "s3cret" })
	c := http.DefaultClient
	code, out := postJSON(t, c, s.url, "/twin.v1.TwinService/ListTwins", `{}`)
	if code != 401 || out["code"] != "unauthenticated" || !strings.Contains(out["message"].(string), "Bearer") {
		t.Errorf("ListTwins without the token = %d %v; want 401 unauthenticated saying how", code, out)
	}
	if code, out := postJSON(t, c, s.url, "/twin.v1.TwinService/ListTwins", `{}`, "Authorization", "Bearer nope"); code != 401 {
		t.Errorf("ListTwins with a wrong token = %d %v; want 401", code, out)
	}
	if code, out := postJSON(t, c, s.url, "/twin.v1.TwinService/ListTwins", `{}`, "Authorization", "Bearer s3cret"); code != 200 {
		t.Errorf("ListTwins with the token = %d %v; want 200", code, out)
	}
	r := connectStream(t, context.Background(), s.url, "/twin.v1.TwinService/WatchTwins", `{}`)
	flags, msg, err := readEnvelope(r)
	if err != nil || flags&2 == 0 || !bytes.Contains(msg, []byte(`"unauthenticated"`)) {
		t.Errorf("WatchTwins without the token = %x %s %v; want the stream's end, unauthenticated", flags, msg, err)
	}
	if code, _ := postJSON(t, c, s.url, "/grpc.health.v1.Health/Check", `{}`); code != 200 {
		t.Errorf("health without the token = %d; want 200", code)
	}
	// --max-header-bytes holds over HTTP too: a 64 KiB bearer token is
	// refused before anything reads it.
	req, err := http.NewRequest("POST", s.url+"/twin.v1.TwinService/ListTwins", strings.NewReader(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+strings.Repeat("a", 64<<10))
	if resp, err := c.Do(req); err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("a call with 64 KiB of headers = %d; want 431", resp.StatusCode)
		}
	}
}

// TestHTTPStreams: WatchTwins and WatchRuleEvents stream over HTTP/1.1 with
// the Connect protocol, as a browser's fetch reads them, each message as it
// happens; gRPC-Web works too.
func TestHTTPStreams(t *testing.T) {
	s := startHTTPServer(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := http.DefaultClient
	postJSON(t, c, s.url, "/twin.v1.RuleService/CreateRule", `{"rule": {"id": "warm", "condition": "twin.reported.temp_c > 8.0",
		"actions": [{"emit": {"severity": "SEVERITY_WARNING", "message": "twin.id + \" is warm\""}}]}}`)
	watch := connectStream(t, ctx, s.url, "/twin.v1.TwinService/WatchTwins", `{"filter": "twin.type == \"fridge\""}`)
	events := connectStream(t, ctx, s.url, "/twin.v1.RuleService/WatchRuleEvents", `{"rule_id": "warm"}`)
	postJSON(t, c, s.url, "/twin.v1.TwinService/CreateTwin", `{"twin": {"id": "fridge-1", "type": "fridge"}}`)
	postJSON(t, c, s.url, "/twin.v1.TwinService/ReportState", `{"id": "fridge-1", "patch": {"temp_c": 9.5}}`)
	for _, kind := range []string{"TWIN_EVENT_KIND_CREATED", "TWIN_EVENT_KIND_REPORTED"} {
		if flags, msg, err := readEnvelope(watch); err != nil || flags != 0 || !bytes.Contains(msg, []byte(kind)) {
			t.Errorf("WatchTwins message = %x %s %v; want %s", flags, msg, err, kind)
		}
	}
	seen := ""
	for range 2 {
		_, msg, err := readEnvelope(events)
		if err != nil {
			t.Fatal(err)
		}
		seen += string(msg)
	}
	if !strings.Contains(seen, "RULE_EVENT_KIND_FIRED") || !strings.Contains(seen, "fridge-1 is warm") {
		t.Errorf("WatchRuleEvents = %s; want the firing and its message", seen)
	}

	// gRPC-Web, binary-free: JSON messages, the status in a trailer frame.
	req, _ := http.NewRequest("POST", s.url+"/twin.v1.TwinService/GetTwin", bytes.NewReader(envelope(0, []byte(`{"id": "fridge-1"}`))))
	req.Header.Set("Content-Type", "application/grpc-web+json")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	_, msg, err := readEnvelope(r)
	if err != nil || !bytes.Contains(msg, []byte(`"fridge-1"`)) {
		t.Errorf("gRPC-Web GetTwin = %s %v", msg, err)
	}
	if flags, trailer, err := readEnvelope(r); err != nil || flags&0x80 == 0 || !bytes.Contains(bytes.ToLower(trailer), []byte("grpc-status: 0")) {
		t.Errorf("gRPC-Web trailer = %x %q %v; want grpc-status 0", flags, trailer, err)
	}
}

// TestHTTPShutdown: Shutdown ends HTTP streams with UNAVAILABLE, closes a
// connection that never said what it speaks (cmux would wait for it), lets
// an HTTP call in flight answer, and returns promptly.
func TestHTTPShutdown(t *testing.T) {
	s := startHTTPServer(t, func(o *Options) { o.ShutdownTimeout = time.Minute })
	c := http.DefaultClient
	postJSON(t, c, s.url, "/twin.v1.TwinService/CreateTwin", `{"twin": {"id": "car-1", "type": "car"}}`)
	watch := connectStream(t, context.Background(), s.url, "/twin.v1.TwinService/WatchTwins", `{}`)
	silent, err := net.Dial("tcp", s.addr) // says nothing
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	type answer struct {
		code int
		out  map[string]any
	}
	waiting := make(chan answer, 1)
	go func() {
		code, out := postJSON(t, c, s.url, "/twin.v1.CommandService/SendCommand", `{"device_id": "car-1", "name": "honk", "wait": "60s"}`)
		waiting <- answer{code, out}
	}()
	waitFor(t, func() bool { return strings.Contains(s.inflight.String(), "SendCommand") })
	start := time.Now()
	if err := s.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Shutdown took %v; want it prompt", d)
	}
	if a := <-waiting; a.code != 200 || a.out["command"].(map[string]any)["state"] != "COMMAND_STATE_QUEUED" {
		t.Errorf("SendCommand over HTTP at shutdown = %d %v; want the command as it stood", a.code, a.out)
	}
	flags, msg, err := readEnvelope(watch)
	if err != nil || flags&2 == 0 || !bytes.Contains(msg, []byte(`"unavailable"`)) {
		t.Errorf("WatchTwins over HTTP at shutdown = %x %s %v; want its end, unavailable", flags, msg, err)
	}
	silent.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := silent.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Errorf("a silent connection after shutdown: read = %v; want EOF (closed)", err)
	}
}

// TestHTTPTLS: with TLS, native gRPC and HTTP/JSON (HTTP/1.1 and h2 by
// ALPN) share the port, and plaintext is refused.
func TestHTTPTLS(t *testing.T) {
	ctx := context.Background()
	certFile, keyFile, pool := selfSignedCert(t)
	s := startHTTPServer(t, func(o *Options) { o.TLSCertFile, o.TLSKeyFile = certFile, keyFile })
	conn := s.grpcConn(t, grpc.WithTransportCredentials(credentials.NewClientTLSFromCert(pool, "localhost")))
	if _, err := twinv1.NewTwinServiceClient(conn).CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1"}}); err != nil {
		t.Fatalf("native gRPC over TLS: %v", err)
	}
	url := "https://" + s.addr
	for _, h2 := range []bool{false, true} {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "localhost"}, ForceAttemptHTTP2: h2}
		if !h2 {
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		req, _ := http.NewRequest("POST", url+"/twin.v1.TwinService/GetTwin", strings.NewReader(`{"id": "car-1"}`))
		req.Header.Set("Content-Type", "application/json")
		resp, err := (&http.Client{Transport: tr}).Do(req)
		if err != nil {
			t.Fatalf("HTTPS (h2 %v): %v", h2, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		tr.CloseIdleConnections()
		if want := map[bool]int{false: 1, true: 2}[h2]; resp.StatusCode != 200 || resp.ProtoMajor != want {
			t.Errorf("HTTPS GetTwin = %d over %s; want 200 over HTTP/%d", resp.StatusCode, resp.Proto, want)
		}
	}
	plain := twinv1.NewTwinServiceClient(s.grpcConn(t))
	if _, err := plain.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-1"}); status.Code(err) != codes.Unavailable {
		t.Errorf("plaintext gRPC to a TLS server = %v; want UNAVAILABLE", err)
	}
	if _, err := http.Post("http://"+s.addr+"/twin.v1.TwinService/GetTwin", "application/json", strings.NewReader(`{"id": "car-1"}`)); err == nil {
		t.Errorf("plaintext HTTP to a TLS server succeeded")
	}
}

// selfSignedCert writes a certificate for localhost and its key, and
// returns a pool that trusts it.
func selfSignedCert(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	certPEM, keyPEM := testCertificate(t)
	dir := t.TempDir()
	certFile, keyFile = dir+"/cert.pem", dir+"/key.pem"
	if err := writeFiles(map[string][]byte{certFile: certPEM, keyFile: keyPEM}); err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	if !pool.AppendCertsFromPEM(certPEM) {
		t.Fatal("bad test certificate")
	}
	return certFile, keyFile, pool
}

// testCertificate makes a self-signed certificate for localhost and
// 127.0.0.1, and its key, in PEM.
func testCertificate(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "twind test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

func writeFiles(files map[string][]byte) error {
	for name, data := range files {
		if err := os.WriteFile(name, data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// TestHTTPBadRequests: what a Connect or curl client gets wrong is an
// error that says so, with the right code: a body that does not decode or
// names an unknown field is INVALID_ARGUMENT (not INTERNAL), a method of a
// real service called the wrong way says how to call it, a call without a
// key is refused before its body is read, and an open server answers only
// requests that name this machine.
func TestHTTPBadRequests(t *testing.T) {
	s := startHTTPServer(t, nil)
	c := http.DefaultClient
	if code, out := postJSON(t, c, s.url, "/twin.v1.TwinService/CreateTwin", `{"twin": {"id": "fridge-1"}}`); code != 200 {
		t.Fatalf("CreateTwin = %d %v", code, out)
	}
	for _, body := range []string{`{"id": "fridge-1"`, `hello`, `{"id": 5}`, `{"id": "fridge-1", "patch": 5}`,
		`{"id": "fridge-1", "patch": {}, "expected_version": "abc"}`, `{"id": "fridge-1", "patch": {"t": 1}, "expected_verison": 1}`} {
		code, out := postJSON(t, c, s.url, "/twin.v1.TwinService/UpdateDesired", body)
		if code != 400 || out["code"] != "invalid_argument" || !strings.Contains(fmt.Sprint(out["message"]), "UpdateDesiredRequest") {
			t.Errorf("UpdateDesired with %s = %d %v; want 400 invalid_argument naming the request", body, code, out)
		}
	}
	if tw, err := s.engine.Get("fridge-1"); err != nil || tw.Version != 1 {
		t.Errorf("fridge-1 after the bad calls: %v, %v; want it untouched at version 1", tw, err)
	}
	// A real method called the wrong way.
	for _, ct := range []string{"text/plain", ""} {
		req, _ := http.NewRequest("POST", s.url+"/twin.v1.TwinService/GetTwin", strings.NewReader(`{"id": "fridge-1"}`))
		if ct != "" {
			req.Header.Set("Content-Type", ct)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnsupportedMediaType || !strings.Contains(string(b), "Content-Type: application/json") {
			t.Errorf("GetTwin with Content-Type %q = %d %s; want 415 saying how to call it", ct, resp.StatusCode, b)
		}
	}
	// No directory listing among the console's files.
	if resp, err := c.Get(s.url + "/js/"); err != nil {
		t.Fatal(err)
	} else if resp.Body.Close(); resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /js/ = %d; want 404", resp.StatusCode)
	}
	// An open server answers only requests that name this machine.
	req, _ := http.NewRequest("POST", s.url+"/twin.v1.TwinService/GetTwin", strings.NewReader(`{"id": "fridge-1"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Host = "evil.example:80"
	if resp, err := c.Do(req); err != nil {
		t.Fatal(err)
	} else if resp.Body.Close(); resp.StatusCode != http.StatusForbidden {
		t.Errorf("a request for host evil.example to an open server = %d; want 403", resp.StatusCode)
	}

	// With keys, a call without one is refused before its body is read.
	k := startHTTPServer(t, func(o *Options) { o.APIToken = "s3cret" })
	big := `{"id": "fridge-1", "patch": {"x": "` + strings.Repeat("a", 10<<20) + `"}}`
	if code, out := postJSON(t, c, k.url, "/twin.v1.TwinService/UpdateDesired", big); code != 401 || out["code"] != "unauthenticated" {
		t.Errorf("a 10 MiB call without a key = %d %v; want 401 unauthenticated", code, out)
	}
}
