// Package twind is the Go client of twind: a thin, idiomatic layer over the
// generated gRPC stubs for operators (twins, commands, rules, watches) and
// a device session that keeps a device connected, reporting state and
// receiving desired changes and commands.
//
// The generated clients are exposed as fields for everything the helpers do
// not cover; the helpers take and return plain Go maps for JSON documents.
package twind

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"iter"
	"math/rand/v2"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// Client talks to a twind server. It is safe for concurrent use.
type Client struct {
	conn *grpc.ClientConn

	Twins    twinv1.TwinServiceClient
	Commands twinv1.CommandServiceClient
	Rules    twinv1.RuleServiceClient
	Devices  twinv1.DeviceServiceClient
	Keys     twinv1.KeyServiceClient
	Cluster  twinv1.ClusterServiceClient
}

// Dial connects to a server at addr ("localhost:50051"). Without transport
// options the connection is plaintext, as twind serves by default.
func Dial(addr string, opts ...grpc.DialOption) (*Client, error) {
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("twind: dial %s: %w", addr, err)
	}
	return New(conn), nil
}

// New returns a client over an existing connection, which the caller still
// owns: Close closes it.
func New(conn *grpc.ClientConn) *Client {
	return &Client{
		conn:     conn,
		Twins:    twinv1.NewTwinServiceClient(conn),
		Commands: twinv1.NewCommandServiceClient(conn),
		Rules:    twinv1.NewRuleServiceClient(conn),
		Devices:  twinv1.NewDeviceServiceClient(conn),
		Keys:     twinv1.NewKeyServiceClient(conn),
		Cluster:  twinv1.NewClusterServiceClient(conn),
	}
}

// WithTLS makes the connection use TLS, trusting the certificate
// authorities in the PEM file caFile, or the system's if caFile is empty.
func WithTLS(caFile string) (grpc.DialOption, error) {
	cfg, err := tlsConfig(caFile)
	if err != nil {
		return nil, err
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(cfg)), nil
}

// WithClientCert is WithTLS with a client certificate: the device
// certificate and key (PEM files) of a device of a twind run with
// --device-ca. Such a device connects without a token: its Hello (and
// DeviceConfig) needs only its id, the certificate's name.
func WithClientCert(caFile, certFile, keyFile string) (grpc.DialOption, error) {
	cfg, err := tlsConfig(caFile)
	if err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("twind: client certificate: %w", err)
	}
	cfg.Certificates = []tls.Certificate{cert}
	return grpc.WithTransportCredentials(credentials.NewTLS(cfg)), nil
}

func tlsConfig(caFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("twind: no certificates in %s", caFile)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// WithToken makes every call carry an API key of the server (from twind's
// --api-keys, --api-token or KeyService.CreateKey) as 'authorization:
// Bearer <token>'; a device without a stream may send its own device token
// instead, for ReportState only. An empty token sends nothing.
func WithToken(token string) grpc.DialOption {
	return grpc.WithPerRPCCredentials(bearer(token))
}

// bearer is an API token sent with each call. twind serves plaintext on
// trusted networks by default, so it does not insist on TLS.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	if b == "" {
		return nil, nil
	}
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (b bearer) RequireTransportSecurity() bool { return false }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Struct converts a JSON-like map to a protobuf Struct. Numbers may be any
// Go integer or float type.
func Struct(m map[string]any) (*structpb.Struct, error) {
	if m == nil {
		return nil, nil
	}
	return structpb.NewStruct(m)
}

// CreateTwin creates a twin with a type and labels.
func (c *Client) CreateTwin(ctx context.Context, id, typ string, labels map[string]string) (*twinv1.Twin, error) {
	resp, err := c.Twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id, Type: typ, Labels: labels}})
	return resp.GetTwin(), err
}

// GetTwin returns a twin.
func (c *Client) GetTwin(ctx context.Context, id string) (*twinv1.Twin, error) {
	resp, err := c.Twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: id})
	return resp.GetTwin(), err
}

// UpdateDesired merges patch into a twin's desired state. expectedVersion 0
// means any version.
func (c *Client) UpdateDesired(ctx context.Context, id string, patch map[string]any, expectedVersion int64) (*twinv1.Twin, error) {
	p, err := Struct(patch)
	if err != nil {
		return nil, err
	}
	resp, err := c.Twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: id, Patch: p, ExpectedVersion: expectedVersion})
	return resp.GetTwin(), err
}

// ReportState merges patch into a twin's reported state, for devices
// without a stream.
func (c *Client) ReportState(ctx context.Context, id string, patch map[string]any) (*twinv1.Twin, error) {
	p, err := Struct(patch)
	if err != nil {
		return nil, err
	}
	resp, err := c.Twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: id, Patch: p})
	return resp.GetTwin(), err
}

