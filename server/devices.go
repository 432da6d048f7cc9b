package server

import (
	"context"
	"errors"
	"google.golang.org/genproto/googleapis/rpc/code"
	"io"
	"log/slog"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// deviceService implements twinv1.DeviceServiceServer: one bidirectional
// stream per connected device.
type deviceService struct {
	twinv1.UnimplementedDeviceServiceServer
	s *Server
	// readers counts the streams' readers, which may outlive their
	// handlers by a moment; Shutdown waits for them.
	readers sync.WaitGroup
	// reportStarted, if set (by tests), is called each time a stream hands
	// a report to the engine, with the stream's reports then in flight.
	reportStarted func(deviceID string, inFlight int)

	// refusals and ends log streams refused at hello and streams that
	// ended, sampled so that a misbehaving fleet cannot flood the log.
	refusals, ends *sampledLog
	// hellos bounds the streams waiting for their hello.
	hellos *helloGate
}

// logEnd logs why a device's stream ended: at info level when the device
// or the server ended it in the normal way, at warn level when the device
// was cut off (fell behind, token revoked, replaced).
func (ds *deviceService) logEnd(id string, err error) {
	st := status.Convert(err)
	level := slog.LevelInfo
	switch st.Code() {
	case codes.ResourceExhausted, codes.Unauthenticated, codes.Aborted, codes.Internal, codes.InvalidArgument:
		level = slog.LevelWarn
	}
	reason := "the device closed the stream"
	if err != nil {
		reason = st.Message()
	}
	ds.ends.log(ds.s.opts.Logger, level, "device disconnected", "device", id, "code", st.Code().String(), "reason", reason)
}

// logRefused logs a stream refused before it was accepted.
func (ds *deviceService) logRefused(ctx context.Context, err error) {
	addr := ""
	if p, ok := peer.FromContext(ctx); ok {
		addr = p.Addr.String()
	}
	ds.refusals.log(ds.s.opts.Logger, slog.LevelWarn, "device stream refused", "peer", addr, "reason", status.Convert(err).Message())
}

// session is a device's stream as the engine sees it: a twin.Sink with an
// outbox that the stream's writer empties. The engine never waits on it.
//
// The outbox holds what the device has not been sent yet: the welcome, the
// commands in order, and at most one desired update. Commands need no bound
// of their own: the engine bounds each device's unfinished commands
// (twin.Options.CommandQueueLimit), and each goes to a stream at most twice
// (sent, then canceled), so a device always gets its whole backlog. A
// desired update waiting to be sent absorbs every later desired change: a
// device needs only the latest desired state, so a device that reads, however
// slowly, never falls behind. A device that does not read at all is cut off
// when a send has waited for it longer than the send timeout; its commands
// stay queued for its next stream.
type session struct {
	deviceID    string
	lastVer     int64
	sendTimeout time.Duration
	created     time.Time // the origin of sendStart

	wake   chan struct{} // holds a token when the outbox has something new
	closed chan struct{} // closed once closeErr is set

	// mu protects welcome, out, desiredAt and closeErr.
	mu        sync.Mutex
	welcome   *twin.Twin
	out       []outItem // commands and the pending desired update, in commit order
	desiredAt int       // the index in out of the pending desired update; -1 if none
	closeErr  error     // why the stream ends; set once

	// sendStart is when the writer's Send in progress began, as nanoseconds
	// since created plus one; 0 while no Send is in progress. sendTimer
	// checks it.
	sendStart atomic.Int64
	sendTimer *time.Timer
	// stuck says the send timer cut the device off while a Send waited
	// for it.
	stuck atomic.Bool
}

// outItem is a command or the pending desired update.
type outItem struct {
	cmd *twin.Command
	// desired is the twin after the latest desired change the update
	// carries; changes counts those changes, and patch is the change while
	// it is the only one.
	desired *twin.Twin
	patch   twin.Document
	changes int
}

func newSession(deviceID string, lastVer int64, sendTimeout time.Duration) *session {
	ss := &session{
		deviceID: deviceID, lastVer: lastVer, sendTimeout: sendTimeout, created: time.Now(),
		wake: make(chan struct{}, 1), closed: make(chan struct{}), desiredAt: -1,
	}
	ss.sendTimer = time.AfterFunc(time.Hour, ss.checkSend)
	ss.sendTimer.Stop()
	return ss
}

// notify wakes the writer.
func (ss *session) notify() {
	select {
	case ss.wake <- struct{}{}:
	default:
	}
}

func (ss *session) Welcome(t *twin.Twin, cmds []*twin.Command) {
	ss.mu.Lock()
	if ss.closeErr == nil {
		ss.welcome = t
		for _, c := range cmds {
			ss.out = append(ss.out, outItem{cmd: c})
		}
	}
	ss.mu.Unlock()
	ss.notify()
}

func (ss *session) DesiredChanged(t *twin.Twin, patch twin.Document) {
	ss.mu.Lock()
	switch {
	case ss.closeErr != nil:
	case ss.desiredAt >= 0:
		// The update waiting to be sent now carries this change too. It
		// keeps its place, so that a command is never sent before a desired
		// change committed before it.
		it := &ss.out[ss.desiredAt]
		it.desired, it.patch = t, nil
		it.changes++
	default:
		ss.desiredAt = len(ss.out)
		ss.out = append(ss.out, outItem{desired: t, patch: patch, changes: 1})
	}
	ss.mu.Unlock()
	ss.notify()
}

func (ss *session) Commands(cmds []*twin.Command) {
	ss.mu.Lock()
	if ss.closeErr == nil {
		for _, c := range cmds {
			ss.out = append(ss.out, outItem{cmd: c})
		}
	}
	ss.mu.Unlock()
	ss.notify()
}

// Close ends the stream with err, translated to the status the device gets.
func (ss *session) Close(err error) { ss.end(err) }

// end closes the session with err unless it is closed already, and reports
// whether it did.
func (ss *session) end(err error) bool {
	switch {
	case err == nil:
		err = status.Error(codes.Aborted, "the stream ended")
	case errors.Is(err, twin.ErrReplaced):
		err = status.Errorf(codes.Aborted, "a newer stream of device %q replaced this one", ss.deviceID)
	case errors.Is(err, twin.ErrTokenRevoked):
		err = status.Errorf(codes.Unauthenticated, "the device token was revoked; reconnect with the new token")
	case errors.Is(err, twin.ErrNotFound):
		err = status.Errorf(codes.NotFound, "%v", err)
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.closeErr != nil {
		return false
	}
	ss.closeErr = err
	ss.welcome, ss.out, ss.desiredAt = nil, nil, -1
	close(ss.closed)
	return true
}

// err returns why the session was closed; nil while it is open.
func (ss *session) err() error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.closeErr
}

// take empties the outbox into buf and returns the welcome, if it has not
// been taken yet, and the items in order.
func (ss *session) take(buf []outItem) (*twin.Twin, []outItem) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	w, items := ss.welcome, ss.out
	ss.welcome, ss.out, ss.desiredAt = nil, buf[:0], -1
	return w, items
}

