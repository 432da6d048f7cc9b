package twind_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/twind-io/twind/clients/twind"
	"github.com/twind-io/twind/internal/testserver"
	"github.com/twind-io/twind/server"
)

// selfSigned writes a self-signed certificate for localhost and its key.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string) {
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
	kder, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	return certFile, keyFile
}

func TestTLS(t *testing.T) {
	ctx := context.Background()
	cert, key := selfSigned(t, t.TempDir())
	s := testserver.StartWith(t, t.TempDir(), "", server.Options{TLSCertFile: cert, TLSKeyFile: key})
	opt, err := twind.WithTLS(cert)
	if err != nil {
		t.Fatal(err)
	}
	c, err := twind.Dial(s.Addr, opt)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.CreateTwin(ctx, "car-1", "car", nil); err != nil {
		t.Fatalf("over TLS: %v", err)
	}
	plain, _ := twind.Dial(s.Addr)
	defer plain.Close()
	if _, err := plain.GetTwin(ctx, "car-1"); err == nil {
		t.Error("a plaintext client reached a TLS server")
	}
	if _, err := twind.WithTLS(key); err == nil {
		t.Error("WithTLS accepted a file with no certificate")
	}
}
