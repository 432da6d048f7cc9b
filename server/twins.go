package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"hash/fnv"
	"strings"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/rules"
	"github.com/twind-io/twind/twin"
)

// twinService implements twinv1.TwinServiceServer: it validates requests,
// delegates to the engine and translates errors.
type twinService struct {
	twinv1.UnimplementedTwinServiceServer
	s *Server
}

func (ts *twinService) CreateTwin(ctx context.Context, req *twinv1.CreateTwinRequest) (*twinv1.CreateTwinResponse, error) {
	t := req.GetTwin()
	if t == nil {
		return nil, invalid("twin is required")
	}
	out, err := ts.s.engine.Create(ctx, twin.CreateRequest{
		ID:       t.GetId(),
		Type:     t.GetType(),
		Labels:   t.GetLabels(),
		Reported: document(t.GetReported()),
		Desired:  document(t.GetDesired()),
	})
	if err != nil {
		return nil, ts.s.status("CreateTwin", err)
	}
	return &twinv1.CreateTwinResponse{Twin: twinProto(out)}, nil
}

func (ts *twinService) GetTwin(ctx context.Context, req *twinv1.GetTwinRequest) (*twinv1.GetTwinResponse, error) {
	t, err := ts.s.engine.Get(req.GetId())
	if err != nil {
		return nil, ts.s.status("GetTwin", err)
	}
	return &twinv1.GetTwinResponse{Twin: twinProto(t)}, nil
}

const (
	defaultPageSize = 100
	maxPageSize     = 1000
)

func pageSize(n int32) (int, error) {
	switch {
	case n < 0:
		return 0, invalid("page_size is %d; give 0 for the default of %d, or up to %d", n, defaultPageSize, maxPageSize)
	case n == 0:
		return defaultPageSize, nil
	}
	return min(int(n), maxPageSize), nil
}

// Page tokens are opaque to clients: base64 of the hash of the query they
// belong to, then the position after which the next page starts.
func encodePageToken(query, after string) string {
	h := fnv.New64a()
	h.Write([]byte(query))
	b := binary.BigEndian.AppendUint64(nil, h.Sum64())
	return base64.RawURLEncoding.EncodeToString(append(b, after...))
}

func decodePageToken(query, token string) (string, error) {
	if token == "" {
		return "", nil
	}
	b, err := base64.RawURLEncoding.DecodeString(token)
	h := fnv.New64a()
	h.Write([]byte(query))
	if err != nil || len(b) < 8 || binary.BigEndian.Uint64(b) != h.Sum64() {
		return "", invalid("page_token is not one this query returned; start again without a page_token")
	}
	return string(b[8:]), nil
}

func (ts *twinService) ListTwins(ctx context.Context, req *twinv1.ListTwinsRequest) (*twinv1.ListTwinsResponse, error) {
	size, err := pageSize(req.GetPageSize())
	if err != nil {
		return nil, err
	}
	f, err := rules.CompileFilter(req.GetFilter())
	if err != nil {
		return nil, ts.s.status("ListTwins", err)
	}
	after, err := decodePageToken("twins:"+req.GetFilter(), req.GetPageToken())
	if err != nil {
		return nil, err
	}
	now := ts.s.opts.Clock()
	twins, rev, more := ts.s.engine.List(after, size, func(t *twin.Twin) bool { return f.Match(t, now) })
	resp := &twinv1.ListTwinsResponse{Revision: rev, Twins: make([]*twinv1.Twin, len(twins))}
	for i, t := range twins {
		resp.Twins[i] = twinProto(t)
	}
	if more {
		resp.NextPageToken = encodePageToken("twins:"+req.GetFilter(), twins[len(twins)-1].ID)
	}
	return resp, nil
}

func (ts *twinService) UpdateTwin(ctx context.Context, req *twinv1.UpdateTwinRequest) (*twinv1.UpdateTwinResponse, error) {
	u := twin.UpdateRequest{
		ID:              req.GetId(),
		Labels:          req.GetLabels(),
		RemoveLabels:    req.GetRemoveLabels(),
		ExpectedVersion: req.GetExpectedVersion(),
	}
	if req.GetUpdateType() {
		typ := req.GetType()
		u.Type = &typ
	}
	t, err := ts.s.engine.Update(ctx, u)
	if err != nil {
		return nil, ts.s.status("UpdateTwin", err)
	}
	return &twinv1.UpdateTwinResponse{Twin: twinProto(t)}, nil
}