// checkSend runs when the send timer fires: it cuts off the device if the
// Send in progress has waited for it longer than the send timeout.
func (ss *session) checkSend() {
	start := ss.sendStart.Load()
	if start == 0 || time.Since(ss.created)-time.Duration(start-1) < ss.sendTimeout {
		return // that Send returned; a later one rearmed the timer
	}
	ss.stuck.Store(true)
	ss.end(status.Errorf(codes.ResourceExhausted,
		"device %q fell behind: it read nothing for %v; its unfinished commands are sent again when it reconnects",
		ss.deviceID, ss.sendTimeout))
}

// pendingReport is a report (or a desired ack) handed to the engine whose
// answer the writer has not taken yet. Each holds one of its stream's
// report slots.
type pendingReport struct {
	seq    int64
	p      twin.Pending
	silent bool // a desired ack: the device gets no answer
	// refused, if set, holds the answer of a report refused before it
	// reached the engine (over the device's report rate).
	refused chan twin.Result
}

// done delivers the report's answer.
func (pr pendingReport) done() <-chan twin.Result {
	if pr.refused != nil {
		return pr.refused
	}
	return pr.p.Done()
}

// errStreamGone says that the engine refused a report because the stream
// is no longer the device's current one (twin.ErrStreamClosed).
var errStreamGone = errors.New("server: the stream is no longer the device's current stream")