// ListTwins iterates over the twins matching a CEL filter, page by page.
// The iteration stops at the first error, which it yields.
func (c *Client) ListTwins(ctx context.Context, filter string) iter.Seq2[*twinv1.Twin, error] {
	return func(yield func(*twinv1.Twin, error) bool) {
		tok := ""
		for {
			resp, err := c.Twins.ListTwins(ctx, &twinv1.ListTwinsRequest{Filter: filter, PageSize: 500, PageToken: tok})
			if err != nil {
				yield(nil, err)
				return
			}
			for _, t := range resp.Twins {
				if !yield(t, nil) {
					return
				}
			}
			if tok = resp.NextPageToken; tok == "" {
				return
			}
		}
	}
}

// Watch iterates over the changes of twins matching filter, from revision
// from (0: from now on). When the stream breaks for a reason that retrying
// can mend (the server restarting, the network), it resumes from the
// revision after the last one seen, so no change is missed or repeated. It
// stops at an error that retrying cannot mend, which it yields, or when ctx
// is done.
func (c *Client) Watch(ctx context.Context, filter string, from int64) iter.Seq2[*twinv1.TwinEvent, error] {
	return func(yield func(*twinv1.TwinEvent, error) bool) {
		if from <= 0 {
			// "From now on" is pinned to a revision, so that a resume
			// after a break misses nothing either.
			rev, err := c.currentRevision(ctx)
			if err != nil {
				yield(nil, err)
				return
			}
			from = rev + 1
		}
		b := backoff{min: 100 * time.Millisecond, max: 5 * time.Second}
		for {
			stream, err := c.Twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{Filter: filter, StartRevision: from})
			for err == nil {
				var m *twinv1.WatchTwinsResponse
				if m, err = stream.Recv(); err == nil {
					b.reset()
					from = m.Event.Revision + 1
					if !yield(m.Event, nil) {
						return
					}
				}
			}
			if ctx.Err() != nil || !retryable(err) {
				yield(nil, err)
				return
			}
			if !b.wait(ctx) {
				yield(nil, ctx.Err())
				return
			}
		}
	}
}

func (c *Client) currentRevision(ctx context.Context) (int64, error) {
	resp, err := c.Twins.ListTwins(ctx, &twinv1.ListTwinsRequest{Filter: "false", PageSize: 1})
	return resp.GetRevision(), err
}

// SendOptions are the optional parts of a command.
type SendOptions struct {
	TTL       time.Duration // 0 for the server's default
	RequestID string        // makes the send idempotent
	Wait      time.Duration // block up to this long for a final state
}

// SendCommand sends a command to a device.
func (c *Client) SendCommand(ctx context.Context, deviceID, name string, params map[string]any, o SendOptions) (*twinv1.Command, error) {
	p, err := Struct(params)
	if err != nil {
		return nil, err
	}
	req := &twinv1.SendCommandRequest{DeviceId: deviceID, Name: name, Params: p, RequestId: o.RequestID}
	if o.TTL > 0 {
		req.Ttl = durationpb.New(o.TTL)
	}
	if o.Wait > 0 {
		req.Wait = durationpb.New(o.Wait)
	}
	resp, err := c.Commands.SendCommand(ctx, req)
	return resp.GetCommand(), err
}

// IssueDeviceToken issues a new token for a device, revoking the old one.
func (c *Client) IssueDeviceToken(ctx context.Context, id string) (string, error) {
	resp, err := c.Twins.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: id})
	return resp.GetToken(), err
}

// retryable reports whether an error of a stream is worth retrying.
func retryable(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.Aborted, codes.ResourceExhausted, codes.Internal, codes.Unknown, codes.DeadlineExceeded:
		return true
	}
	return false
}

// IsNotFound reports whether err is a NOT_FOUND from the server.
func IsNotFound(err error) bool { return status.Code(err) == codes.NotFound }

// IsAlreadyExists reports whether err is an ALREADY_EXISTS from the server.
func IsAlreadyExists(err error) bool { return status.Code(err) == codes.AlreadyExists }

// backoff is exponential backoff with jitter.
type backoff struct {
	min, max, cur time.Duration
}

func (b *backoff) reset() { b.cur = 0 }

// wait sleeps for the next backoff interval and reports false if ctx ended
// first.
func (b *backoff) wait(ctx context.Context) bool {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur = min(2*b.cur, b.max)
	}
	d := b.cur/2 + time.Duration(rand.Int64N(int64(b.cur/2)+1))
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

var errNotConnected = errors.New("twind: device not connected")
