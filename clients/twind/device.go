package twind

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// DesiredChange tells a device what it should become.
type DesiredChange struct {
	// Version is the twin version of the change. The session acknowledges
	// it once the handler returns nil.
	Version int64
	// Full is true for the catch-up on (re)connection: Desired is then the
	// whole desired document. Otherwise Patch is what changed.
	Full    bool
	Desired map[string]any
	Patch   map[string]any
	// Delta is what differs from reported state, with nil for keys to
	// remove.
	Delta map[string]any
}

// CommandResult is what a device's command handler answers.
type CommandResult struct {
	State   twinv1.CommandState // SUCCEEDED, FAILED or REJECTED
	Result  map[string]any
	Message string
}

// DeviceConfig configures a device session.
type DeviceConfig struct {
	DeviceID string
	// Token is the device token; empty for a device that dials with its
	// client certificate (WithClientCert).
	Token string
	// OnDesired is called, one at a time, for each change of desired state
	// and for the catch-up after each connection. Returning nil
	// acknowledges the version.
	OnDesired func(ctx context.Context, c DesiredChange) error
	// OnCommand is called, one command at a time and in order, for each
	// command; the session reports ACCEPTED before and the answer after.
	// Commands already answered in this session are not handed over
	// again (delivery is at least once).
	OnCommand func(ctx context.Context, cmd *twinv1.Command) CommandResult
	// Logger, default slog.Default().
	Logger *slog.Logger
	// MinBackoff and MaxBackoff bound the wait between reconnections.
	// Defaults 100ms and 10s.
	MinBackoff, MaxBackoff time.Duration
}

// DeviceSession keeps a device connected: it reconnects with backoff after
// every break, resumes from the last desired version it applied, reports
// state, and hands desired changes and commands to the handlers.
type DeviceSession struct {
	c   *Client
	cfg DeviceConfig

	// mu protects everything below.
	mu        sync.Mutex
	stream    twinv1.DeviceService_ConnectClient // nil while disconnected
	connected chan struct{}                      // closed while connected
	seq       int64
	pending   map[int64]chan reportResult
	applied   int64           // last desired version applied
	done      map[string]bool // commands answered in this session, the last maxDone
	doneOrder []string
	stopped   chan struct{} // closed when Run has returned
	stopErr   error         // why Run returned; set before stopped is closed
	sendMu    sync.Mutex    // serializes stream.Send
}

type reportResult struct {
	version int64
	err     error
}

// Device returns a session for a device; Run connects it.
func (c *Client) Device(cfg DeviceConfig) *DeviceSession {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 10 * time.Second
	}
	return &DeviceSession{c: c, cfg: cfg, connected: make(chan struct{}), pending: map[int64]chan reportResult{}, done: map[string]bool{},
		stopped: make(chan struct{})}
}

// Run keeps the device connected until ctx is done, or until the server
// refuses it for good, and returns why. It reconnects after every break,
// waiting between attempts with exponential backoff and jitter (MinBackoff
// doubling up to MaxBackoff, reset once a stream has lasted a minute): also
// after RESOURCE_EXHAUSTED, when the server cut off a device that did not
// read. It stops on UNAUTHENTICATED (a wrong or revoked token: retrying
// will not make it work; issue a new token), PERMISSION_DENIED, NOT_FOUND
// (the twin was deleted) and INVALID_ARGUMENT. Once Run has returned,
// Report fails with its error. Run may be called once.
func (s *DeviceSession) Run(ctx context.Context) (err error) {
	defer func() {
		s.mu.Lock()
		s.stopErr = err
		close(s.stopped)
		s.mu.Unlock()
	}()
	b := backoff{min: s.cfg.MinBackoff, max: s.cfg.MaxBackoff}
	for {
		connectedAt := time.Now()
		err := s.serve(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch status.Code(err) {
		case codes.Unauthenticated, codes.PermissionDenied, codes.NotFound, codes.InvalidArgument:
			s.cfg.Logger.Error("device refused; not reconnecting", "device", s.cfg.DeviceID, "err", err)
			return err
		}
		if time.Since(connectedAt) > time.Minute {
			b.reset()
		}
		s.cfg.Logger.Info("device stream ended; reconnecting", "device", s.cfg.DeviceID, "err", err)
		if !b.wait(ctx) {
			return ctx.Err()
		}
	}
}

// ErrSessionStopped is returned, wrapping Run's error, by Report once Run
// has returned.
var ErrSessionStopped = errors.New("twind: the device session has stopped")

// Connected returns a channel that is closed while the session is
// connected.
func (s *DeviceSession) Connected() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.connected
}

// Report merges patch into the device's reported state and waits until it
// is durable. It waits for a connection if there is none. Once Run has
// returned, it fails with ErrSessionStopped wrapping Run's error (whose
// gRPC status, such as UNAUTHENTICATED, status.Code still finds).
func (s *DeviceSession) Report(ctx context.Context, patch map[string]any) (version int64, err error) {
	p, err := structpb.NewStruct(patch)
	if err != nil {
		return 0, err
	}
	select {
	case <-s.Connected():
	case <-s.stopped:
		return 0, s.stoppedErr()
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	s.mu.Lock()
	if s.stream == nil {
		s.mu.Unlock()
		return 0, errNotConnected
	}
	s.seq++
	seq, ch := s.seq, make(chan reportResult, 1)
	s.pending[seq] = ch
	stream := s.stream
	s.mu.Unlock()
	if err := s.send(stream, &twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: seq, Patch: p}}}); err != nil {
		s.mu.Lock()
		delete(s.pending, seq)
		s.mu.Unlock()
		return 0, err
	}
	select {
	case r := <-ch:
		return r.version, r.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// stoppedErr is what Report answers once Run has returned.
func (s *DeviceSession) stoppedErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Errorf("%w: %w", ErrSessionStopped, s.stopErr)
}

