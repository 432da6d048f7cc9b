package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// testCA is a certificate authority for tests.
type testCA struct {
	t      *testing.T
	dir    string
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	serial int64
}

func newTestCA(t *testing.T, dir, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &testCA{t: t, dir: dir, cert: cert, key: key, serial: 100}
	writePEM(t, filepath.Join(dir, name+".pem"), "CERTIFICATE", der)
	return ca
}

func (ca *testCA) file(name string) string { return filepath.Join(ca.dir, name) }

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// issue issues a certificate and writes it and its key as name.pem and
// name-key.pem; it returns the certificate.
func (ca *testCA) issue(name string, tmpl *x509.Certificate) *x509.Certificate {
	t := ca.t
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca.serial++
	tmpl.SerialNumber = big.NewInt(ca.serial)
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	writePEM(t, ca.file(name+".pem"), "CERTIFICATE", der)
	writePEM(t, ca.file(name+"-key.pem"), "PRIVATE KEY", kder)
	c, _ := x509.ParseCertificate(der)
	return c
}

// device issues a client certificate whose common name is id.
func (ca *testCA) device(id string) *x509.Certificate {
	return ca.issue(id, &x509.Certificate{Subject: pkix.Name{CommonName: id}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
}

// writeCRL writes a revocation list of the given certificates, signed by
// ca, to path: PEM, or DER if der.
func (ca *testCA) writeCRL(path string, der bool, revoked ...*x509.Certificate) {
	t := ca.t
	t.Helper()
	var entries []x509.RevocationListEntry
	for _, c := range revoked {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now()})
	}
	b, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number: big.NewInt(time.Now().UnixNano()), ThisUpdate: time.Now(), NextUpdate: time.Now().Add(time.Hour),
		RevokedCertificateEntries: entries,
	}, ca.cert, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	if der {
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return
	}
	writePEM(t, path, "X509 CRL", b)
}

// dialCert dials addr over TLS trusting ca, presenting the certificate
// name (none if empty).
func (ca *testCA) dial(addr, name string) *grpc.ClientConn {
	t := ca.t
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	cfg := &tls.Config{RootCAs: pool, ServerName: "localhost"}
	if name != "" {
		c, err := tls.LoadX509KeyPair(ca.file(name+".pem"), ca.file(name+"-key.pem"))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// certStream is a device's Connect stream over a connection of its own.
type certStream struct {
	t      *testing.T
	stream twinv1.DeviceService_ConnectClient
}

func openStream(t *testing.T, conn *grpc.ClientConn, hello *twinv1.Hello) *certStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	st, err := twinv1.NewDeviceServiceClient(conn).Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: hello}}); err != nil {
		t.Fatal(err)
	}
	return &certStream{t: t, stream: st}
}

// recv returns the next message, or the error that ended the stream.
func (c *certStream) recv() (*twinv1.ConnectResponse, error) {
	type res struct {
		m   *twinv1.ConnectResponse
		err error
	}
	ch := make(chan res, 1)
	go func() {
		m, err := c.stream.Recv()
		ch <- res{m, err}
	}()
	select {
	case r := <-ch:
		return r.m, r.err
	case <-time.After(10 * time.Second):
		c.t.Fatal("nothing on the stream within 10s")
		return nil, nil
	}
}

