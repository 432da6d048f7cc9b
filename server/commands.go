package server

import (
	"context"
	"strconv"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// commandService implements twinv1.CommandServiceServer.
type commandService struct {
	twinv1.UnimplementedCommandServiceServer
	s *Server
}

// maxCommandWait bounds SendCommand's wait, as direct methods elsewhere
// bound theirs (Azure IoT Hub: 300 s).
const maxCommandWait = 5 * time.Minute

func (cs *commandService) SendCommand(ctx context.Context, req *twinv1.SendCommandRequest) (*twinv1.SendCommandResponse, error) {
	if err := req.GetTtl().CheckValid(); req.Ttl != nil && err != nil {
		return nil, invalid("ttl: %v", err)
	}
	if err := req.GetWait().CheckValid(); req.Wait != nil && err != nil {
		return nil, invalid("wait: %v", err)
	}
	if req.GetWait().AsDuration() < 0 || req.GetTtl().AsDuration() < 0 {
		return nil, invalid("wait and ttl must not be negative (wait %v, ttl %v); leave them out (or 0s) for no wait and the default ttl",
			req.GetWait().AsDuration(), req.GetTtl().AsDuration())
	}
	if w := req.GetWait().AsDuration(); w > maxCommandWait {
		return nil, invalid("wait is %v, at most %v; for longer, send without waiting and poll GetCommand", w, maxCommandWait)
	}
	if err := checkFinite("params", req.GetParams()); err != nil {
		return nil, err
	}
	cmd, err := cs.s.engine.SendCommand(ctx, twin.CommandRequest{
		DeviceID:  req.GetDeviceId(),
		Name:      req.GetName(),
		Params:    documentOrNil(req.GetParams()),
		TTL:       req.GetTtl().AsDuration(),
		RequestID: req.GetRequestId(),
		Source:    sourceOf(ctx, twin.SourceAPI),
	})
	if err != nil {
		return nil, cs.s.status("SendCommand", err)
	}
	if wait := req.GetWait().AsDuration(); wait > 0 && !cmd.State.Final() {
		// Shutdown ends the wait too: the answer is the command as it
		// then is.
		sctx, scancel := cs.s.streamContext(ctx)
		defer scancel()
		wctx, cancel := context.WithTimeout(sctx, wait)
		defer cancel()
		if cmd, err = cs.s.engine.WaitCommand(wctx, cmd.ID); err != nil {
			return nil, cs.s.status("SendCommand", err)
		}
	}
	return &twinv1.SendCommandResponse{Command: commandProto(cmd)}, nil
}

func (cs *commandService) GetCommand(ctx context.Context, req *twinv1.GetCommandRequest) (*twinv1.GetCommandResponse, error) {
	cmd, err := cs.s.engine.GetCommand(req.GetId())
	if err != nil {
		return nil, cs.s.status("GetCommand", err)
	}
	return &twinv1.GetCommandResponse{Command: commandProto(cmd)}, nil
}

func (cs *commandService) ListCommands(ctx context.Context, req *twinv1.ListCommandsRequest) (*twinv1.ListCommandsResponse, error) {
	size, err := pageSize(req.GetPageSize())
	if err != nil {
		return nil, err
	}
	if req.GetDeviceId() == "" {
		return nil, invalid("device_id is required")
	}
	var states []twin.CommandState
	query := "commands:" + req.GetDeviceId()
	for _, st := range req.GetStates() {
		if st == twinv1.CommandState_COMMAND_STATE_UNSPECIFIED || twinv1.CommandState_name[int32(st)] == "" {
			return nil, invalid("states: %v is not a command state", st)
		}
		states = append(states, twin.CommandState(st))
		query += ":" + st.String()
	}
	tok, err := decodePageToken(query, req.GetPageToken())
	if err != nil {
		return nil, err
	}
	var after int64
	if tok != "" {
		if after, err = strconv.ParseInt(tok, 10, 64); err != nil {
			return nil, invalid("page_token is not one this query returned; start again without a page_token")
		}
	}
	cmds, more, err := cs.s.engine.ListCommands(req.GetDeviceId(), states, after, size)
	if err != nil {
		return nil, cs.s.status("ListCommands", err)
	}
	resp := &twinv1.ListCommandsResponse{Commands: make([]*twinv1.Command, 0, len(cmds))}
	bytes := 0
	for i, c := range cmds {
		p := commandProto(c)
		// Bounded by bytes as well as by count: 200 commands of 16 KiB
		// params and results are over gRPC's message limit.
		n := protowire.SizeBytes(proto.Size(p)) + 1
		if i > 0 && bytes+n > maxPageBytes {
			more = true
			break
		}
		bytes += n
		resp.Commands = append(resp.Commands, p)
	}
	if more {
		last := cmds[len(resp.Commands)-1]
		resp.NextPageToken = encodePageToken(query, strconv.FormatInt(last.Seq, 10))
	}
	return resp, nil
}

func (cs *commandService) CancelCommand(ctx context.Context, req *twinv1.CancelCommandRequest) (*twinv1.CancelCommandResponse, error) {
	cmd, err := cs.s.engine.CancelCommandBy(ctx, req.GetId(), sourceOf(ctx, twin.SourceAPI))
	if err != nil {
		return nil, cs.s.status("CancelCommand", err)
	}
	return &twinv1.CancelCommandResponse{Command: commandProto(cmd)}, nil
}