// errStreamEnded stops a reader whose handler has returned.
var errStreamEnded = errors.New("server: the stream ended")

// Connect serves one device stream. See the DeviceService documentation in
// device.proto for the protocol.
//
// Two goroutines serve a stream besides this one: the reader applies what
// the device sends (reports go to the engine without waiting, at most
// Options.DeviceReportWindow at a time), and the writer sends, in order, the
// acks of those reports once they are durable and what the engine queues
// for the device. The handler returns only after the writer has returned
// (gRPC forbids a Send after it) and the reader has stopped acting: a reader
// waiting in Recv can only be woken by the handler's return, and then does
// nothing but end; Shutdown waits for it.
func (ds *deviceService) Connect(stream twinv1.DeviceService_ConnectServer) error {
	s := ds.s
	ctx, cancel := s.streamContext(stream.Context())
	defer cancel()

	leaveHello, err := ds.hellos.enter(ctx)
	if err != nil {
		ds.logRefused(ctx, err)
		return err
	}
	hello := make(chan *twinv1.ConnectRequest, 1)
	start := make(chan *session, 1) // the session once authenticated; closed otherwise
	readErr := make(chan error, 1)  // why the reader stopped; io.EOF when the device closed its side
	window := s.opts.DeviceReportWindow
	slots := make(chan struct{}, window)        // a token per report in the engine
	pending := make(chan pendingReport, window) // never full: each holds a slot
	gate := &readGate{}
	ds.readers.Add(1)
	go func() {
		defer ds.readers.Done()
		m, err := stream.Recv()
		if err != nil {
			readErr <- err
			return
		}
		hello <- m
		if ss, ok := <-start; ok {
			readErr <- ds.read(ctx, stream, ss, gate, pending, slots)
		}
	}()
	started := false
	defer func() {
		if !started {
			close(start)
		}
	}()

	h, cert, err := ds.awaitHello(ctx, hello, readErr)
	leaveHello()
	if err != nil {
		switch status.Code(err) {
		case codes.Unauthenticated, codes.PermissionDenied:
			ds.logRefused(ctx, err)
		}
		return err
	}
	id := h.GetDeviceId()
	ss := newSession(id, h.GetLastVersion(), s.opts.DeviceSendTimeout)
	defer ss.sendTimer.Stop()
	if cert != nil {
		// Revoking the certificate from now on ends the stream.
		if err := s.certs.track(ss, cert.key, cert.serial); err != nil {
			ds.logRefused(ctx, err)
			return err
		}
		defer s.certs.untrack(ss)
		_, err = s.engine.Connect(ctx, id, ss)
	} else {
		_, err = s.engine.ConnectWithToken(ctx, id, hashToken(h.GetToken()), ss)
	}
	if err != nil {
		// The connection may commit after all (the context ended while it
		// was queued): a disconnection queued behind it undoes it.
		ss.end(err)
		ds.disconnect(id, ss)
		return s.streamStatus("Connect", ctx, err)
	}
	started = true
	start <- ss
	writeErr := make(chan error, 1)
	go func() { writeErr <- ds.write(ctx, stream, ss, pending, slots) }()

	wrote := false
	err = nil
wait:
	for {
		select {
		case rerr := <-readErr:
			if errors.Is(rerr, io.EOF) {
				readErr = nil // the device closed its side: the writer answers what is left
				continue
			}
			err = s.streamStatus("Connect", ctx, rerr)
		case werr := <-writeErr:
			wrote = true
			if werr != nil {
				err = ds.writeStatus(ctx, ss, werr)
			}
		case <-ss.closed:
		case <-ctx.Done():
			err = s.streamStatus("Connect", ctx, ctx.Err())
		}
		break wait
	}
	if !ss.end(err) {
		err = ss.err() // the engine or the send timeout ended it first
	}
	cancel() // ends what the reader and the writer wait for, except a Send
	ds.disconnect(id, ss)
	if !wrote {
		// The writer ends once its Send in progress, if any, returns. A
		// Send to a device that reads nothing returns only when the
		// handler does: grpc-go then resets the stream, which fails the
		// Send at once (grpc-go issue 1229). So a writer cut off for not
		// reading, or one that has not ended within the send timeout, is
		// left to end by itself; it sends nothing more, and Shutdown waits
		// for it with the readers.
		wait := s.opts.DeviceSendTimeout
		if ss.stuck.Load() {
			wait = 0
		}
		t := time.NewTimer(wait)
		defer t.Stop()
		stuck := t.C
		select {
		case <-writeErr:
		case <-stuck:
			ds.readers.Add(1)
			go func() {
				defer ds.readers.Done()
				<-writeErr
			}()
		}
	}
	gate.close()
	ds.logEnd(id, err)
	return err
}