// certServer starts a TLS server on loopback whose devices may use
// certificates of ca (a server certificate for localhost is issued too).
func certServer(t *testing.T, ca *testCA, mod func(*Options)) (*Server, string) {
	ca.issue("server", &x509.Certificate{
		Subject: pkix.Name{CommonName: "localhost"}, DNSNames: []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	return startTCP(t, func(o *Options) {
		o.TLSCertFile, o.TLSKeyFile = ca.file("server.pem"), ca.file("server-key.pem")
		o.DeviceCAFile = ca.file("ca.pem")
		if mod != nil {
			mod(o)
		}
	})
}

func TestDeviceCertificates(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ca := newTestCA(t, dir, "ca")
	crl := filepath.Join(dir, "crl.pem")
	ca.writeCRL(crl, false)
	s, addr := certServer(t, ca, func(o *Options) { o.DeviceCRLFile = crl })
	op := twinv1.NewTwinServiceClient(ca.dial(addr, ""))
	for _, id := range []string{"fridge-1", "fridge-2", "car-1"} {
		if _, err := op.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id}}); err != nil {
			t.Fatal(err)
		}
	}
	fridge1 := ca.device("fridge-1")
	ca.device("fridge-2")
	// A certificate that names its device by its only DNS name.
	ca.issue("car-1", &x509.Certificate{DNSNames: []string{"car-1"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})

	// A device certificate connects without a token.
	conn1 := ca.dial(addr, "fridge-1")
	d1 := openStream(t, conn1, &twinv1.Hello{DeviceId: "fridge-1"})
	if m, err := d1.recv(); err != nil || m.GetWelcome() == nil {
		t.Fatalf("fridge-1 with its certificate and no token: %v, %v; want a welcome", m, err)
	}
	if err := d1.stream.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: 1, Patch: jsonStruct(t, `{"temp_c": 4}`)}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := d1.recv(); err != nil || m.GetReportAck().GetVersion() == 0 {
		t.Fatalf("report of fridge-1: %v, %v; want an ack", m, err)
	}
	d2 := openStream(t, ca.dial(addr, "fridge-2"), &twinv1.Hello{DeviceId: "fridge-2"})
	if m, err := d2.recv(); err != nil || m.GetWelcome() == nil {
		t.Fatalf("fridge-2: %v, %v; want a welcome", m, err)
	}
	car := openStream(t, ca.dial(addr, "car-1"), &twinv1.Hello{DeviceId: "car-1"})
	if m, err := car.recv(); err != nil || m.GetWelcome() == nil {
		t.Fatalf("car-1, named by its DNS name: %v, %v; want a welcome", m, err)
	}

	// A certificate of a device whose twin does not exist (yet).
	ca.device("ghost")
	ghost := openStream(t, ca.dial(addr, "ghost"), &twinv1.Hello{DeviceId: "ghost"})
	if _, err := ghost.recv(); status.Code(err) != codes.NotFound {
		t.Errorf("a certificate of a device without a twin = %v; want NOT_FOUND", err)
	}

	// Another device's id is refused, naming both.
	wrong := openStream(t, conn1, &twinv1.Hello{DeviceId: "fridge-2"})
	if _, err := wrong.recv(); status.Code(err) != codes.PermissionDenied ||
		!strings.Contains(err.Error(), `"fridge-1"`) || !strings.Contains(err.Error(), `"fridge-2"`) {
		t.Errorf("fridge-1's certificate saying hello as fridge-2 = %v; want PERMISSION_DENIED naming both", err)
	}

	// ReportState with a device certificate: for its own twin only.
	dev := twinv1.NewTwinServiceClient(conn1)
	if _, err := dev.ReportState(ctx, &twinv1.ReportStateRequest{Id: "fridge-1", Patch: jsonStruct(t, `{"door": "open"}`)}); err != nil {
		t.Errorf("ReportState of fridge-1 with its certificate: %v", err)
	}
	_, err := dev.ReportState(ctx, &twinv1.ReportStateRequest{Id: "fridge-2", Patch: jsonStruct(t, `{"door": "open"}`)})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), `"fridge-2"`) {
		t.Errorf("ReportState of fridge-2 with fridge-1's certificate = %v; want PERMISSION_DENIED", err)
	}

	// Revoking fridge-1's certificate ends its live stream at reload.
	ca.writeCRL(crl, true, fridge1) // DER this time
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	for {
		_, err := d1.recv()
		if err == nil {
			continue // what was sent before the end
		}
		if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "revoked") {
			t.Errorf("the revoked device's stream ended with %v; want UNAUTHENTICATED saying the certificate was revoked", err)
		}
		break
	}
	waitFor(t, func() bool {
		tw, err := op.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"})
		return err == nil && !tw.Twin.Presence.GetConnected()
	})
	// ... and refuses it from then on, on a new connection or the old one.
	for _, conn := range []*grpc.ClientConn{ca.dial(addr, "fridge-1"), conn1} {
		again := openStream(t, conn, &twinv1.Hello{DeviceId: "fridge-1"})
		if _, err := again.recv(); status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "revoked") {
			t.Errorf("a new stream with the revoked certificate = %v; want UNAUTHENTICATED saying it is revoked", err)
		}
	}
	if _, err := dev.ReportState(ctx, &twinv1.ReportStateRequest{Id: "fridge-2", Patch: jsonStruct(t, `{"door": "open"}`)}); err != nil {
		// The revoked certificate no longer names a device; this server's
		// operator API is open, so the call goes through as an operator's.
		t.Errorf("ReportState with a revoked certificate on an open API: %v", err)
	}
	// The other devices' streams go on.
	if err := d2.stream.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: 1, Patch: jsonStruct(t, `{"temp_c": 5}`)}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := d2.recv(); err != nil || m.GetReportAck().GetVersion() == 0 {
		t.Errorf("fridge-2 after fridge-1's revocation: %v, %v; want an ack", m, err)
	}

	// A list not signed by the authority is refused, and the one in force stays.
	other := newTestCA(t, t.TempDir(), "other")
	other.writeCRL(crl, false)
	if err := s.Reload(); err == nil || !strings.Contains(err.Error(), "not signed") {
		t.Errorf("Reload of a list signed by another authority = %v; want an error saying so", err)
	}
	again := openStream(t, ca.dial(addr, "fridge-1"), &twinv1.Hello{DeviceId: "fridge-1"})
	if _, err := again.recv(); status.Code(err) != codes.Unauthenticated {
		t.Errorf("the revoked certificate after a failed reload = %v; want UNAUTHENTICATED", err)
	}
}

