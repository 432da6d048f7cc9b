package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/soheilhy/cmux"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Devices may authenticate with a client certificate instead of a token.
// With Options.DeviceCAFile set, the TLS handshake asks every client for a
// certificate and verifies one that is given against those authorities
// (tls.VerifyClientCertIfGiven: operators without a certificate still
// connect). A verified certificate names its device by its common name, or
// else by its only DNS name. A device so named needs no token in its hello,
// whose device_id must be the certificate's, and may call ReportState for
// its own twin. Options.DeviceCRLFile revokes certificates; Reload re-reads
// it and ends the live streams of the certificates it now revokes.

// errNoDeviceCert: the caller presented no verified device certificate.
var errNoDeviceCert = errors.New("server: no verified device certificate")

// deviceCerts is the device certificate authorities and the revocation
// list in force, and the device streams authenticated by a certificate. It
// is safe for concurrent use.
type deviceCerts struct {
	cas     []*x509.Certificate // the authorities, which sign the CRL too
	crlFile string              // "" if none
	logger  *slog.Logger

	// mu protects revoked and live.
	mu sync.Mutex
	// revoked holds the revoked certificates, by revocationKey.
	revoked map[string]bool
	// live holds the streams authenticated by a certificate, with their
	// certificate's revocationKey and serial.
	live map[*session]liveCert
}

type liveCert struct{ key, serial string }

// serverTLS returns the server's transport credentials, and its device
// certificates if opts.DeviceCAFile is set.
func serverTLS(opts Options) (*tls.Config, *deviceCerts, error) {
	if opts.TLSCertFile == "" || opts.TLSKeyFile == "" {
		if opts.DeviceCAFile != "" {
			return nil, nil, fmt.Errorf("--device-ca needs TLS, in whose handshake devices present their certificates: set --tls-cert and --tls-key too")
		}
		return nil, nil, fmt.Errorf("TLS needs both --tls-cert and --tls-key")
	}
	cert, err := tls.LoadX509KeyPair(opts.TLSCertFile, opts.TLSKeyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("TLS certificate: %w", err)
	}
	// h2 for gRPC and HTTP/2, http/1.1 for browsers and curl.
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"}}
	if opts.DeviceCAFile == "" {
		if opts.DeviceCRLFile != "" {
			return nil, nil, fmt.Errorf("--device-crl needs --device-ca, the authorities whose certificates it revokes")
		}
		return cfg, nil, nil
	}
	dc, err := loadDeviceCerts(opts.DeviceCAFile, opts.DeviceCRLFile, opts.Logger)
	if err != nil {
		return nil, nil, err
	}
	cfg.ClientAuth = tls.VerifyClientCertIfGiven
	cfg.ClientCAs = x509.NewCertPool()
	for _, ca := range dc.cas {
		cfg.ClientCAs.AddCert(ca)
	}
	return cfg, dc, nil
}

// terminatedTLS is the gRPC transport security of connections whose TLS
// the listener terminated (serve): it gives grpc-go each connection's TLS
// state, as credentials.NewTLS would after its own handshake, so that a
// call knows its peer's certificate (device certificates).
type terminatedTLS struct{}

func (terminatedTLS) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("terminatedTLS is for a server")
}

func (terminatedTLS) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	tc := tlsConnOf(c)
	if tc == nil {
		return nil, nil, errors.New("the connection is not TLS")
	}
	if err := tc.Handshake(); err != nil { // done already, while it was routed
		return nil, nil, err
	}
	return c, credentials.TLSInfo{State: tc.ConnectionState(), CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
}

func (terminatedTLS) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls", SecurityVersion: "1.2"}
}
func (terminatedTLS) Clone() credentials.TransportCredentials { return terminatedTLS{} }
func (terminatedTLS) OverrideServerName(string) error         { return nil }

// tlsConnOf returns the TLS connection under the wrappers of serve.
func tlsConnOf(c net.Conn) *tls.Conn {
	for {
		switch x := c.(type) {
		case *tls.Conn:
			return x
		case *cmux.MuxConn:
			c = x.Conn
		case *trackedConn:
			c = x.Conn
		case *settingsAckFilter:
			c = x.Conn
		default:
			return nil
		}
	}
}

func loadDeviceCerts(caFile, crlFile string, logger *slog.Logger) (*deviceCerts, error) {
	b, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("--device-ca: %w", err)
	}
	dc := &deviceCerts{crlFile: crlFile, logger: logger, live: map[*session]liveCert{}}
	for rest := b; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("--device-ca %s: %w", caFile, err)
		}
		dc.cas = append(dc.cas, c)
	}
	if len(dc.cas) == 0 {
		return nil, fmt.Errorf("--device-ca %s: no PEM certificate in it", caFile)
	}
	if crlFile != "" {
		if dc.revoked, err = dc.readCRL(); err != nil {
			return nil, err
		}
	}
	return dc, nil
}

