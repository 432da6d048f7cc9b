package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// The files of a certificate authority made by 'twinctl cert ca'.
const (
	caCertFile = "ca.pem"
	caKeyFile  = "ca-key.pem"
	caCRLFile  = "crl.pem"
)

func certCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "cert", Short: "Make a test certificate authority, device and server certificates, and a revocation list",
		Long: `Make what twind's device certificates need, for testing, without openssl:
a certificate authority (ECDSA P-256), device certificates that name their
device (twind --device-ca ca.pem), a server certificate (--tls-cert,
--tls-key), and a revocation list (--device-crl crl.pem). These commands
work offline; they do not talk to twind. Keep ca-key.pem secret.`}
	cmd.AddCommand(certCACmd(), certIssueCmd(), certRevokeCmd())
	return cmd
}

func certCACmd() *cobra.Command {
	var out, name string
	var validFor time.Duration
	cmd := &cobra.Command{
		Use: "ca --out DIR", Short: "Make a certificate authority: DIR/ca.pem and DIR/ca-key.pem", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("--out DIR is required: where to write ca.pem and ca-key.pem")
			}
			keyPath := filepath.Join(out, caKeyFile)
			if _, err := os.Stat(keyPath); err == nil {
				return fmt.Errorf("%s exists: a new authority would orphan every certificate it issued; choose another --out", keyPath)
			}
			key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				return err
			}
			now := time.Now()
			tmpl := &x509.Certificate{
				SerialNumber: randomSerial(), Subject: pkix.Name{CommonName: name},
				NotBefore: now.Add(-time.Hour), NotAfter: now.Add(validFor),
				KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
				BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true,
			}
			der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
			if err != nil {
				return err
			}
			if err := writeCertAndKey(out, caCertFile, caKeyFile, der, key); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s and %s (keep the key secret)\n", filepath.Join(out, caCertFile), keyPath)
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "directory to write ca.pem and ca-key.pem to (made if missing)")
	cmd.Flags().StringVar(&name, "name", "twind test device CA", "the authority's common name")
	cmd.Flags().DurationVar(&validFor, "valid-for", 10*365*24*time.Hour, "how long the authority's certificate is valid")
	return cmd
}