// TestDeviceCertificateUntrusted: a certificate of an authority that is not
// --device-ca's fails the handshake.
func TestDeviceCertificateUntrusted(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, dir, "ca")
	_, addr := certServer(t, ca, nil)
	stranger := newTestCA(t, t.TempDir(), "ca")
	stranger.device("fridge-1")
	// The stranger's connection trusts the server's authority, and
	// presents the stranger's certificate.
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	cert, err := tls.LoadX509KeyPair(stranger.file("fridge-1.pem"), stranger.file("fridge-1-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "localhost", Certificates: []tls.Certificate{cert}})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := twinv1.NewTwinServiceClient(conn).ListTwins(ctx, &twinv1.ListTwinsRequest{}); status.Code(err) != codes.Unavailable {
		t.Errorf("a call with a certificate of an unknown authority = %v; want UNAVAILABLE (the handshake fails)", err)
	}
}

// TestNoDeviceCA: without --device-ca, client certificates are ignored and
// devices use tokens as before.
func TestNoDeviceCA(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ca := newTestCA(t, dir, "ca")
	ca.device("fridge-1")
	_, addr := certServer(t, ca, func(o *Options) { o.DeviceCAFile = "" })
	conn := ca.dial(addr, "fridge-1")
	op := twinv1.NewTwinServiceClient(conn)
	if _, err := op.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "fridge-1"}}); err != nil {
		t.Fatal(err)
	}
	tok, err := op.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: "fridge-1"})
	if err != nil {
		t.Fatal(err)
	}
	d := openStream(t, conn, &twinv1.Hello{DeviceId: "fridge-1"})
	if _, err := d.recv(); status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "no token") {
		t.Errorf("a certificate and no token, without --device-ca = %v; want UNAUTHENTICATED, no token", err)
	}
	d = openStream(t, conn, &twinv1.Hello{DeviceId: "fridge-1", Token: tok.Token})
	if m, err := d.recv(); err != nil || m.GetWelcome() == nil {
		t.Errorf("a token, without --device-ca: %v, %v; want a welcome", m, err)
	}
}

