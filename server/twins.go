package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"sync/atomic"
	"time"

	"cel.dev/cel-go/cel"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/rules"
	"github.com/twind-io/twind/twin"
)

// twinService implements twinv1.TwinServiceServer: it validates requests,
// delegates to the engine and translates errors.
type twinService struct {
	twinv1.UnimplementedTwinServiceServer
	s *Server
	// sendTimeout bounds how long a WatchTwins message may wait for its
	// client to read it. Default 30s.
	sendTimeout time.Duration
	// filterEvals counts evaluations of ListTwins and WatchTwins filters.
	filterEvals atomic.Int64
	// memo shares watch filters' results among watchers.
	memo filterMemo
	// listVisits counts the twins that ListTwins pages looked at.
	listVisits atomic.Int64
}

// defaultSendTimeout is the default of twinService.sendTimeout.
const defaultSendTimeout = 30 * time.Second

func (ts *twinService) CreateTwin(ctx context.Context, req *twinv1.CreateTwinRequest) (*twinv1.CreateTwinResponse, error) {
	t := req.GetTwin()
	if t == nil {
		return nil, invalid("twin is required")
	}
	if err := checkFinite("twin.reported", t.GetReported()); err != nil {
		return nil, err
	}
	if err := checkFinite("twin.desired", t.GetDesired()); err != nil {
		return nil, err
	}
	out, err := ts.s.engine.Create(ctx, twin.CreateRequest{
		ID:       t.GetId(),
		Type:     t.GetType(),
		Labels:   t.GetLabels(),
		Reported: document(t.GetReported()),
		Desired:  document(t.GetDesired()),
		Source:   sourceOf(ctx, twin.SourceAPI),
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
	// maxPageBytes bounds the encoded twins or events of one page, well
	// under gRPC's default 4 MiB message limit.
	maxPageBytes = 3 << 20
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
	f, err := compileFilter(req.GetFilter())
	if err != nil {
		return nil, ts.s.status("ListTwins", err)
	}
	query := "twins:" + req.GetFilter()
	after, err := decodePageToken(query, req.GetPageToken())
	if err != nil {
		return nil, err
	}
	// The scan ends when the client gives up or the server shuts down.
	ctx, cancel := ts.s.streamContext(ctx)
	defer cancel()
	now := ts.s.opts.Clock()
	resp := &twinv1.ListTwinsResponse{}
	var (
		evaluated, bytes int
		more             bool
		last             string
		spent            uint64 // of the page's CEL budget
	)
	budget := ts.s.opts.ListCostBudget
	if budget == 0 {
		budget = defaultListCostBudget
	}
	visit := func(t *twin.Twin) bool {
		ts.listVisits.Add(1)
		ok, cost, err := ts.matchCost(ctx, f, t, now)
		if ctx.Err() != nil {
			return false
		}
		evaluated++
		if f.prg != nil {
			spent += twinEvalCost + cost
		}
		switch {
		case err != nil:
			if resp.FilterErrorCount == 0 {
				resp.FirstFilterError = fmt.Sprintf("twin %q: %v", t.ID, err)
			}
			resp.FilterErrorCount++
		case !ok:
		case len(resp.Twins) == size:
			more = true
			return false
		default:
			p := twinProto(t)
			n := protowire.SizeBytes(proto.Size(p)) + 1 // the field's tag and length
			if len(resp.Twins) > 0 && bytes+n > maxPageBytes {
				more = true
				return false
			}
			bytes += n
			resp.Twins = append(resp.Twins, p)
		}
		last = t.ID
		if spent >= budget {
			// The budget is spent: the client continues after this twin.
			more = true
			return false
		}
		return true
	}
	var rev int64
	if f.pin.Pinned() {
		// Only the twins whose type or labels can match.
		rev, err = ts.s.engine.ListIndexed(ctx, f.pin, after, visit)
	} else {
		rev, err = ts.s.engine.List(ctx, after, visit)
	}
	if err == nil {
		err = ctx.Err() // a filter evaluation noticed first
	}
	if err != nil {
		return nil, ts.s.streamStatus("ListTwins", ctx, err)
	}
	if resp.FilterErrorCount > 0 && int(resp.FilterErrorCount) == evaluated {
		return nil, invalid("the filter failed on every twin it was evaluated on (%d), first on %s; "+
			"fix the filter (a field a twin lacks is no error: the twin just does not match)",
			evaluated, resp.FirstFilterError)
	}
	resp.Revision = rev
	if more {
		resp.NextPageToken = encodePageToken(query, last)
	}
	return resp, nil
}

// defaultListCostBudget is the default of Options.ListCostBudget.
const defaultListCostBudget = 10_000_000

// twinEvalCost is what evaluating a filter on a twin costs beyond its CEL
// cost, in CEL cost units: presenting the twin to CEL takes about as long as
// 50 units of CEL work.
const twinEvalCost = 50

// filter is a compiled ListTwins or WatchTwins filter. It is safe for
// concurrent use.
type filter struct {
	src string      // the expression
	prg cel.Program // nil matches every twin
	// pin is what the filter requires of a twin's type and labels: a twin
	// that does not meet it does not match, and the index finds those that
	// do.
	pin twin.Pin
}

// filterInterruptCheck is how many comprehension iterations a filter runs
// between checks of its context.
const filterInterruptCheck = 100

// compileFilter compiles a filter; an empty one matches every twin. The
// rules package checks it and words its errors; the program is built here
// so that an evaluation reports its error and stops when its context ends.
func compileFilter(expr string) (*filter, error) {
	if _, err := rules.CompileFilter(expr); err != nil {
		return nil, err
	}
	if strings.TrimSpace(expr) == "" {
		return &filter{}, nil
	}
	env, err := rules.Env()
	if err != nil {
		return nil, err
	}
	ast, iss := env.Compile(expr)
	if iss.Err() != nil {
		return nil, fmt.Errorf("%w: %v", rules.ErrInvalid, iss.Err())
	}
	prg, err := env.Program(ast,
		cel.EvalOptions(cel.OptOptimize),
		cel.CostLimit(rules.FilterCostLimit),
		cel.InterruptCheckFrequency(filterInterruptCheck),
	)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", rules.ErrInvalid, err)
	}
	return &filter{src: expr, prg: prg, pin: rules.FilterPin(ast)}, nil
}

// match reports whether f holds for t. Reading a field or key that t does
// not have, or an index its list does not have, makes f false with no error:
// the twin has not reported it. Any other failure is returned: a type error
// such as comparing a string with a number, a result that is not a bool,
// exceeding the cost limit, or ctx ending.
func (ts *twinService) match(ctx context.Context, f *filter, t *twin.Twin, now time.Time) (bool, error) {
	ok, _, err := ts.matchCost(ctx, f, t, now)
	return ok, err
}

// matchCost is match that also returns the evaluation's CEL cost. A twin
// that does not meet the filter's pin does not match, at no cost.
func (ts *twinService) matchCost(ctx context.Context, f *filter, t *twin.Twin, now time.Time) (bool, uint64, error) {
	if f.prg == nil {
		return true, 0, nil
	}
	if !f.pin.Matches(t) {
		return false, 0, nil
	}
	ts.filterEvals.Add(1)
	out, det, err := f.prg.ContextEval(ctx, map[string]any{"twin": rules.Value(t), "prev": rules.Value(nil), "now": now})
	var cost uint64
	if c := det.ActualCost(); c != nil {
		cost = *c
	}
	if err != nil {
		if missing(err) {
			return false, cost, nil
		}
		return false, cost, explainEval(err)
	}
	b, ok := out.Value().(bool)
	if !ok {
		return false, cost, fmt.Errorf("the filter's result has type %s, not bool", out.Type().TypeName())
	}
	return b, cost, nil
}

// explainEval adds what to do to CEL's terse evaluation errors.
func explainEval(err error) error {
	msg := err.Error()
	switch {
	case strings.HasPrefix(msg, "no such overload"):
		return fmt.Errorf("%w (an operator or function got types it does not take, such as a string compared "+
			"with a number, or a number from a document, a double, added to an int: write 1.0, not 1)", err)
	case strings.Contains(msg, "cost limit exceeded"):
		return fmt.Errorf("%w (the filter costs more than %d per twin)", err, rules.FilterCostLimit)
	}
	return err
}

// missing reports whether a CEL evaluation error is about a field, key or
// index that the twin does not have.
func missing(err error) bool {
	msg := err.Error()
	return strings.HasPrefix(msg, "no such key") || strings.HasPrefix(msg, "no such attribute") ||
		strings.HasPrefix(msg, "index out of bounds")
}

func (ts *twinService) UpdateTwin(ctx context.Context, req *twinv1.UpdateTwinRequest) (*twinv1.UpdateTwinResponse, error) {
	u := twin.UpdateRequest{
		ID:              req.GetId(),
		Labels:          req.GetLabels(),
		RemoveLabels:    req.GetRemoveLabels(),
		ExpectedVersion: req.GetExpectedVersion(),
		Source:          sourceOf(ctx, twin.SourceAPI),
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
	if err := checkFinite("patch", req.GetPatch()); err != nil {
		return nil, err
	}
	t, err := ts.s.engine.UpdateDesired(ctx, twin.PatchRequest{
		ID:              req.GetId(),
		Patch:           document(req.GetPatch()),
		ExpectedVersion: req.GetExpectedVersion(),
		Source:          sourceOf(ctx, twin.SourceAPI),
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
	if err := checkFinite("patch", req.GetPatch()); err != nil {
		return nil, err
	}
	// A device without a stream reports with its own token or its client
	// certificate instead of an API key, for its own twin only; on an open
	// server, a report is the device's as before.
	source := twin.SourceDevice
	var tokenHash []byte // the device token the report must be made with
	switch c := callerFrom(ctx); {
	case c.key != nil:
		source = twin.KeySource(c.key.name)
	case c.device != "":
		if c.device != req.GetId() {
			return nil, status.Errorf(codes.PermissionDenied,
				"the client certificate is device %.130q's, which may report only for its own twin, not for %.130q", c.device, req.GetId())
		}
	case c.deviceToken != "":
		if !ts.s.deviceTokenValid(req.GetId(), c.deviceToken) {
			return nil, status.Errorf(codes.Unauthenticated, "the bearer token is neither an API key nor the device token of twin %.130q "+
				"(unknown twin or wrong token): a device reports for its own twin with the token from IssueDeviceToken", req.GetId())
		}
		tokenHash = hashToken(c.deviceToken) // checked again as the report applies
	case c.open:
	default:
		// The interceptor lets nobody else through; fail closed.
		return nil, status.Error(codes.Unauthenticated, "this server requires an API key, a device token or a device certificate")
	}
	if !ts.s.reports.allow(req.GetId()) {
		return nil, ts.s.status("ReportState", ts.s.reports.refusal(req.GetId()))
	}
	t, err := ts.s.engine.Report(ctx, twin.PatchRequest{
		ID:                  req.GetId(),
		Patch:               document(req.GetPatch()),
		ExpectedVersion:     req.GetExpectedVersion(),
		DesiredAckedVersion: req.GetDesiredAckedVersion(),
		Source:              source,
		TokenHash:           tokenHash,
	})
	if err != nil {
		return nil, ts.s.status("ReportState", err)
	}
	return &twinv1.ReportStateResponse{Twin: twinProto(t)}, nil
}

func (ts *twinService) DeleteTwin(ctx context.Context, req *twinv1.DeleteTwinRequest) (*twinv1.DeleteTwinResponse, error) {
	if err := ts.s.engine.DeleteBy(ctx, req.GetId(), req.GetExpectedVersion(), sourceOf(ctx, twin.SourceAPI)); err != nil {
		return nil, ts.s.status("DeleteTwin", err)
	}
	return &twinv1.DeleteTwinResponse{}, nil
}

func (ts *twinService) WatchTwins(req *twinv1.WatchTwinsRequest, stream twinv1.TwinService_WatchTwinsServer) error {
	start := req.GetStartRevision()
	if start < 0 {
		return invalid("start_revision is %d; give 0 for changes from now on, or a revision to resume from", start)
	}
	f, err := compileFilter(req.GetFilter())
	if err != nil {
		return ts.s.status("WatchTwins", err)
	}
	// The revision only grows, so a start that is not too far ahead now
	// never becomes so.
	if rev := ts.s.engine.Revision(); start > rev+1 {
		return ts.s.status("WatchTwins", fmt.Errorf("%w: start_revision %d is beyond the current revision %d; "+
			"give at most %d, or 0 for changes from now on", errFutureRevision, start, rev, rev+1))
	}
	match := sourceMatch(req.GetSource())
	if start == 0 {
		start = ts.s.engine.Revision() + 1
	}
	// The headers say the watch is in place: a client that has them (a
	// browser's fetch resolves on them) sees every change committed after.
	if err := stream.SendHeader(nil); err != nil {
		return ts.s.status("WatchTwins", err)
	}
	ctx, cancel := ts.s.streamContext(stream.Context())
	defer cancel()
	timeout := ts.sendTimeout
	if timeout <= 0 {
		timeout = defaultSendTimeout
	}
	send := newSender(stream, timeout)
	defer send.close()
	evaluated, failed := 0, 0
	err = ts.s.engine.Watch(ctx, start, func(ev *twin.Event) error {
		if ev.Kind == twin.KindImported {
			// Every watcher learns of an import, whatever its filter:
			// the imported twins have no events of their own.
			return send.send(ctx, &twinv1.WatchTwinsResponse{Event: eventProto(ev)})
		}
		if !match(ev.Source) {
			return nil
		}
		ok, _, merr := ts.memo.match(ctx, f, ev, func() (bool, uint64, error) { return ts.matchCost(ctx, f, ev.Twin, ev.Time) })
		if f.prg != nil && evaluated < filterProbe {
			// A filter that fails on every one of the first events it
			// sees is a mistake, not a quiet stream: say so, as
			// ListTwins does.
			evaluated++
			if merr != nil {
				if failed++; failed == filterProbe {
					return fmt.Errorf("%w: the filter failed on each of the first %d events, the first on twin %q: %v",
						twin.ErrInvalidArgument, filterProbe, ev.Twin.ID, merr)
				}
			}
		}
		if !ok {
			return nil // a filter that fails on an event skips it, as in ListTwins
		}
		if err := send.send(ctx, &twinv1.WatchTwinsResponse{Event: eventProto(ev)}); err != nil {
			if errors.Is(err, errSlowReader) {
				return fmt.Errorf("%w: the watch did not read for %v and is ended; watch again with start_revision %d",
					errSlowReader, timeout, ev.Revision)
			}
			return err
		}
		return nil
	})
	return ts.s.streamStatus("WatchTwins", ctx, err)
}

// filterProbe is how many events a watch filter that fails on each of them
// may see before the watch ends with INVALID_ARGUMENT.
const filterProbe = 100

// sender sends the messages of a server stream from a goroutine of its own,
// so that a client that does not read ends its stream after a timeout
// instead of blocking its handler for good. A send blocked in flow control
// ends when the handler returns: grpc-go then resets the stream and cancels
// its context, which unblocks the send (grpc-go issue 1229).
type sender struct {
	stream  grpc.ServerStream
	timeout time.Duration
	timer   *time.Timer
	msgs    chan any   // to the goroutine; taken only when it is idle
	errs    chan error // from the goroutine: the result of each send
}

func newSender(stream grpc.ServerStream, timeout time.Duration) *sender {
	s := &sender{
		stream:  stream,
		timeout: timeout,
		timer:   time.NewTimer(timeout),
		msgs:    make(chan any),
		errs:    make(chan error, 1), // so that a send that outlives the handler ends
	}
	s.timer.Stop()
	go func() {
		for m := range s.msgs {
			s.errs <- s.stream.SendMsg(m)
		}
	}()
	return s
}

// send sends m. It returns errSlowReader if the client did not take it
// within the timeout, and ctx's error if ctx ends first; after an error,
// the caller must return from the handler without sending again.
func (s *sender) send(ctx context.Context, m any) error {
	select {
	case s.msgs <- m:
	case <-ctx.Done():
		return ctx.Err()
	}
	s.timer.Reset(s.timeout)
	defer s.timer.Stop()
	select {
	case err := <-s.errs:
		return err
	case <-s.timer.C:
		return errSlowReader
	case <-ctx.Done():
		return ctx.Err()
	}
}

// close stops the goroutine once its send, if any, has ended.
func (s *sender) close() { close(s.msgs) }

func (ts *twinService) ListTwinHistory(ctx context.Context, req *twinv1.ListTwinHistoryRequest) (*twinv1.ListTwinHistoryResponse, error) {
	size, err := pageSize(req.GetPageSize())
	if err != nil {
		return nil, err
	}
	query := "history:" + req.GetId()
	if req.GetSource() != "" {
		query += "\x00" + req.GetSource()
	}
	tok, err := decodePageToken(query, req.GetPageToken())
	if err != nil {
		return nil, err
	}
	var before int64
	if tok != "" {
		before = int64(binary.BigEndian.Uint64([]byte((tok + "\x00\x00\x00\x00\x00\x00\x00\x00")[:8])))
	}
	match := sourceMatch(req.GetSource())
	var evs []*twin.Event
	for {
		chunk, err := ts.s.engine.History(req.GetId(), before, size+1)
		if err != nil {
			return nil, ts.s.status("ListTwinHistory", err)
		}
		for _, ev := range chunk {
			if match(ev.Source) {
				evs = append(evs, ev)
			}
		}
		if len(chunk) < size+1 || len(evs) > size {
			break
		}
		before = chunk[len(chunk)-1].Twin.Version
	}
	resp := &twinv1.ListTwinHistoryResponse{}
	bytes := 0
	for i, ev := range evs {
		p := eventProto(ev)
		n := protowire.SizeBytes(proto.Size(p)) + 1 // the field's tag and length
		if i == size || (i > 0 && bytes+n > maxPageBytes) {
			next := binary.BigEndian.AppendUint64(nil, uint64(evs[i-1].Twin.Version))
			resp.NextPageToken = encodePageToken(query, string(next))
			break
		}
		bytes += n
		resp.Events = append(resp.Events, p)
	}
	return resp, nil
}

func (ts *twinService) IssueDeviceToken(ctx context.Context, req *twinv1.IssueDeviceTokenRequest) (*twinv1.IssueDeviceTokenResponse, error) {
	token := "twd_" + strings.TrimRight(base64.RawURLEncoding.EncodeToString(randomBytes(32)), "=")
	if err := ts.s.engine.SetTokenHashBy(ctx, req.GetId(), hashToken(token), sourceOf(ctx, twin.SourceAPI)); err != nil {
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

// sourceMatch returns the test of a source filter (WatchTwins.source,
// ListTwinHistory.source): empty matches every source, "key:*" every
// source that starts with "key:", anything else itself only.
func sourceMatch(filter string) func(twin.Source) bool {
	if filter == "" {
		return func(twin.Source) bool { return true }
	}
	if p, ok := strings.CutSuffix(filter, "*"); ok {
		return func(s twin.Source) bool { return strings.HasPrefix(string(s), p) }
	}
	return func(s twin.Source) bool { return string(s) == filter }
}