// readCRL reads and checks the revocation list: PEM (one or more "X509 CRL"
// blocks) or DER, each signed by one of the authorities.
func (dc *deviceCerts) readCRL() (map[string]bool, error) {
	b, err := os.ReadFile(dc.crlFile)
	if err != nil {
		return nil, fmt.Errorf("--device-crl: %w", err)
	}
	var ders [][]byte
	for rest := b; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		if blk.Type == "X509 CRL" {
			ders = append(ders, blk.Bytes)
		}
	}
	if len(ders) == 0 {
		ders = [][]byte{b} // DER
	}
	revoked := map[string]bool{}
	for _, der := range ders {
		crl, err := x509.ParseRevocationList(der)
		if err != nil {
			return nil, fmt.Errorf("--device-crl %s: not a certificate revocation list (PEM \"X509 CRL\" or DER): %w", dc.crlFile, err)
		}
		signed := false
		for _, ca := range dc.cas {
			if bytes.Equal(ca.RawSubject, crl.RawIssuer) && crl.CheckSignatureFrom(ca) == nil {
				signed = true
				break
			}
		}
		if !signed {
			return nil, fmt.Errorf("--device-crl %s: the list of %q is not signed by an authority of --device-ca", dc.crlFile, crl.Issuer)
		}
		if !crl.NextUpdate.IsZero() && crl.NextUpdate.Before(time.Now()) && dc.logger != nil {
			dc.logger.Warn("the device CRL is past its next update; it is still in force: issue a fresh one",
				"file", dc.crlFile, "next_update", crl.NextUpdate)
		}
		for _, e := range crl.RevokedCertificateEntries {
			revoked[revocationKey(crl.RawIssuer, e.SerialNumber.String())] = true
		}
	}
	return revoked, nil
}

// revocationKey names a certificate by its issuer and serial number.
func revocationKey(rawIssuer []byte, serial string) string {
	return string(rawIssuer) + "\x00" + serial
}

// identity returns the device that the caller's verified certificate
// names, and the certificate's revocation key and serial number. It fails
// with errNoDeviceCert if the caller presented no verified certificate, and
// with UNAUTHENTICATED if the certificate names no device or is revoked.
func (dc *deviceCerts) identity(ctx context.Context) (id, key, serial string, err error) {
	if dc == nil {
		return "", "", "", errNoDeviceCert
	}
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", "", "", errNoDeviceCert
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return "", "", "", errNoDeviceCert
	}
	leaf := info.State.VerifiedChains[0][0]
	id = leaf.Subject.CommonName
	if id == "" && len(leaf.DNSNames) == 1 {
		id = leaf.DNSNames[0]
	}
	serial = leaf.SerialNumber.String()
	if id == "" {
		return "", "", "", status.Errorf(codes.Unauthenticated,
			"the client certificate (serial %s) names no device: it needs the device id as its common name, or as its only DNS name", serial)
	}
	key = revocationKey(leaf.RawIssuer, serial)
	dc.mu.Lock()
	revoked := dc.revoked[key]
	dc.mu.Unlock()
	if revoked {
		return "", "", "", status.Errorf(codes.Unauthenticated,
			"the client certificate of device %.130q (serial %s) is revoked; the device needs a new certificate", id, serial)
	}
	return id, key, serial, nil
}

// track records a stream authenticated by a certificate, so that revoking
// the certificate ends it. It fails if the certificate was revoked since
// identity checked it. The caller must untrack the stream when it ends.
func (dc *deviceCerts) track(ss *session, key, serial string) error {
	dc.mu.Lock()
	defer dc.mu.Unlock()
	if dc.revoked[key] {
		return status.Errorf(codes.Unauthenticated,
			"the client certificate of device %.130q (serial %s) is revoked; the device needs a new certificate", ss.deviceID, serial)
	}
	dc.live[ss] = liveCert{key: key, serial: serial}
	return nil
}

func (dc *deviceCerts) untrack(ss *session) {
	dc.mu.Lock()
	delete(dc.live, ss)
	dc.mu.Unlock()
}

// reload re-reads the revocation list, puts it in force, and ends the
// streams of the certificates it revokes. If the list cannot be read, the
// one in force stays.
func (dc *deviceCerts) reload() error {
	if dc == nil || dc.crlFile == "" {
		return nil
	}
	revoked, err := dc.readCRL()
	if err != nil {
		return err
	}
	var ended []*session
	var serials []string
	dc.mu.Lock()
	dc.revoked = revoked
	for ss, c := range dc.live {
		if revoked[c.key] {
			ended = append(ended, ss)
			serials = append(serials, c.serial)
		}
	}
	dc.mu.Unlock()
	for i, ss := range ended {
		ss.end(status.Errorf(codes.Unauthenticated,
			"the client certificate of device %.130q (serial %s) was revoked; the device needs a new certificate", ss.deviceID, serials[i]))
	}
	if dc.logger != nil {
		dc.logger.Info("device CRL reloaded", "file", dc.crlFile, "revoked", len(revoked), "streams_ended", len(ended))
	}
	return nil
}

// certDevice returns the device the caller's verified client certificate
// names; "" if it presented none, and why if the one it presented cannot be
// used (it names no device or is revoked): such a caller is refused
// whatever else it sends.
func (s *Server) certDevice(ctx context.Context) (string, error) {
	id, _, _, err := s.certs.identity(ctx)
	if errors.Is(err, errNoDeviceCert) {
		return "", nil
	}
	return id, err
}