func (s *DeviceSession) send(stream twinv1.DeviceService_ConnectClient, m *twinv1.ConnectRequest) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return stream.Send(m)
}

// serve holds one stream until it breaks.
func (s *DeviceSession) serve(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := s.c.Devices.Connect(ctx)
	if err != nil {
		return err
	}
	s.mu.Lock()
	last := s.applied
	s.mu.Unlock()
	if err := s.send(stream, &twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{
		DeviceId: s.cfg.DeviceID, Token: s.cfg.Token, LastVersion: last}}}); err != nil {
		return err
	}
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	w := first.GetWelcome()
	if w == nil {
		return fmt.Errorf("twind: expected a welcome, got %v", first)
	}
	s.mu.Lock()
	s.stream = stream
	close(s.connected)
	s.mu.Unlock()
	defer s.disconnected()

	// Handlers run on their own goroutine, in order, so that acks keep
	// flowing while a command runs.
	work := make(chan func(), 256)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for f := range work {
			f()
		}
	}()
	defer func() { close(work); wg.Wait() }()

	if w.DesiredChanged || last == 0 {
		version, desired, delta := w.Version, w.Desired.AsMap(), w.Delta.AsMap()
		work <- func() {
			s.desired(ctx, stream, DesiredChange{Version: version, Full: true, Desired: desired, Delta: delta})
		}
	}
	for {
		m, err := stream.Recv()
		if err != nil {
			return err
		}
		switch msg := m.GetMsg().(type) {
		case *twinv1.ConnectResponse_ReportAck:
			ack := msg.ReportAck
			s.mu.Lock()
			ch := s.pending[ack.Seq]
			delete(s.pending, ack.Seq)
			s.mu.Unlock()
			if ch != nil {
				r := reportResult{version: ack.Version}
				if ack.Error != "" {
					r.err = fmt.Errorf("twind: report refused: %s (%s)", ack.Error, ack.ErrorCode)
				}
				ch <- r
			}
		case *twinv1.ConnectResponse_DesiredUpdate:
			u := msg.DesiredUpdate
			c := DesiredChange{Version: u.Version, Patch: u.Patch.AsMap(), Delta: u.Delta.AsMap()}
			work <- func() { s.desired(ctx, stream, c) }
		case *twinv1.ConnectResponse_Command:
			cmd := msg.Command
			work <- func() { s.command(ctx, stream, cmd) }
		}
	}
}

func (s *DeviceSession) desired(ctx context.Context, stream twinv1.DeviceService_ConnectClient, c DesiredChange) {
	if s.cfg.OnDesired != nil {
		if err := s.cfg.OnDesired(ctx, c); err != nil {
			s.cfg.Logger.Warn("desired change not applied", "device", s.cfg.DeviceID, "version", c.Version, "err", err)
			return
		}
	}
	s.mu.Lock()
	s.applied = max(s.applied, c.Version)
	s.mu.Unlock()
	s.send(stream, &twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_DesiredAck{DesiredAck: &twinv1.DesiredAck{Version: c.Version}}})
}

func (s *DeviceSession) command(ctx context.Context, stream twinv1.DeviceService_ConnectClient, cmd *twinv1.Command) {
	s.mu.Lock()
	seen := s.done[cmd.Id]
	s.mu.Unlock()
	if seen || cmd.State == twinv1.CommandState_COMMAND_STATE_CANCELED || cmd.State == twinv1.CommandState_COMMAND_STATE_EXPIRED {
		return
	}
	update := func(st twinv1.CommandState, result map[string]any, msg string) error {
		u := &twinv1.CommandUpdate{CommandId: cmd.Id, State: st, Message: msg}
		if result != nil {
			r, err := structpb.NewStruct(result)
			if err != nil {
				return err
			}
			u.Result = r
		}
		return s.send(stream, &twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_CommandUpdate{CommandUpdate: u}})
	}
	if s.cfg.OnCommand == nil {
		update(twinv1.CommandState_COMMAND_STATE_REJECTED, nil, "this device handles no commands")
		return
	}
	if err := update(twinv1.CommandState_COMMAND_STATE_ACCEPTED, nil, ""); err != nil {
		return
	}
	res := s.cfg.OnCommand(ctx, cmd)
	if res.State == twinv1.CommandState_COMMAND_STATE_UNSPECIFIED {
		res.State = twinv1.CommandState_COMMAND_STATE_SUCCEEDED
	}
	if err := update(res.State, res.Result, res.Message); err == nil {
		s.mu.Lock()
		s.done[cmd.Id] = true
		if s.doneOrder = append(s.doneOrder, cmd.Id); len(s.doneOrder) > maxDone {
			delete(s.done, s.doneOrder[0])
			s.doneOrder = s.doneOrder[1:]
		}
		s.mu.Unlock()
	}
}

// disconnected fails the reports in flight and marks the session
// disconnected.
func (s *DeviceSession) disconnected() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stream = nil
	s.connected = make(chan struct{})
	for seq, ch := range s.pending {
		ch <- reportResult{err: fmt.Errorf("%w: the stream broke before report %d was acknowledged; it may or may not have been applied", errNotConnected, seq)}
		delete(s.pending, seq)
	}
}

// maxDone bounds how many answered command ids a session remembers to
// skip redeliveries.
const maxDone = 1024

// ErrNotConnected is returned by Report when the stream breaks before the
// report is acknowledged.
var ErrNotConnected = errNotConnected
