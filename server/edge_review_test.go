package server

// Tests from a review of the edge and HTTP code: each failed on the code
// as it was, demonstrating a finding, and holds since its fix.

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/metadata"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// Finding: MaxHeaderBytes (16 KiB default, 4 KiB here) is not applied to
// the HTTP server; net/http's 1 MiB default applies instead.
func TestReviewHTTPHeaderLimit(t *testing.T) {
	s := startHTTPServer(t, func(o *Options) { o.Limits.MaxHeaderBytes = 4 << 10 })
	req, _ := http.NewRequest("POST", s.url+"/twin.v1.TwinService/ListTwins", strings.NewReader(`{}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Big", strings.Repeat("a", 512<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("HTTP call with 512 KiB of headers, MaxHeaderBytes 4 KiB = %d; want 431", resp.StatusCode)
	}
}

// Finding: over HTTP each request is its own "connection" for connTagger
// (grpc.Server.ServeHTTP calls TagConn per request), so
// MaxWatchersPerConn does not bound watches on one h2c connection.
func TestReviewHTTPWatchersPerConn(t *testing.T) {
	s := startHTTPServer(t, func(o *Options) { o.Limits.MaxWatchersPerConn = 2 })
	if code, out := postJSON(t, http.DefaultClient, s.url, "/twin.v1.TwinService/CreateTwin", `{"twin": {"id": "car-1"}}`); code != 200 {
		t.Fatal(code, out)
	}
	var dials atomic.Int32
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
		dials.Add(1)
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	accepted := 0
	for i := 0; i < 4; i++ {
		req, _ := http.NewRequestWithContext(ctx, "POST", s.url+"/twin.v1.TwinService/WatchTwins",
			strings.NewReader(string(envelope(0, []byte(`{"start_revision": "1"}`)))))
		req.Header.Set("Content-Type", "application/connect+json")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		flags, msg, err := readEnvelope(bufio.NewReader(resp.Body))
		if err != nil {
			t.Fatal(err)
		}
		if flags&2 == 0 {
			accepted++
		} else {
			t.Logf("watch %d refused: %s", i+1, msg)
		}
	}
	if dials.Load() != 1 {
		t.Fatalf("%d connections; the test wants one", dials.Load())
	}
	if accepted > 2 {
		t.Errorf("%d watches accepted on one h2c connection with MaxWatchersPerConn 2", accepted)
	}
}

// Finding: over HTTPS, the HTTP server's connections are not *tls.Conn, so
// r.TLS is nil and grpc's ServeHTTP gives no AuthInfo: a revoked device
// certificate is not refused and falls back to the device token, which the
// README and TestDeviceCertificateReportStateWithKeys say never happens.
func TestReviewHTTPSRevokedCertFallsBackToToken(t *testing.T) {
	ctx := context.Background()
	ca := newTestCA(t, t.TempDir(), "ca")
	crl := filepath.Join(t.TempDir(), "crl.pem")
	ca.writeCRL(crl, false)
	s, addr := certServer(t, ca, func(o *Options) { o.APIToken, o.DeviceCRLFile = "op-token", crl })
	opCtx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer op-token")
	op := twinv1.NewTwinServiceClient(ca.dial(addr, ""))
	if _, err := op.CreateTwin(opCtx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "fridge-1"}}); err != nil {
		t.Fatal(err)
	}
	cert := ca.device("fridge-1")
	tok, err := op.IssueDeviceToken(opCtx, &twinv1.IssueDeviceTokenRequest{Id: "fridge-1"})
	if err != nil {
		t.Fatal(err)
	}
	ca.writeCRL(crl, false, cert)
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	kp, err := tls.LoadX509KeyPair(ca.file("fridge-1.pem"), ca.file("fridge-1-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "localhost", Certificates: []tls.Certificate{kp}}}}
	code, out := postJSON(t, c, "https://"+addr, "/twin.v1.TwinService/ReportState", `{"id": "fridge-1", "patch": {"door": "shut"}}`,
		"Authorization", "Bearer "+tok.GetToken())
	if code == 200 {
		t.Errorf("HTTPS ReportState with a revoked certificate and the device token = %d %v; want 401 unauthenticated, revoked", code, out)
	}
}

// Finding: cmux buffers everything a connection sends until its first
// HEADERS frame (for up to sniffTimeout, 2 minutes), unauthenticated and
// unbounded: one TCP connection grows the heap by what it sends.
func TestReviewSniffBufferUnbounded(t *testing.T) {
	s := startHTTPServer(t, nil)
	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	fr := http2.NewFramer(c, c)
	io.WriteString(c, http2.ClientPreface)
	fr.WriteSettings()
	payload := make([]byte, 16<<10)
	const total = 128 << 20
	sent := 0
	for ; sent < total; sent += len(payload) {
		if err := fr.WriteData(1, false, payload); err != nil {
			break // cut off: what is wanted
		}
	}
	if sent >= total {
		t.Errorf("the server read all %d MiB a connection sent before its first request; want it cut off", total>>20)
	}
	time.Sleep(500 * time.Millisecond)
	grew := int64(heap()) - int64(before)
	t.Logf("heap grew by %d MiB after %d MiB sent before any HEADERS", grew>>20, total>>20)
	if grew > 32<<20 {
		t.Errorf("one unauthenticated connection grew the heap by %d MiB", grew>>20)
	}
}

// Finding: the HTTP side answers any Host, so on an open server on
// localhost (the default) a web page can reach the whole API by DNS
// rebinding; here it makes itself the first admin key.
func TestReviewDNSRebinding(t *testing.T) {
	s := startHTTPServer(t, nil)
	req, _ := http.NewRequest("POST", s.url+"/twin.v1.KeyService/CreateKey", strings.NewReader(`{"name": "evil", "role": "ROLE_ADMIN"}`))
	req.Host = "attacker.example:" + strings.Split(s.addr, ":")[1]
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Origin", "http://attacker.example:"+strings.Split(s.addr, ":")[1])
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	json.NewDecoder(resp.Body).Decode(&out)
	if resp.StatusCode == 200 {
		t.Errorf("CreateKey with Host %s = 200, secret %v: a rebinding page owns the server", req.Host, out["secret"])
	}
}

// Finding: the transcoder decompresses a Connect request without bound
// (vanguard's compressionPool.decompress reads to EOF), before
// maxHTTPBuffer or MaxRecvMsgSize apply: a small gzip bomb grows the heap.
func TestReviewHTTPGzipBomb(t *testing.T) {
	s := startHTTPServer(t, nil)
	var body bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&body, gzip.BestCompression)
	io.WriteString(zw, `{"id": "`)
	chunk := bytes.Repeat([]byte("a"), 1<<20)
	const mib = 256
	for i := 0; i < mib; i++ {
		zw.Write(chunk)
	}
	io.WriteString(zw, `"}`)
	zw.Close()
	heap := func() (uint64, uint64) {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc, m.TotalAlloc
	}
	_, totalBefore := heap()
	req, _ := http.NewRequest("POST", s.url+"/twin.v1.TwinService/GetTwin", bytes.NewReader(body.Bytes()))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Content-Encoding", "gzip")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	_, totalAfter := heap()
	t.Logf("sent %d KiB (%d MiB inflated): %d %.200s; the server allocated %d MiB", body.Len()>>10, mib, resp.StatusCode, out, (totalAfter-totalBefore)>>20)
	if (totalAfter-totalBefore)>>20 > 64 {
		t.Errorf("a %d KiB request made the server allocate %d MiB", body.Len()>>10, (totalAfter-totalBefore)>>20)
	}
}

// Finding (critical): 'authorization: Bearer ' with an empty token passes
// the interceptor as a device token "" for ReportState, and the handler's
// switch treats an empty deviceToken as no credentials at all (its default
// branch), so anyone reports for any twin on a server that requires keys.
func TestReviewEmptyBearerReportState(t *testing.T) {
	file := writeKeys(t, "", roleKeys)
	s := startServer(t, nil, func(o *Options) { o.APIKeysFile = file })
	c := clients(s)
	if _, err := c.twins.CreateTwin(as("provisioner-secret"), &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "f1"}}); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"Bearer ", "bearer    "} {
		ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", v)
		r, err := c.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "f1", Patch: mustStruct(t, map[string]any{"door": "open"})})
		if err == nil {
			t.Errorf("ReportState with authorization %q (no key, no token) succeeded: reported %v", v, r.GetTwin().GetReported().AsMap())
		}
	}
}