// disconnect marks the device offline if ss is still its stream, even when
// the stream's context is gone.
func (ds *deviceService) disconnect(id string, ss *session) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ds.s.engine.Disconnect(ctx, id, ss); err != nil && !errors.Is(err, twin.ErrClosed) && !errors.Is(err, twin.ErrNotFound) {
		ds.s.opts.Logger.Warn("recording a device's disconnection failed", "device", id, "err", err)
	}
}

// writeStatus translates the error that ended a stream's writer.
func (ds *deviceService) writeStatus(ctx context.Context, ss *session, err error) error {
	if !errors.Is(err, errStreamGone) {
		return ds.s.streamStatus("Connect", ctx, err)
	}
	// The engine closes the stream that it no longer counts as current
	// once the change that replaced it is durable: give the device that
	// reason (a newer stream, a revoked token) rather than a vaguer one.
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-ss.closed:
		return ss.err()
	case <-ctx.Done():
	case <-t.C:
	}
	return status.Error(codes.Aborted, "this stream is no longer the device's current stream: a newer stream replaced it or its token was revoked")
}

// readGate keeps a stream's reader from acting once the handler has
// returned: the reader holds it while it applies a message.
type readGate struct {
	mu     sync.Mutex
	closed bool // protected by mu
}

// enter reports whether the reader may apply a message; if so, it must
// call leave after.
func (g *readGate) enter() bool {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return false
	}
	return true
}

func (g *readGate) leave() { g.mu.Unlock() }

// close waits for the message being applied, if any, and stops the reader
// from applying more.
func (g *readGate) close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
}

// read applies the device's messages until the stream ends. Reports go to
// the engine without waiting for them, each taking one of the stream's
// report slots (a device with all of them in use waits, through gRPC's flow
// control); their pending answers go to the writer in order. It closes
// pending and returns io.EOF when the device closes its side.
func (ds *deviceService) read(ctx context.Context, stream twinv1.DeviceService_ConnectServer, ss *session, gate *readGate,
	pending chan<- pendingReport, slots chan struct{}) error {
	for {
		m, err := stream.Recv()
		if !gate.enter() {
			return errStreamEnded // the handler has returned
		}
		if err == nil {
			err = ds.apply(ctx, ss, m, pending, slots)
		} else if errors.Is(err, io.EOF) {
			close(pending)
		}
		gate.leave()
		if err != nil {
			return err
		}
	}
}

