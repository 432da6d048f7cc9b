package server

import (
	"context"
	"crypto/subtle"
	"errors"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
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
}

// outItem is one message waiting in a session's send queue. It is converted
// to protobuf by the stream's goroutine, not by the engine's.
type outItem struct {
	welcome *twin.Twin
	desired *twin.Twin
	patch   twin.Document
	cmd     *twin.Command
}

// session is a device's stream as the engine sees it: a twin.Sink with a
// bounded send queue. The engine never waits on it: a device whose queue is
// full is disconnected, and its commands stay queued for its next stream.
type session struct {
	deviceID   string
	lastVer    int64
	sendQ      chan outItem
	closedOnce sync.Once
	closed     chan struct{}
	closeErr   error // set before closed is closed
}

func newSession(deviceID string, lastVer int64, queue int) *session {
	return &session{deviceID: deviceID, lastVer: lastVer, sendQ: make(chan outItem, queue), closed: make(chan struct{})}
}

func (ss *session) push(it outItem) {
	select {
	case ss.sendQ <- it:
	default:
		ss.Close(status.Errorf(codes.ResourceExhausted,
			"device %q fell behind: %d messages waiting to be sent; its commands stay queued, reconnect to receive them",
			ss.deviceID, cap(ss.sendQ)))
	}
}

func (ss *session) Welcome(t *twin.Twin, cmds []*twin.Command) {
	ss.push(outItem{welcome: t})
	for _, c := range cmds {
		ss.push(outItem{cmd: c})
	}
}

func (ss *session) DesiredChanged(t *twin.Twin, patch twin.Document) {
	ss.push(outItem{desired: t, patch: patch})
}

func (ss *session) Commands(cmds []*twin.Command) {
	for _, c := range cmds {
		ss.push(outItem{cmd: c})
	}
}

func (ss *session) Close(err error) {
	ss.closedOnce.Do(func() {
		switch {
		case errors.Is(err, twin.ErrReplaced):
			err = status.Errorf(codes.Aborted, "a newer stream of device %q replaced this one", ss.deviceID)
		case errors.Is(err, twin.ErrNotFound):
			err = status.Errorf(codes.NotFound, "%v", err)
		}
		ss.closeErr = err
		close(ss.closed)
	})
}

// pendingReport is a report handed to the engine whose ack is not sent yet.
type pendingReport struct {
	seq int64
	p   twin.Pending
}

// maxPending bounds the reports of one stream waiting for their acks; a
// device with more in flight waits, through gRPC's flow control.
const maxPending = 1024

// Connect serves one device stream. See the DeviceService documentation in
// device.proto for the protocol.
//
// Two goroutines serve a stream besides this one: the reader applies what
// the device sends (reports go to the engine without waiting), and the
// writer sends, in order, the acks of those reports once they are durable
// and what the engine queues for the device. The handler waits for either
// to end; both end when the stream does.
func (ds *deviceService) Connect(stream twinv1.DeviceService_ConnectServer) error {
	s := ds.s
	ctx, cancel := s.streamContext(stream.Context())
	defer cancel()

	hello := make(chan *twinv1.ConnectRequest, 1)
	start := make(chan *session, 1) // the session once authenticated; closed otherwise
	readErr := make(chan error, 1)  // why the reader stopped; io.EOF when the device closed its side
	pending := make(chan pendingReport, maxPending)
	go func() {
		m, err := stream.Recv()
		if err != nil {
			readErr <- err
			return
		}
		hello <- m
		if ss, ok := <-start; ok {
			readErr <- ds.read(ctx, stream, ss.deviceID, pending)
		}
	}()
	started := false
	defer func() {
		if !started {
			close(start)
		}
	}()

	h, err := ds.awaitHello(ctx, hello, readErr)
	if err != nil {
		return err
	}
	id := h.GetDeviceId()
	ss := newSession(id, h.GetLastVersion(), s.opts.DeviceSendQueue)
	if _, err := s.engine.Connect(ctx, id, ss); err != nil {
		return s.streamStatus("Connect", ctx, err)
	}
	defer func() {
		// Mark the device offline even when the stream's context is gone.
		dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer dcancel()
		if err := s.engine.Disconnect(dctx, id, ss); err != nil && !errors.Is(err, twin.ErrClosed) && !errors.Is(err, twin.ErrNotFound) {
			s.opts.Logger.Warn("recording a device's disconnection failed", "device", id, "err", err)
		}
	}()
	started = true
	start <- ss
	writeErr := make(chan error, 1)
	go func() { writeErr <- ds.write(ctx, stream, ss, pending) }()

	for {
		select {
		case err := <-readErr:
			if !errors.Is(err, io.EOF) {
				return s.streamStatus("Connect", ctx, err)
			}
			readErr = nil // the device closed its side: the writer answers what is left
		case err := <-writeErr:
			if err != nil {
				return s.streamStatus("Connect", ctx, err)
			}
			return nil // everything answered after the device closed its side
		case <-ss.closed:
			return ss.closeErr
		case <-ctx.Done():
			return s.streamStatus("Connect", ctx, ctx.Err())
		}
	}
}