// The same over HTTP/1.1 (curl): net/http trims a trailing space, but
// strings.TrimSpace also trims Unicode spaces such as U+00A0.
func TestReviewEmptyBearerReportStateHTTP(t *testing.T) {
	s := startHTTPServer(t, func(o *Options) { o.APIToken = "op-token" })
	if code, out := postJSON(t, http.DefaultClient, s.url, "/twin.v1.TwinService/CreateTwin", `{"twin": {"id": "f1"}}`, "Authorization", "Bearer op-token"); code != 200 {
		t.Fatal(code, out)
	}
	code, out := postJSON(t, http.DefaultClient, s.url, "/twin.v1.TwinService/ReportState", `{"id": "f1", "patch": {"door": "open"}}`,
		"Authorization", "Bearer \u00a0")
	if code == 200 {
		t.Errorf("HTTP ReportState with 'Authorization: Bearer <U+00A0>' = %d %v", code, out)
	}
}

// Check (expected to pass): revoking a key ends its HTTP (Connect) watch.
func TestReviewRevokeEndsHTTPStream(t *testing.T) {
	s := startHTTPServer(t, func(o *Options) { o.APIToken = "admin" })
	auth := []string{"Authorization", "Bearer admin"}
	postJSON(t, http.DefaultClient, s.url, "/twin.v1.TwinService/CreateTwin", `{"twin": {"id": "f1"}}`, auth...)
	_, out := postJSON(t, http.DefaultClient, s.url, "/twin.v1.KeyService/CreateKey", `{"name": "w", "role": "ROLE_VIEWER"}`, auth...)
	secret, _ := out["secret"].(string)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := connectStream(t, ctx, s.url, "/twin.v1.TwinService/WatchTwins", `{"start_revision": "1"}`, "Authorization", "Bearer "+secret)
	if flags, msg, err := readEnvelope(r); err != nil || flags != 0 {
		t.Fatal(flags, string(msg), err)
	}
	if code, out := postJSON(t, http.DefaultClient, s.url, "/twin.v1.KeyService/RevokeKey", `{"name": "w"}`, auth...); code != 200 {
		t.Fatal(code, out)
	}
	flags, msg, err := readEnvelope(r)
	if err != nil || flags&2 == 0 || !strings.Contains(string(msg), "unauthenticated") {
		t.Errorf("HTTP watch after its key was revoked: %d %s %v", flags, msg, err)
	}
}