// apply applies one message of a device.
func (ds *deviceService) apply(ctx context.Context, ss *session, m *twinv1.ConnectRequest, pending chan<- pendingReport, slots chan struct{}) error {
	s := ds.s
	id := ss.deviceID
	switch msg := m.GetMsg().(type) {
	case *twinv1.ConnectRequest_Report:
		return ds.startReport(ctx, ss, pending, slots, pendingReport{seq: msg.Report.GetSeq()},
			twin.PatchRequest{ID: id, Patch: document(msg.Report.GetPatch()), Source: twin.SourceDevice, Stream: ss})
	case *twinv1.ConnectRequest_CommandUpdate:
		u := msg.CommandUpdate
		_, err := s.engine.UpdateCommand(ctx, id, twin.CommandUpdate{
			ID: u.GetCommandId(), State: twin.CommandState(u.GetState()), Result: documentOrNil(u.GetResult()), Message: u.GetMessage(),
			Stream: ss,
		})
		switch {
		case err == nil || ctx.Err() != nil:
		case errors.Is(err, twin.ErrInvalidArgument), errors.Is(err, twin.ErrLimit), errors.Is(err, twin.ErrInvalidPatch):
			// A device that sends an update no retry can fix (a state
			// it may not set, a result over the limits) has a bug: end
			// its stream with what to fix rather than drop the update
			// without a word. The command stays as it was, and is sent
			// again on the next stream.
			return status.Errorf(codes.InvalidArgument, "command update for %.140q refused: %v", u.GetCommandId(), err)
		default:
			// A late or repeated update is normal with at-least-once
			// delivery; the device needs no answer.
			s.opts.Logger.Debug("command update refused", "device", id, "command", u.GetCommandId(), "err", err)
		}
		return nil
	case *twinv1.ConnectRequest_DesiredAck:
		// Acknowledged implicitly: the twin shows desired_acked_version.
		return ds.startReport(ctx, ss, pending, slots, pendingReport{silent: true},
			twin.PatchRequest{ID: id, Patch: twin.Document{}, DesiredAckedVersion: msg.DesiredAck.GetVersion(), Source: twin.SourceDevice, Stream: ss})
	case *twinv1.ConnectRequest_Hello:
		return status.Error(codes.InvalidArgument, "hello may only be the first message of a stream")
	default:
		return status.Error(codes.InvalidArgument, "empty message: set one of report, command_update or desired_ack")
	}
}