// read applies the device's messages until the stream ends. Reports go to
// the engine without waiting for them; their pending answers go to the
// writer in order. It closes pending and returns io.EOF when the device
// closes its side.
func (ds *deviceService) read(ctx context.Context, stream twinv1.DeviceService_ConnectServer, id string, pending chan<- pendingReport) error {
	s := ds.s
	for {
		m, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				close(pending)
			}
			return err
		}
		switch msg := m.GetMsg().(type) {
		case *twinv1.ConnectRequest_Report:
			p, err := s.engine.StartReport(ctx, twin.PatchRequest{ID: id, Patch: document(msg.Report.GetPatch()), Source: twin.SourceDevice})
			if err != nil {
				return err
			}
			select {
			case pending <- pendingReport{seq: msg.Report.GetSeq(), p: p}:
			case <-ctx.Done():
				return ctx.Err()
			}
		case *twinv1.ConnectRequest_CommandUpdate:
			u := msg.CommandUpdate
			_, err := s.engine.UpdateCommand(ctx, id, twin.CommandUpdate{
				ID: u.GetCommandId(), State: twin.CommandState(u.GetState()), Result: documentOrNil(u.GetResult()), Message: u.GetMessage(),
			})
			if err != nil {
				// A late or repeated update is normal with at-least-once
				// delivery; the device needs no answer.
				s.opts.Logger.Debug("command update refused", "device", id, "command", u.GetCommandId(), "err", err)
			}
		case *twinv1.ConnectRequest_DesiredAck:
			// Acknowledged implicitly: the twin shows desired_acked_version.
			_, err := s.engine.StartReport(ctx, twin.PatchRequest{ID: id, Patch: twin.Document{},
				DesiredAckedVersion: msg.DesiredAck.GetVersion(), Source: twin.SourceDevice})
			if err != nil {
				return err
			}
		case *twinv1.ConnectRequest_Hello:
			return status.Error(codes.InvalidArgument, "hello may only be the first message of a stream")
		default:
			return status.Error(codes.InvalidArgument, "empty message: set one of report, command_update or desired_ack")
		}
	}
}