func (ts *twinService) UpdateDesired(ctx context.Context, req *twinv1.UpdateDesiredRequest) (*twinv1.UpdateDesiredResponse, error) {
	if req.GetPatch() == nil {
		return nil, invalid("patch is required: a JSON object to merge into desired")
	}
	t, err := ts.s.engine.UpdateDesired(ctx, twin.PatchRequest{
		ID:              req.GetId(),
		Patch:           document(req.GetPatch()),
		ExpectedVersion: req.GetExpectedVersion(),
		Source:          twin.SourceAPI,
	})
	if err != nil {
		return nil, ts.s.status("UpdateDesired", err)
	}
	return &twinv1.UpdateDesiredResponse{Twin: twinProto(t)}, nil
}

func (ts *twinService) ReportState(ctx context.Context, req *twinv1.ReportStateRequest) (*twinv1.ReportStateResponse, error) {
	if req.GetPatch() == nil && req.GetDesiredAckedVersion() == 0 {
		return nil, invalid("patch is required: a JSON object to merge into reported")
	}
	t, err := ts.s.engine.Report(ctx, twin.PatchRequest{
		ID:                  req.GetId(),
		Patch:               document(req.GetPatch()),
		ExpectedVersion:     req.GetExpectedVersion(),
		DesiredAckedVersion: req.GetDesiredAckedVersion(),
		Source:              twin.SourceDevice,
	})
	if err != nil {
		return nil, ts.s.status("ReportState", err)
	}
	return &twinv1.ReportStateResponse{Twin: twinProto(t)}, nil
}

func (ts *twinService) DeleteTwin(ctx context.Context, req *twinv1.DeleteTwinRequest) (*twinv1.DeleteTwinResponse, error) {
	if err := ts.s.engine.Delete(ctx, req.GetId(), req.GetExpectedVersion()); err != nil {
		return nil, ts.s.status("DeleteTwin", err)
	}
	return &twinv1.DeleteTwinResponse{}, nil
}

func (ts *twinService) WatchTwins(req *twinv1.WatchTwinsRequest, stream twinv1.TwinService_WatchTwinsServer) error {
	if req.GetStartRevision() < 0 {
		return invalid("start_revision is %d; give 0 for changes from now on, or a revision to resume from", req.GetStartRevision())
	}
	f, err := rules.CompileFilter(req.GetFilter())
	if err != nil {
		return ts.s.status("WatchTwins", err)
	}
	ctx, cancel := ts.s.streamContext(stream.Context())
	defer cancel()
	err = ts.s.engine.Watch(ctx, req.GetStartRevision(), func(ev *twin.Event) error {
		if !f.Match(ev.Twin, ev.Time) {
			return nil
		}
		return stream.Send(&twinv1.WatchTwinsResponse{Event: eventProto(ev)})
	})
	return ts.s.streamStatus("WatchTwins", ctx, err)
}

func (ts *twinService) ListTwinHistory(ctx context.Context, req *twinv1.ListTwinHistoryRequest) (*twinv1.ListTwinHistoryResponse, error) {
	size, err := pageSize(req.GetPageSize())
	if err != nil {
		return nil, err
	}
	query := "history:" + req.GetId()
	tok, err := decodePageToken(query, req.GetPageToken())
	if err != nil {
		return nil, err
	}
	var before int64
	if tok != "" {
		before = int64(binary.BigEndian.Uint64([]byte((tok + "\x00\x00\x00\x00\x00\x00\x00\x00")[:8])))
	}
	evs, err := ts.s.engine.History(req.GetId(), before, size+1)
	if err != nil {
		return nil, ts.s.status("ListTwinHistory", err)
	}
	resp := &twinv1.ListTwinHistoryResponse{}
	for i, ev := range evs {
		if i == size {
			next := binary.BigEndian.AppendUint64(nil, uint64(evs[size-1].Twin.Version))
			resp.NextPageToken = encodePageToken(query, string(next))
			break
		}
		resp.Events = append(resp.Events, eventProto(ev))
	}
	return resp, nil
}

func (ts *twinService) IssueDeviceToken(ctx context.Context, req *twinv1.IssueDeviceTokenRequest) (*twinv1.IssueDeviceTokenResponse, error) {
	token := "twd_" + strings.TrimRight(base64.RawURLEncoding.EncodeToString(randomBytes(32)), "=")
	if err := ts.s.engine.SetTokenHash(ctx, req.GetId(), hashToken(token)); err != nil {
		return nil, ts.s.status("IssueDeviceToken", err)
	}
	return &twinv1.IssueDeviceTokenResponse{Token: token}, nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b) // never fails; see crypto/rand
	return b
}

func hashToken(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}
