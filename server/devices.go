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
	flushed chan struct{} // closed by the sender when it reaches this item
	ack     *twinv1.ReportAck
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

// Connect serves one device stream. See the DeviceService documentation in
// device.proto for the protocol.
func (ds *deviceService) Connect(stream twinv1.DeviceService_ConnectServer) error {
	s := ds.s
	ctx, cancel := s.streamContext(stream.Context())
	defer cancel()

	// The receiver ends when the stream does, which is when this handler
	// returns or the client goes away.
	in := make(chan *twinv1.ConnectRequest)
	recvErr := make(chan error, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case in <- m:
			case <-ctx.Done():
				recvErr <- ctx.Err()
				return
			}
		}
	}()

	hello, err := ds.awaitHello(ctx, in, recvErr)
	if err != nil {
		return err
	}
	id := hello.GetDeviceId()
	ss := newSession(id, hello.GetLastVersion(), s.opts.DeviceSendQueue)
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

	// The sender owns stream.Send. It may block on a device that does not
	// read; this goroutine then still notices the full queue and ends the
	// stream, which unblocks the sender.
	sendErr := make(chan error, 1)
	go func() {
		for {
			select {
			case it := <-ss.sendQ:
				if it.flushed != nil {
					close(it.flushed)
					continue
				}
				if err := stream.Send(ds.message(ss, it)); err != nil {
					sendErr <- err
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()

	// pending holds the reports handed to the engine, in order, until they
	// are durable and acknowledged.
	type pendingReport struct {
		seq int64
		p   twin.Pending
	}
	var pending []pendingReport
	const maxPending = 1024
	eof := false        // the device closed its side
	recvDone := recvErr // nil once the receiver has ended
	for {
		if eof && len(pending) == 0 {
			// Answer everything the device sent before it closed, then
			// end the stream cleanly.
			flushed := make(chan struct{})
			ss.push(outItem{flushed: flushed})
			select {
			case <-flushed:
				return nil
			case err := <-sendErr:
				return err
			case <-ss.closed:
				return ss.closeErr
			case <-ctx.Done():
				return s.streamStatus("Connect", ctx, ctx.Err())
			}
		}
		var head <-chan twin.Result
		if len(pending) > 0 {
			head = pending[0].p.Done()
		}
		inCh := in
		if len(pending) >= maxPending {
			inCh = nil // let the device wait for acks before reading more
		}
		select {
		case err := <-sendErr:
			return err
		case r := <-head:
			ack := &twinv1.ReportAck{Seq: pending[0].seq}
			pending = pending[1:]
			if r.Err != nil {
				st := status.Convert(s.status("Connect", r.Err))
				if st.Code() == codes.Unavailable || st.Code() == codes.Internal {
					return st.Err()
				}
				ack.Error, ack.ErrorCode = st.Message(), st.Code().String()
			} else {
				ack.Version = r.Twin.Version
			}
			ss.push(outItem{ack: ack})
		case m := <-inCh:
			switch msg := m.GetMsg().(type) {
			case *twinv1.ConnectRequest_Report:
				p, err := s.engine.StartReport(ctx, twin.PatchRequest{ID: id, Patch: document(msg.Report.GetPatch()), Source: twin.SourceDevice})
				if err != nil {
					return s.streamStatus("Connect", ctx, err)
				}
				pending = append(pending, pendingReport{seq: msg.Report.GetSeq(), p: p})
			case *twinv1.ConnectRequest_CommandUpdate:
				u := msg.CommandUpdate
				_, err := s.engine.UpdateCommand(ctx, id, twin.CommandUpdate{
					ID: u.GetCommandId(), State: twin.CommandState(u.GetState()), Result: documentOrNil(u.GetResult()), Message: u.GetMessage(),
				})
				if err != nil {
					// A late or repeated update is normal with
					// at-least-once delivery; the device needs no answer.
					s.opts.Logger.Debug("command update refused", "device", id, "command", u.GetCommandId(), "err", err)
				}
			case *twinv1.ConnectRequest_DesiredAck:
				p, err := s.engine.StartReport(ctx, twin.PatchRequest{ID: id, Patch: twin.Document{},
					DesiredAckedVersion: msg.DesiredAck.GetVersion(), Source: twin.SourceDevice})
				if err != nil {
					return s.streamStatus("Connect", ctx, err)
				}
				_ = p // acknowledged implicitly: the twin shows desired_acked_version
			case *twinv1.ConnectRequest_Hello:
				return status.Error(codes.InvalidArgument, "hello may only be the first message of a stream")
			default:
				return status.Error(codes.InvalidArgument, "empty message: set one of report, command_update or desired_ack")
			}
		case <-ss.closed:
			return ss.closeErr
		case err := <-recvDone:
			if errors.Is(err, io.EOF) {
				eof, recvDone = true, nil
				continue
			}
			return s.streamStatus("Connect", ctx, err)
		case <-ctx.Done():
			return s.streamStatus("Connect", ctx, ctx.Err())
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
	case it.ack != nil:
		return &twinv1.ConnectResponse{Msg: &twinv1.ConnectResponse_ReportAck{ReportAck: it.ack}}
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