// write sends the acks of the device's reports, in order, once each is
// durable, and what the engine queued for the device. It returns nil once
// the device has closed its side and everything is answered.
func (ds *deviceService) write(ctx context.Context, stream twinv1.DeviceService_ConnectServer, ss *session, pending <-chan pendingReport) error {
	// The welcome and the device's queued commands were queued before the
	// stream started: they go first, before any ack.
	for queued := len(ss.sendQ); queued > 0; queued-- {
		if err := stream.Send(ds.message(ss, <-ss.sendQ)); err != nil {
			return err
		}
	}
	var queue []pendingReport
	in := pending
	for {
		if in == nil && len(queue) == 0 {
			for {
				select {
				case it := <-ss.sendQ:
					if err := stream.Send(ds.message(ss, it)); err != nil {
						return err
					}
				default:
					return nil
				}
			}
		}
		var head <-chan twin.Result
		if len(queue) > 0 {
			head = queue[0].p.Done()
		}
		select {
		case p, ok := <-in:
			if !ok {
				in = nil
				continue
			}
			queue = append(queue, p)
		case r := <-head:
			ack := &twinv1.ReportAck{Seq: queue[0].seq}
			queue = queue[1:]
			if r.Err != nil {
				st := status.Convert(ds.s.status("Connect", r.Err))
				if st.Code() == codes.Unavailable || st.Code() == codes.Internal {
					return st.Err()
				}
				ack.Error, ack.ErrorCode = st.Message(), st.Code().String()
			} else {
				ack.Version = r.Twin.Version
			}
			if err := stream.Send(&twinv1.ConnectResponse{Msg: &twinv1.ConnectResponse_ReportAck{ReportAck: ack}}); err != nil {
				return err
			}
		case it := <-ss.sendQ:
			if err := stream.Send(ds.message(ss, it)); err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// awaitHello reads the stream's first message and authenticates it.
func (ds *deviceService) awaitHello(ctx context.Context, in <-chan *twinv1.ConnectRequest, recvErr <-chan error) (*twinv1.Hello, error) {
	s := ds.s
	t := time.NewTimer(s.opts.HelloTimeout)
	defer t.Stop()
	var m *twinv1.ConnectRequest
	select {
	case m = <-in:
	case err := <-recvErr:
		if errors.Is(err, io.EOF) {
			return nil, status.Error(codes.Unauthenticated, "stream closed before hello")
		}
		return nil, s.streamStatus("Connect", ctx, err)
	case <-t.C:
		return nil, status.Errorf(codes.Unauthenticated, "no hello within %v", s.opts.HelloTimeout)
	case <-ctx.Done():
		return nil, s.streamStatus("Connect", ctx, ctx.Err())
	}
	h := m.GetHello()
	if h == nil {
		return nil, status.Error(codes.Unauthenticated, "the first message must be a hello with device_id and token")
	}
	if h.GetToken() == "" {
		return nil, status.Error(codes.Unauthenticated, "hello has no token; issue one with TwinService.IssueDeviceToken")
	}
	tw, err := s.engine.Get(h.GetDeviceId())
	if err != nil || tw.TokenHash == nil || subtle.ConstantTimeCompare(tw.TokenHash, hashToken(h.GetToken())) != 1 {
		// The same answer for an unknown device and a wrong token, so
		// that a stranger cannot probe for device ids.
		return nil, status.Errorf(codes.Unauthenticated, "device %.130q: unknown device or wrong token", h.GetDeviceId())
	}
	return h, nil
}

// message converts a queued item to the message a device receives.
func (ds *deviceService) message(ss *session, it outItem) *twinv1.ConnectResponse {
	switch {
	case it.welcome != nil:
		t := it.welcome
		return &twinv1.ConnectResponse{Msg: &twinv1.ConnectResponse_Welcome{Welcome: &twinv1.Welcome{
			Version:        t.Version,
			Desired:        structProto(t.Desired),
			Delta:          structProto(t.Delta),
			DesiredChanged: desiredVersion(t) > ss.lastVer,
			ConnectTime:    timestamppb.New(t.Presence.Since),
		}}}
	case it.desired != nil:
		return &twinv1.ConnectResponse{Msg: &twinv1.ConnectResponse_DesiredUpdate{DesiredUpdate: &twinv1.DesiredUpdate{
			Version: it.desired.Version,
			Patch:   structProto(it.patch),
			Delta:   structProto(it.desired.Delta),
		}}}
	default:
		return &twinv1.ConnectResponse{Msg: &twinv1.ConnectResponse_Command{Command: commandProto(it.cmd)}}
	}
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
	return s.AsMap()
}
