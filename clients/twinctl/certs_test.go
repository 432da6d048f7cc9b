package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/twind-io/twind/clients/twind"
	"github.com/twind-io/twind/internal/testserver"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
)

// TestCert makes an authority, a server and a device certificate and a
// revocation list with twinctl cert, and uses them with a real twind: the
// device connects with its certificate and no token, and revoking it ends
// its stream at the reload.
func TestCert(t *testing.T) {
	ctx := context.Background()
	pki := filepath.Join(t.TempDir(), "pki")
	f := func(name string) string { return filepath.Join(pki, name) }
	for _, args := range [][]string{
		{"cert", "ca", "--out", pki},
		{"cert", "issue", "--ca", pki, "--server", "localhost", "--out", pki},
		{"cert", "issue", "--ca", pki, "--device", "fridge-7", "--out", pki},
		{"cert", "revoke", "--ca", pki},
	} {
		if out, err := run(t, "unused", "", args...); err != nil {
			t.Fatalf("twinctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	if fi, err := os.Stat(f("ca-key.pem")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("ca-key.pem: %v, %v; want a file readable by its owner only", fi, err)
	}
	reload := make(chan os.Signal, 1)
	s := testserver.StartWith(t, t.TempDir(), "", server.Options{
		TLSCertFile: f("server.pem"), TLSKeyFile: f("server-key.pem"),
		DeviceCAFile: f("ca.pem"), DeviceCRLFile: f("crl.pem"), Reload: reload,
	})
	opt, err := twind.WithTLS(f("ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	op, err := twind.Dial(s.Addr, opt)
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	if _, err := op.CreateTwin(ctx, "fridge-7", "fridge", nil); err != nil {
		t.Fatal(err)
	}
	devOpt, err := twind.WithClientCert(f("ca.pem"), f("fridge-7.pem"), f("fridge-7-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	dev, err := twind.Dial(s.Addr, devOpt)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	stream, err := dev.Devices.Connect(sctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{DeviceId: "fridge-7"}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := stream.Recv(); err != nil || m.GetWelcome() == nil {
		t.Fatalf("fridge-7 with its certificate: %v, %v; want a welcome", m, err)
	}

	out, err := run(t, "unused", "", "cert", "revoke", "--ca", pki, f("fridge-7.pem"))
	if err != nil || !strings.Contains(out, "revoked "+f("fridge-7.pem")) {
		t.Fatalf("twinctl cert revoke = %q, %v", out, err)
	}
	reload <- syscall.SIGHUP
	if _, err := stream.Recv(); status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("the revoked device's stream ended with %v; want UNAUTHENTICATED saying it was revoked", err)
	}

	// Revoking again changes nothing; the list is signed by the authority.
	if out, err := run(t, "unused", "", "cert", "revoke", "--ca", pki, f("fridge-7.pem")); err != nil || !strings.Contains(out, "revoked already") {
		t.Errorf("revoking twice = %q, %v; want 'revoked already'", out, err)
	}
	b, _ := os.ReadFile(f("crl.pem"))
	blk, _ := pem.Decode(b)
	crl, err := x509.ParseRevocationList(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, _ := os.ReadFile(f("ca.pem"))
	cblk, _ := pem.Decode(caPEM)
	ca, _ := x509.ParseCertificate(cblk.Bytes)
	if err := crl.CheckSignatureFrom(ca); err != nil || len(crl.RevokedCertificateEntries) != 1 || crl.Number.Int64() != 3 {
		t.Errorf("crl.pem: signature %v, %d entries, number %v; want signed by the authority, 1 entry, number 3", err, len(crl.RevokedCertificateEntries), crl.Number)
	}

	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"cert", "ca", "--out", pki}, "exists"},
		{[]string{"cert", "ca"}, "--out DIR is required"},
		{[]string{"cert", "issue", "--ca", pki, "--out", pki}, "one of --device ID or --server HOST"},
		{[]string{"cert", "issue", "--ca", pki, "--out", pki, "--device", "a", "--server", "b"}, "one of --device ID or --server HOST"},
		{[]string{"cert", "issue", "--ca", t.TempDir(), "--out", pki, "--device", "a"}, "ca.pem"},
		{[]string{"cert", "issue", "--ca", pki, "--out", pki, "--device", "../a"}, "cannot name a file"},
		{[]string{"cert", "revoke", "--ca", pki, f("ca-key.pem")}, "not a PEM certificate"},
		{[]string{"cert", "issue", "--ca", pki, "--out", pki, "--device", "fridge-7"}, "exists"},
		{[]string{"cert", "issue", "--ca", pki, "--out", t.TempDir(), "--device", "b", "--valid-for", "-1h"}, "positive duration"},
	} {
		if out, err := run(t, "unused", "", tt.args...); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("twinctl %s = %q, %v; want an error containing %q", strings.Join(tt.args, " "), out, err, tt.want)
		}
	}
}