func TestDeviceCAOptions(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, dir, "ca")
	ca.issue("server", &x509.Certificate{DNSNames: []string{"localhost"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	garbage := filepath.Join(dir, "garbage")
	os.WriteFile(garbage, []byte("not a list"), 0o600)
	for _, tt := range []struct {
		name string
		mod  func(*Options)
		want string
	}{
		{"no TLS", func(o *Options) { o.DeviceCAFile = ca.file("ca.pem") }, "--device-ca needs TLS"},
		{"CRL without CA", func(o *Options) {
			o.TLSCertFile, o.TLSKeyFile, o.DeviceCRLFile = ca.file("server.pem"), ca.file("server-key.pem"), garbage
		}, "--device-crl needs --device-ca"},
		{"bad CRL", func(o *Options) {
			o.TLSCertFile, o.TLSKeyFile, o.DeviceCAFile, o.DeviceCRLFile = ca.file("server.pem"), ca.file("server-key.pem"), ca.file("ca.pem"), garbage
		}, "not a certificate revocation list"},
		{"CA without certificates", func(o *Options) {
			o.TLSCertFile, o.TLSKeyFile, o.DeviceCAFile = ca.file("server.pem"), ca.file("server-key.pem"), garbage
		}, "no PEM certificate"},
	} {
		o := Options{DataDir: t.TempDir()}
		tt.mod(&o)
		s, err := New(o)
		if err == nil {
			s.Shutdown()
		}
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: New = %v; want an error containing %q", tt.name, err, tt.want)
		}
	}
}

// TestDeviceCertificateReportStateWithKeys: on a server that requires API
// keys, a device with a certificate and no key may call ReportState for
// its own twin, as the device of a token may, and nothing else.
func TestDeviceCertificateReportStateWithKeys(t *testing.T) {
	ctx := context.Background()
	ca := newTestCA(t, t.TempDir(), "ca")
	crl := filepath.Join(t.TempDir(), "crl.pem")
	ca.writeCRL(crl, false)
	s, addr := certServer(t, ca, func(o *Options) { o.APIToken, o.DeviceCRLFile = "op-token", crl })
	opCtx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer op-token")
	op := twinv1.NewTwinServiceClient(ca.dial(addr, ""))
	for _, id := range []string{"fridge-1", "fridge-2"} {
		if _, err := op.CreateTwin(opCtx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id}}); err != nil {
			t.Fatal(err)
		}
	}
	cert := ca.device("fridge-1")
	dev := twinv1.NewTwinServiceClient(ca.dial(addr, "fridge-1"))
	r, err := dev.ReportState(ctx, &twinv1.ReportStateRequest{Id: "fridge-1", Patch: jsonStruct(t, `{"door": "open"}`)})
	if err != nil {
		t.Fatalf("ReportState of fridge-1 with its certificate and no key: %v", err)
	}
	if got := r.GetTwin().GetReported().AsMap()["door"]; got != "open" {
		t.Errorf("fridge-1 reported door %v, want open", got)
	}
	if _, err := dev.ReportState(ctx, &twinv1.ReportStateRequest{Id: "fridge-2", Patch: jsonStruct(t, `{"door": "open"}`)}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("ReportState of fridge-2 with fridge-1's certificate = %v; want PERMISSION_DENIED", err)
	}
	if _, err := dev.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("GetTwin with a device certificate and no key = %v; want UNAUTHENTICATED", err)
	}
	// The change's source is the device's.
	h, err := op.ListTwinHistory(opCtx, &twinv1.ListTwinHistoryRequest{Id: "fridge-1", PageSize: 1})
	if err != nil || len(h.GetEvents()) != 1 || h.GetEvents()[0].GetSource() != "device" {
		t.Errorf("history of fridge-1 = %v, %v; want the report, by the device", h, err)
	}

	// A revoked certificate is refused, saying so, whatever token comes
	// with it.
	tok, err := op.IssueDeviceToken(opCtx, &twinv1.IssueDeviceTokenRequest{Id: "fridge-1"})
	if err != nil {
		t.Fatal(err)
	}
	ca.writeCRL(crl, false, cert)
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []context.Context{ctx, metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok.GetToken())} {
		_, err := dev.ReportState(c, &twinv1.ReportStateRequest{Id: "fridge-1", Patch: jsonStruct(t, `{"door": "shut"}`)})
		if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "revoked") {
			t.Errorf("ReportState with a revoked certificate = %v; want UNAUTHENTICATED saying it is revoked", err)
		}
	}
}