// startReport hands a report to the engine once the stream has a free
// report slot, and its pending answer to the writer.
func (ds *deviceService) startReport(ctx context.Context, ss *session, pending chan<- pendingReport, slots chan struct{}, pr pendingReport, req twin.PatchRequest) error {
	select {
	case slots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	if ds.reportStarted != nil {
		ds.reportStarted(ss.deviceID, len(slots))
	}
	if !pr.silent && !ds.s.reports.allow(ss.deviceID) {
		// Answered in its turn, with an error; the stream goes on.
		pr.refused = make(chan twin.Result, 1)
		pr.refused <- twin.Result{Err: ds.s.reports.refusal(ss.deviceID)}
		pending <- pr
		return nil
	}
	p, err := ds.s.engine.StartReport(ctx, req)
	if err != nil {
		<-slots
		return err
	}
	pr.p = p
	pending <- pr // never blocks: pending holds at most one report per slot
	return nil
}

// write sends the acks of the device's reports, in order, once each is
// durable, and what the engine queued for the device, the welcome first. It
// returns nil once the device has closed its side and everything is
// answered, or once the session is closed.
func (ds *deviceService) write(ctx context.Context, stream twinv1.DeviceService_ConnectServer, ss *session, pending <-chan pendingReport, slots chan struct{}) error {
	w := &writer{ds: ds, stream: stream, ss: ss}
	// The welcome and the device's queued commands go first, before any ack.
	for !w.welcomed {
		select {
		case <-ss.wake:
			if err := w.flush(); err != nil {
				return err
			}
		case <-ss.closed:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	var queue []pendingReport
	in := pending
	for {
		if in == nil && len(queue) == 0 {
			return w.flush() // the device closed its side and has every answer
		}
		var head <-chan twin.Result
		if len(queue) > 0 {
			head = queue[0].done()
		}
		select {
		case p, ok := <-in:
			if !ok {
				in = nil
				continue
			}
			queue = append(queue, p)
		case r := <-head:
			pr := queue[0]
			queue[0] = pendingReport{}
			queue = queue[1:]
			<-slots
			if errors.Is(r.Err, twin.ErrStreamClosed) {
				return errStreamGone
			}
			if pr.silent {
				continue
			}
			ack := &twinv1.ReportAck{Seq: pr.seq}
			if r.Err != nil {
				st := status.Convert(ds.s.status("Connect", r.Err))
				if st.Code() == codes.Unavailable || st.Code() == codes.Internal {
					return st.Err()
				}
				// The code's canonical name, as device.proto says:
				// "INVALID_ARGUMENT", not Go's "InvalidArgument".
				ack.Error, ack.ErrorCode = st.Message(), code.Code(st.Code()).String()
			} else {
				ack.Version = r.Twin.Version
			}
			if err := w.send(&twinv1.ConnectResponse{Msg: &twinv1.ConnectResponse_ReportAck{ReportAck: ack}}); err != nil {
				return err
			}
		case <-ss.wake:
			if err := w.flush(); err != nil {
				return err
			}
		case <-ss.closed:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// writer is the state of a stream's writer.
type writer struct {
	ds       *deviceService
	stream   twinv1.DeviceService_ConnectServer
	ss       *session
	welcomed bool
	// base is the desired state the device has been sent: the welcome's,
	// then each desired update's.
	base twin.Document
	buf  []outItem // the outbox's spare buffer
}

// flush sends everything in the session's outbox, in order.
func (w *writer) flush() error {
	ss := w.ss
	welcome, items := ss.take(w.buf)
	defer func() {
		clear(items)
		w.buf = items[:0]
	}()
	if welcome != nil {
		w.welcomed = true
		w.base = welcome.Desired
		err := w.send(&twinv1.ConnectResponse{Msg: &twinv1.ConnectResponse_Welcome{Welcome: &twinv1.Welcome{
			Version:        welcome.Version,
			Desired:        structProto(welcome.Desired),
			Delta:          structProto(welcome.Delta),
			DesiredChanged: desiredVersion(welcome) > ss.lastVer,
			ConnectTime:    timestamppb.New(welcome.Presence.Since),
		}}})
		if err != nil {
			return err
		}
	}
	for _, it := range items {
		var m *twinv1.ConnectResponse
		if it.cmd != nil {
			m = &twinv1.ConnectResponse{Msg: &twinv1.ConnectResponse_Command{Command: commandProto(it.cmd)}}
		} else {
			patch := it.patch
			if it.changes > 1 {
				patch = diffPatch(w.base, it.desired.Desired)
			}
			w.base = it.desired.Desired
			m = &twinv1.ConnectResponse{Msg: &twinv1.ConnectResponse_DesiredUpdate{DesiredUpdate: &twinv1.DesiredUpdate{
				Version: it.desired.Version,
				Patch:   structProto(patch),
				Delta:   structProto(it.desired.Delta),
			}}}
		}
		if err := w.send(m); err != nil {
			return err
		}
	}
	return nil
}

// send sends one message, under the session's send timeout.
func (w *writer) send(m *twinv1.ConnectResponse) error {
	ss := w.ss
	select {
	case <-ss.closed:
		return nil // the writer ends at its next wait
	default:
	}
	ss.sendStart.Store(int64(time.Since(ss.created)) + 1)
	ss.sendTimer.Reset(ss.sendTimeout)
	err := w.stream.Send(m)
	ss.sendTimer.Stop()
	ss.sendStart.Store(0)
	return err
}

// diffPatch returns a merge patch that turns a into b (RFC 7396): keys of a
// missing from b become null, objects present in both are diffed, and
// everything else that differs is b's value. It never modifies a or b and
// may share b's values. Subtrees that a and b share are skipped without
// being walked.
func diffPatch(a, b twin.Document) twin.Document {
	out := twin.Document{}
	for k := range a {
		if _, ok := b[k]; !ok {
			out[k] = nil
		}
	}
	for k, bv := range b {
		av, had := a[k]
		bm, bObj := bv.(map[string]any)
		am, aObj := av.(map[string]any)
		switch {
		case !had:
			out[k] = bv
		case aObj && bObj:
			if sameMap(am, bm) {
				continue
			}
			if d := diffPatch(am, bm); len(d) > 0 {
				out[k] = d
			}
		case aObj != bObj || !equalValue(av, bv):
			out[k] = bv
		}
	}
	return out
}

// equalValue reports whether two JSON values that are not both objects are
// equal; it may report false for equal numbers of different Go types,
// which costs a redundant value in a patch, never a wrong one.
func equalValue(a, b any) bool {
	switch a := a.(type) {
	case string:
		b, ok := b.(string)
		return ok && a == b
	case float64:
		b, ok := b.(float64)
		return ok && a == b
	case bool:
		b, ok := b.(bool)
		return ok && a == b
	case nil:
		return b == nil
	}
	return reflect.DeepEqual(a, b)
}

// sameMap reports whether a and b are the same map (not merely equal).
func sameMap(a, b map[string]any) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}

// awaitHello reads the stream's first message and authenticates it: by the
// device's client certificate if it presented one (then cert is set), else
// by the hello's token.
func (ds *deviceService) awaitHello(ctx context.Context, in <-chan *twinv1.ConnectRequest, recvErr <-chan error) (h *twinv1.Hello, cert *liveCert, err error) {
	s := ds.s
	t := time.NewTimer(s.opts.HelloTimeout)
	defer t.Stop()
	var m *twinv1.ConnectRequest
	select {
	case m = <-in:
	case err := <-recvErr:
		if errors.Is(err, io.EOF) {
			return nil, nil, status.Error(codes.Unauthenticated, "stream closed before hello")
		}
		return nil, nil, s.streamStatus("Connect", ctx, err)
	case <-t.C:
		return nil, nil, status.Errorf(codes.Unauthenticated, "no hello within %v", s.opts.HelloTimeout)
	case <-ctx.Done():
		return nil, nil, s.streamStatus("Connect", ctx, ctx.Err())
	}
	h = m.GetHello()
	if h == nil {
		return nil, nil, status.Error(codes.Unauthenticated, "the first message must be a hello with device_id and token")
	}
	switch certID, key, serial, err := s.certs.identity(ctx); {
	case err == nil:
		if h.GetDeviceId() != certID {
			return nil, nil, status.Errorf(codes.PermissionDenied,
				"the client certificate (serial %s) is device %.130q's, but the hello names device %.130q; a certificate connects only its own device",
				serial, certID, h.GetDeviceId())
		}
		return h, &liveCert{key: key, serial: serial}, nil
	case !errors.Is(err, errNoDeviceCert):
		return nil, nil, err // a revoked certificate does not fall back to a token
	}
	if h.GetToken() == "" {
		return nil, nil, status.Error(codes.Unauthenticated, "hello has no token; issue one with TwinService.IssueDeviceToken")
	}
	if !s.deviceTokenValid(h.GetDeviceId(), h.GetToken()) {
		// The same answer for an unknown device and a wrong token, so
		// that a stranger cannot probe for device ids.
		return nil, nil, status.Errorf(codes.Unauthenticated, "device %.130q: unknown device or wrong token", h.GetDeviceId())
	}
	return h, nil, nil
}

// desiredVersion is the version of the twin's last desired change.
func desiredVersion(t *twin.Twin) int64 {
	var v int64
	for _, m := range t.DesiredMeta {
		v = max(v, m.Version)
	}
	for _, tv := range t.Tombstones {
		v = max(v, tv)
	}
	return v
}

// documentOrNil converts an optional Struct; nil stays nil.
func documentOrNil(s *structpb.Struct) twin.Document {
	if s == nil {
		return nil
	}
	return document(s) // keeps NaN a number, which the engine refuses
}