func certIssueCmd() *cobra.Command {
	var caDir, device, server, out string
	var validFor time.Duration
	var force bool
	cmd := &cobra.Command{
		Use:   "issue --ca DIR (--device ID | --server HOST[,HOST]) --out DIR",
		Short: "Issue a device certificate (OUT/ID.pem, OUT/ID-key.pem) or a server certificate (OUT/server.pem, OUT/server-key.pem)",
		Long: `Issue a certificate signed by the authority in --ca DIR.

With --device ID, a client certificate whose common name is the device id:
a twind run with --device-ca DIR/ca.pem takes it as that device's
identity. With --server, a server certificate for the host names and IP
addresses given (for twind's --tls-cert and --tls-key).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if caDir == "" || out == "" || (device == "") == (server == "") {
				return errors.New("give --ca DIR, --out DIR, and one of --device ID or --server HOST")
			}
			if validFor <= 0 {
				return fmt.Errorf("--valid-for %v: give a positive duration, such as 8760h", validFor)
			}
			ca, caKey, err := loadCA(caDir)
			if err != nil {
				return err
			}
			key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				return err
			}
			now := time.Now()
			tmpl := &x509.Certificate{
				SerialNumber: randomSerial(), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(validFor),
				KeyUsage: x509.KeyUsageDigitalSignature,
			}
			name := device
			if device != "" {
				tmpl.Subject.CommonName = device
				tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
			} else {
				name = "server"
				tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
				for _, h := range strings.Split(server, ",") {
					if h = strings.TrimSpace(h); h == "" {
						continue
					}
					if ip := net.ParseIP(h); ip != nil {
						tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
					} else {
						tmpl.DNSNames = append(tmpl.DNSNames, h)
					}
					if h == "localhost" {
						tmpl.IPAddresses = append(tmpl.IPAddresses, net.IPv4(127, 0, 0, 1), net.IPv6loopback)
					}
				}
				tmpl.Subject.CommonName = strings.TrimSpace(strings.Split(server, ",")[0])
			}
			if strings.ContainsAny(name, `/\`) || name == "." || name == ".." {
				return fmt.Errorf("--device %q cannot name a file; twin ids are made of [A-Za-z0-9._:-]", name)
			}
			if _, err := os.Stat(filepath.Join(out, name+".pem")); err == nil && !force {
				return fmt.Errorf("%s exists: its device may still use it; revoke it first if it is to go, and give --force to replace the files", filepath.Join(out, name+".pem"))
			}
			der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
			if err != nil {
				return err
			}
			if err := writeCertAndKey(out, name+".pem", name+"-key.pem", der, key); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s and %s (serial %s)\n",
				filepath.Join(out, name+".pem"), filepath.Join(out, name+"-key.pem"), tmpl.SerialNumber)
			return nil
		},
	}
	cmd.Flags().StringVar(&caDir, "ca", "", "directory of the authority (from 'twinctl cert ca')")
	cmd.Flags().StringVar(&device, "device", "", "issue a device certificate for this device id")
	cmd.Flags().StringVar(&server, "server", "", "issue a server certificate for these host names and IP addresses (comma-separated)")
	cmd.Flags().StringVar(&out, "out", "", "directory to write the certificate and its key to (made if missing)")
	cmd.Flags().DurationVar(&validFor, "valid-for", 365*24*time.Hour, "how long the certificate is valid")
	cmd.Flags().BoolVar(&force, "force", false, "replace a certificate and key of the same name in --out")
	return cmd
}

func certRevokeCmd() *cobra.Command {
	var caDir string
	var validFor time.Duration
	cmd := &cobra.Command{
		Use:   "revoke --ca DIR CERT.pem...",
		Short: "Add certificates to the authority's revocation list, DIR/crl.pem (made if missing)",
		Long: `Add certificates issued by the authority in --ca DIR to its revocation
list, DIR/crl.pem, making it if missing. Without certificates, it renews
the list as it is. A twind run with --device-crl DIR/crl.pem reads it again
on SIGHUP and ends the streams of the devices it now revokes.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if caDir == "" {
				return errors.New("--ca DIR is required")
			}
			ca, caKey, err := loadCA(caDir)
			if err != nil {
				return err
			}
			crlPath := filepath.Join(caDir, caCRLFile)
			number := big.NewInt(1)
			var entries []x509.RevocationListEntry
			listed := map[string]bool{}
			if b, err := os.ReadFile(crlPath); err == nil {
				blk, _ := pem.Decode(b)
				if blk == nil || blk.Type != "X509 CRL" {
					return fmt.Errorf("%s: not a PEM revocation list", crlPath)
				}
				old, err := x509.ParseRevocationList(blk.Bytes)
				if err != nil {
					return fmt.Errorf("%s: %w", crlPath, err)
				}
				if err := old.CheckSignatureFrom(ca); err != nil {
					return fmt.Errorf("%s is not signed by the authority in %s: %w", crlPath, caDir, err)
				}
				entries = old.RevokedCertificateEntries
				for _, e := range entries {
					listed[e.SerialNumber.String()] = true
				}
				if old.Number != nil {
					number.Add(old.Number, big.NewInt(1))
				}
			} else if !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			now := time.Now()
			for _, path := range args {
				c, err := readCert(path)
				if err != nil {
					return err
				}
				if err := c.CheckSignatureFrom(ca); err != nil {
					return fmt.Errorf("%s was not issued by the authority in %s", path, caDir)
				}
				serial := c.SerialNumber.String()
				if listed[serial] {
					fmt.Fprintf(cmd.OutOrStdout(), "%s (serial %s, %q) is revoked already\n", path, serial, c.Subject.CommonName)
					continue
				}
				listed[serial] = true
				entries = append(entries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: now})
				fmt.Fprintf(cmd.OutOrStdout(), "revoked %s (serial %s, %q)\n", path, serial, c.Subject.CommonName)
			}
			der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
				Number: number, ThisUpdate: now, NextUpdate: now.Add(validFor), RevokedCertificateEntries: entries,
			}, ca, caKey)
			if err != nil {
				return err
			}
			if err := writeFileAtomic(crlPath, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o644); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s, revoking %d certificate(s); send twind SIGHUP to apply it\n", crlPath, len(entries))
			return nil
		},
	}
	cmd.Flags().StringVar(&caDir, "ca", "", "directory of the authority (from 'twinctl cert ca')")
	cmd.Flags().DurationVar(&validFor, "valid-for", 30*24*time.Hour, "how long until the list's next update is due")
	return cmd
}

// randomSerial returns a random 128-bit serial number.
func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		panic(err) // crypto/rand does not fail
	}
	return n.Add(n, big.NewInt(1))
}

// loadCA reads the authority in dir.
func loadCA(dir string) (*x509.Certificate, crypto.Signer, error) {
	ca, err := readCert(filepath.Join(dir, caCertFile))
	if err != nil {
		return nil, nil, err
	}
	b, err := os.ReadFile(filepath.Join(dir, caKeyFile))
	if err != nil {
		return nil, nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, nil, fmt.Errorf("%s: no PEM key", filepath.Join(dir, caKeyFile))
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", filepath.Join(dir, caKeyFile), err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("%s: not a signing key", filepath.Join(dir, caKeyFile))
	}
	return ca, signer, nil
}

func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: not a PEM certificate", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// writeCertAndKey writes a certificate and its key (PKCS #8, readable by
// the owner only) as PEM files in dir.
func writeCertAndKey(dir, certName, keyName string, der []byte, key *ecdsa.PrivateKey) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(dir, keyName), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, certName), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

// writeFileAtomic writes a file whole or not at all, so that a twind
// reading it on SIGHUP never sees half of it.
func writeFileAtomic(path string, b []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
