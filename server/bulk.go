package server

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
	"unicode"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/twind-io/twind/internal/parallel"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// importInFlight is how many batches of one import stream may be handed
// to the engine and not yet durable: the handler checks the next batch
// while the workers commit the previous one.
const importInFlight = 2

// inFlightBatch is a batch handed to the engine, waiting to be answered.
type inFlightBatch struct {
	resp    *twinv1.ImportTwinsResponse
	b       *importBatch
	pending *twin.PendingImport
}

// ImportTwins reads batches, hands each to the engine and answers it once
// durable, in order, from a goroutine of its own, so that the next batch is
// read and checked meanwhile; when the client closes its side, it writes
// the import's marker event and ends with a done response.
func (ts *twinService) ImportTwins(stream twinv1.TwinService_ImportTwinsServer) error {
	const method = "ImportTwins"
	ctx, cancel := ts.s.streamContext(stream.Context())
	defer cancel()
	var (
		opts     twin.ImportOptions
		batch    int64
		line     int64 // the last NDJSON line read
		imported int64 // written by the answering goroutine until it ends
		failed   int64
		marked   bool
	)
	queue := make(chan *inFlightBatch, importInFlight-1)
	answered := make(chan error, 1)
	var waiting *inFlightBatch // the batch answerImport was waiting for when it ended
	go func() {
		answered <- ts.answerImport(ctx, stream, queue, &imported, &failed, &waiting)
	}()
	// stop ends the answering goroutine and returns its error.
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		close(queue)
		return <-answered
	}
	// However the stream ends, watchers learn of what it imported.
	defer func() {
		cancel()
		stop()
		if marked {
			return
		}
		mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		// Batches handed to the engine but not answered (the client
		// left, or the stream broke) are imported all the same: the
		// marker counts them, once they are durable.
		var late []*inFlightBatch
		if waiting != nil {
			late = append(late, waiting)
		}
		for f := range queue {
			late = append(late, f)
		}
		for _, f := range late {
			errs, err := f.pending.Wait(mctx)
			if err != nil {
				ts.s.opts.Logger.Warn("import ended early; some of its twins may be imported but not counted in its marker event", "err", err)
				break
			}
			imported += int64(len(f.b.items) - len(errs))
		}
		if imported > 0 {
			if _, err := ts.s.engine.MarkImport(mctx, int(imported)); err != nil {
				ts.s.opts.Logger.Warn("import ended early; its marker event could not be written", "twins", imported, "err", err)
			}
		}
	}()
	for ; ; batch++ {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return ts.s.streamStatus(method, ctx, err)
		}
		if batch == 0 {
			opts = twin.ImportOptions{Upsert: req.GetUpsert(), KeepVersions: req.GetKeepVersions()}
		}
		resp := &twinv1.ImportTwinsResponse{Batch: batch}
		b := ts.parseBatch(req, &line, resp)
		for i, r := range b.rules {
			id, err := ts.s.rules.Restore([]byte(r.def), opts.Upsert)
			if err != nil {
				resp.Errors = append(resp.Errors, ts.importError(r.line, int32(i), id, true, err))
				continue
			}
			resp.RulesImported++
		}
		for _, k := range b.keys {
			if err := ts.s.keys.restore(k.rec.GetName(), []byte(k.rec.GetDefinitionJson()), opts.Upsert); err != nil {
				resp.Errors = append(resp.Errors, keyImportError(k.line, k.index, k.rec.GetName(), err))
				continue
			}
			resp.KeysImported++
		}
		p, err := ts.s.engine.StartImport(ctx, b.items, opts)
		if err != nil {
			return ts.s.streamStatus(method, ctx, err)
		}
		select {
		case queue <- &inFlightBatch{resp: resp, b: b, pending: p}:
		case err := <-answered:
			stopped = true
			close(queue) // for the batches the deferred marker counts
			return ts.s.streamStatus(method, ctx, err)
		}
	}
	if err := stop(); err != nil {
		return ts.s.streamStatus(method, ctx, err)
	}
	done := &twinv1.ImportTwinsResponse{Batch: batch, Done: true, TotalImported: imported, TotalFailed: failed}
	if imported > 0 {
		rev, err := ts.s.engine.MarkImport(ctx, int(imported))
		if err != nil {
			return ts.s.streamStatus(method, ctx, err)
		}
		done.Revision, marked = rev, true
	}
	ts.s.opts.Logger.Info("import done", "twins", imported, "refused", failed, "revision", done.Revision)
	return ts.s.streamStatus(method, ctx, stream.Send(done))
}

// answerImport answers the batches of the queue in order, each once it is
// durable, until the queue is closed or an error ends the stream.
func (ts *twinService) answerImport(ctx context.Context, stream twinv1.TwinService_ImportTwinsServer,
	queue <-chan *inFlightBatch, imported, failed *int64, waiting **inFlightBatch) error {
	for f := range queue {
		*waiting = f
		errs, err := f.pending.Wait(ctx)
		if err != nil {
			return err
		}
		*waiting = nil
		resp := f.resp
		for _, e := range errs {
			src := f.b.src[e.Index]
			resp.Errors = append(resp.Errors, ts.importError(src.line, src.index, e.ID, false, e.Err))
		}
		slices.SortStableFunc(resp.Errors, func(a, b *twinv1.ImportError) int {
			return cmp.Or(cmp.Compare(a.GetLine(), b.GetLine()), cmp.Compare(a.GetIndex(), b.GetIndex()))
		})
		resp.Imported = int64(len(f.b.items) - len(errs))
		*imported += resp.Imported
		*failed += int64(len(resp.Errors))
		resp.TotalImported, resp.TotalFailed = *imported, *failed
		if err := stream.Send(resp); err != nil {
			return err
		}
	}
	return nil
}

// importBatch is one request's items, converted for the engine, with where
// each came from.
type importBatch struct {
	items []twin.ImportItem
	src   []itemSource // by item
	rules []ruleItem
	keys  []keyItem
}

type itemSource struct {
	line  int64 // NDJSON line, or 0
	index int32 // index in the request's twins, for a protobuf item
}

type ruleItem struct {
	line int64
	def  string
}

// keyItem is an API key to import, and where it came from.
type keyItem struct {
	line  int64
	index int32
	rec   *twinv1.KeyRecord
}

// keyImportError describes a refused API key.
func keyImportError(line int64, index int32, name string, err error) *twinv1.ImportError {
	st := status.Convert(err)
	if _, ok := status.FromError(err); !ok {
		st = status.New(codes.InvalidArgument, err.Error())
	}
	return &twinv1.ImportError{Line: line, Index: index, Id: name, Key: true, Code: codeName(st.Code()), Message: st.Message()}
}

// importError describes one refused item.
func (ts *twinService) importError(line int64, index int32, id string, rule bool, err error) *twinv1.ImportError {
	st, _ := status.FromError(ts.s.status("ImportTwins", err))
	return &twinv1.ImportError{Line: line, Index: index, Id: id, Rule: rule, Code: codeName(st.Code()), Message: st.Message()}
}

// codeName spells a code as the gRPC specification does: ALREADY_EXISTS.
func codeName(c codes.Code) string {
	var b strings.Builder
	for i, r := range c.String() {
		if unicode.IsUpper(r) && i > 0 {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToUpper(r))
	}
	return b.String()
}

// parseBatch converts a request's rules, twins and NDJSON lines. Items that
// do not convert are reported in resp at once.
func (ts *twinService) parseBatch(req *twinv1.ImportTwinsRequest, line *int64, resp *twinv1.ImportTwinsResponse) *importBatch {
	b := &importBatch{}
	for _, r := range req.GetRules() {
		b.rules = append(b.rules, ruleItem{def: r.GetDefinitionJson()})
	}
	for i, k := range req.GetKeys() {
		b.keys = append(b.keys, keyItem{index: int32(i), rec: k})
	}
	for i, r := range req.GetTwins() {
		it, err := importItem(r)
		if err != nil {
			resp.Errors = append(resp.Errors, ts.importError(0, int32(i), r.GetTwin().GetId(), false, err))
			continue
		}
		b.items = append(b.items, it)
		b.src = append(b.src, itemSource{index: int32(i)})
	}
	// Lines are parsed side by side, then taken in order.
	type parsed struct {
		line int64
		it   twin.ImportItem
		rule *twinv1.RuleRecord
		key  *twinv1.KeyRecord
		id   string
		err  error
	}
	var lines []parsed
	var text [][]byte
	data := req.GetNdjson()
	for len(data) > 0 {
		var l []byte
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			l, data = data[:i], data[i+1:]
		} else {
			l, data = data, nil
		}
		*line++
		if l = bytes.TrimSpace(l); len(l) > 0 {
			lines = append(lines, parsed{line: *line})
			text = append(text, l)
		}
	}
	parallel.Ranges(len(lines), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			p := &lines[i]
			p.it, p.rule, p.key, p.id, p.err = parseLine(text[i])
		}
	})
	for _, p := range lines {
		switch {
		case p.err != nil && p.key != nil:
			resp.Errors = append(resp.Errors, keyImportError(p.line, 0, p.id, p.err))
		case p.err != nil:
			resp.Errors = append(resp.Errors, ts.importError(p.line, 0, p.id, p.rule != nil, p.err))
		case p.key != nil:
			b.keys = append(b.keys, keyItem{line: p.line, rec: p.key})
		case p.rule != nil:
			b.rules = append(b.rules, ruleItem{line: p.line, def: p.rule.GetDefinitionJson()})
		case p.it.Twin != nil:
			b.items = append(b.items, p.it)
			b.src = append(b.src, itemSource{line: p.line})
		}
	}
	return b
}

// jsonTwin is a plain twin line, decoded with encoding/json for speed.
type jsonTwin struct {
	ID                  string            `json:"id"`
	Type                string            `json:"type"`
	Labels              map[string]string `json:"labels"`
	Reported            map[string]any    `json:"reported"`
	Desired             map[string]any    `json:"desired"`
	Delta               json.RawMessage   `json:"delta"`
	Version             jsonInt           `json:"version"`
	Revision            jsonInt           `json:"revision"`
	DesiredAckedVersion jsonInt           `json:"desired_acked_version"`
	Metadata            *struct {
		Reported map[string]jsonFieldMeta `json:"reported"`
		Desired  map[string]jsonFieldMeta `json:"desired"`
	} `json:"metadata"`
	Presence *struct {
		Connected bool       `json:"connected"`
		Since     *time.Time `json:"since"`
		LastSeen  *time.Time `json:"last_seen"`
	} `json:"presence"`
	CreateTime *time.Time `json:"create_time"`
	UpdateTime *time.Time `json:"update_time"`

	// A twin record: the twin, and what restores it with it.
	Twin            *jsonTwin          `json:"twin"`
	TokenHash       []byte             `json:"token_hash"`
	Tombstones      map[string]jsonInt `json:"tombstones"`
	CommandSequence jsonInt            `json:"command_sequence"`
	Commands        []jsonCommand      `json:"commands"`
	RuleStates      []jsonRuleState    `json:"rule_states"`

	// The other kinds of line.
	Rule   json.RawMessage `json:"rule"`
	Key    json.RawMessage `json:"key"`
	Export json.RawMessage `json:"export"`
}

// jsonCommand is a Command in protobuf's JSON form.
type jsonCommand struct {
	ID         string          `json:"id"`
	DeviceID   string          `json:"device_id"`
	Name       string          `json:"name"`
	Params     map[string]any  `json:"params"`
	State      json.RawMessage `json:"state"`
	Result     map[string]any  `json:"result"`
	Message    string          `json:"message"`
	Source     string          `json:"source"`
	RequestID  string          `json:"request_id"`
	TTL        string          `json:"ttl"`
	CreateTime *time.Time      `json:"create_time"`
	UpdateTime *time.Time      `json:"update_time"`
	ExpireTime *time.Time      `json:"expire_time"`
	Sequence   jsonInt         `json:"sequence"`
}

// jsonRuleState is a RuleState in protobuf's JSON form.
type jsonRuleState struct {
	RuleID       string     `json:"rule_id"`
	Generation   jsonInt    `json:"generation"`
	Active       bool       `json:"active"`
	PendingSince *time.Time `json:"pending_since"`
	Fired        bool       `json:"fired"`
	LastFired    *time.Time `json:"last_fired"`
}

type jsonFieldMeta struct {
	UpdateTime time.Time `json:"update_time"`
	Version    jsonInt   `json:"version"`
}

// jsonInt is an int64 written as a number or, as protobuf's JSON writes
// 64-bit integers, a string.
type jsonInt int64

func (n *jsonInt) UnmarshalJSON(b []byte) error {
	var v json.Number
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	i, err := v.Int64()
	*n = jsonInt(i)
	return err
}

var ndjsonRecord = protojson.UnmarshalOptions{}

// parseLine converts one NDJSON line: a twin, a twin record, a rule, or an
// export header (skipped: nothing returned). Lines in the form twinctl
// export writes (the .proto's field names) take a fast path; others, such
// as protobuf JSON with lowerCamelCase names, are read as protobuf JSON.
func parseLine(l []byte) (it twin.ImportItem, rule *twinv1.RuleRecord, key *twinv1.KeyRecord, id string, err error) {
	var j jsonTwin
	d := json.NewDecoder(bytes.NewReader(l))
	d.DisallowUnknownFields()
	if err := d.Decode(&j); err != nil {
		var syn *json.SyntaxError
		if !errors.As(err, &syn) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
			if it, id, ok := parseProtoLine(l); ok {
				return it, nil, nil, id, nil
			}
		}
		return it, nil, nil, "", fmt.Errorf("%w: %v; each line must be one JSON object: a twin ({\"id\": ..., \"type\": ..., "+
			"\"reported\": {...}, \"desired\": {...}}), a twin record ({\"twin\": {...}, ...}, as an export writes), {\"rule\": {...}} or {\"key\": {...}}",
			twin.ErrInvalidArgument, jsonError(err))
	}
	if d.More() {
		return it, nil, nil, j.ID, fmt.Errorf("%w: more than one JSON value on the line; put each twin on a line of its own", twin.ErrInvalidArgument)
	}
	switch {
	case j.Export != nil:
		return it, nil, nil, "", nil
	case j.Rule != nil:
		rule = &twinv1.RuleRecord{}
		if err := ndjsonRecord.Unmarshal(j.Rule, rule); err != nil {
			return it, rule, nil, "", fmt.Errorf("%w: rule: %v", twin.ErrInvalidArgument, err)
		}
		return it, rule, nil, rule.GetId(), nil
	case j.Key != nil:
		key = &twinv1.KeyRecord{}
		if err := ndjsonRecord.Unmarshal(j.Key, key); err != nil {
			return it, nil, key, "", fmt.Errorf("%w: key: %v", twin.ErrInvalidArgument, err)
		}
		return it, nil, key, key.GetName(), nil
	case j.Twin != nil:
		it, err = j.record()
		return it, nil, nil, j.Twin.ID, err
	}
	return twin.ImportItem{Twin: j.twin()}, nil, nil, j.ID, nil
}

// parseProtoLine reads a line as a TwinRecord or a Twin in protobuf's JSON
// form.
func parseProtoLine(l []byte) (twin.ImportItem, string, bool) {
	var r twinv1.TwinRecord
	if err := ndjsonRecord.Unmarshal(l, &r); err != nil || r.GetTwin() == nil {
		var t twinv1.Twin
		if err := ndjsonRecord.Unmarshal(l, &t); err != nil {
			return twin.ImportItem{}, "", false
		}
		r = twinv1.TwinRecord{Twin: &t}
	}
	it, err := importItem(&r)
	return it, r.GetTwin().GetId(), err == nil
}

// twin converts the twin of a line.
func (j *jsonTwin) twin() *twin.Twin {
	t := &twin.Twin{
		ID: j.ID, Type: j.Type, Labels: j.Labels,
		Reported: twin.Document(j.Reported), Desired: twin.Document(j.Desired),
		Version: int64(j.Version), DesiredAckedVersion: int64(j.DesiredAckedVersion),
	}
	if j.CreateTime != nil {
		t.CreateTime = *j.CreateTime
	}
	if j.UpdateTime != nil {
		t.UpdateTime = *j.UpdateTime
	}
	if j.Presence != nil {
		t.Presence.Connected = j.Presence.Connected
		if j.Presence.Since != nil {
			t.Presence.Since = *j.Presence.Since
		}
		if j.Presence.LastSeen != nil {
			t.Presence.LastSeen = *j.Presence.LastSeen
		}
	}
	if j.Metadata != nil {
		t.ReportedMeta = jsonMeta(j.Metadata.Reported)
		t.DesiredMeta = jsonMeta(j.Metadata.Desired)
	}
	return t
}

// record converts a twin record line.
func (j *jsonTwin) record() (twin.ImportItem, error) {
	t := j.Twin.twin()
	t.TokenHash = j.TokenHash
	t.CommandSeq = int64(j.CommandSequence)
	if len(j.Tombstones) > 0 {
		t.Tombstones = make(map[string]int64, len(j.Tombstones))
		for p, v := range j.Tombstones {
			t.Tombstones[p] = int64(v)
		}
	}
	it := twin.ImportItem{Twin: t}
	for i, c := range j.Commands {
		cmd := &twin.Command{
			Seq: int64(c.Sequence), Name: c.Name, Params: c.Params, Result: c.Result,
			Message: c.Message, Source: twin.Source(c.Source), RequestID: c.RequestID,
		}
		if cmd.Seq == 0 && c.ID != "" {
			if _, seq, err := twin.ParseCommandID(c.ID); err == nil {
				cmd.Seq = seq
			}
		}
		var st string
		if err := json.Unmarshal(c.State, &st); err == nil {
			cmd.State = twin.CommandState(twinv1.CommandState_value[st])
		} else {
			var n int32
			if err := json.Unmarshal(c.State, &n); err != nil {
				return it, fmt.Errorf("%w: command %d: state %s is not a CommandState", twin.ErrInvalidArgument, i, c.State)
			}
			cmd.State = twin.CommandState(n)
		}
		if c.TTL != "" {
			d, err := time.ParseDuration(c.TTL)
			if err != nil {
				return it, fmt.Errorf("%w: command %d: ttl %q is not a duration such as \"3600s\"", twin.ErrInvalidArgument, i, c.TTL)
			}
			cmd.TTL = d
		}
		for _, tm := range []struct {
			in  *time.Time
			out *time.Time
		}{{c.CreateTime, &cmd.CreateTime}, {c.UpdateTime, &cmd.UpdateTime}, {c.ExpireTime, &cmd.ExpireTime}} {
			if tm.in != nil {
				*tm.out = *tm.in
			}
		}
		it.Commands = append(it.Commands, cmd)
	}
	for _, s := range j.RuleStates {
		if it.RuleStates == nil {
			it.RuleStates = map[string]twin.RuleState{}
		}
		st := twin.RuleState{Gen: int64(s.Generation), Active: s.Active, Fired: s.Fired}
		if s.PendingSince != nil {
			st.PendingSince = *s.PendingSince
		}
		if s.LastFired != nil {
			st.LastFired = *s.LastFired
		}
		it.RuleStates[s.RuleID] = st
	}
	return it, nil
}

func jsonMeta(m map[string]jsonFieldMeta) map[string]twin.FieldMeta {
	if len(m) == 0 {
		return nil
	}
	out := make(map[string]twin.FieldMeta, len(m))
	for p, f := range m {
		out[p] = twin.FieldMeta{Time: f.UpdateTime, Version: int64(f.Version)}
	}
	return out
}

// jsonError words a JSON decoding error for a person.
func jsonError(err error) string {
	var syn *json.SyntaxError
	if errors.As(err, &syn) {
		return fmt.Sprintf("invalid JSON at byte %d: %v", syn.Offset, err)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return "the line ends before its JSON object does"
	}
	return err.Error()
}

// importItem converts a twin record for the engine.
func importItem(r *twinv1.TwinRecord) (twin.ImportItem, error) {
	p := r.GetTwin()
	if p == nil {
		return twin.ImportItem{}, fmt.Errorf("%w: the record has no twin", twin.ErrInvalidArgument)
	}
	if err := checkFinite("twin.reported", p.GetReported()); err != nil {
		return twin.ImportItem{}, err
	}
	if err := checkFinite("twin.desired", p.GetDesired()); err != nil {
		return twin.ImportItem{}, err
	}
	t := &twin.Twin{
		ID: p.GetId(), Type: p.GetType(), Labels: p.GetLabels(),
		Reported: document(p.GetReported()), Desired: document(p.GetDesired()),
		ReportedMeta: metaFromProto(p.GetMetadata().GetReported()),
		DesiredMeta:  metaFromProto(p.GetMetadata().GetDesired()),
		Tombstones:   r.GetTombstones(),
		Version:      p.GetVersion(), DesiredAckedVersion: p.GetDesiredAckedVersion(),
		CreateTime: timeFromProto(p.GetCreateTime()), UpdateTime: timeFromProto(p.GetUpdateTime()),
		TokenHash:  r.GetTokenHash(),
		CommandSeq: r.GetCommandSequence(),
	}
	t.Presence.Connected = p.GetPresence().GetConnected()
	t.Presence.Since = timeFromProto(p.GetPresence().GetSince())
	t.Presence.LastSeen = timeFromProto(p.GetPresence().GetLastSeen())
	it := twin.ImportItem{Twin: t}
	for _, c := range r.GetCommands() {
		cmd := &twin.Command{
			Seq: c.GetSequence(), Name: c.GetName(), State: twin.CommandState(c.GetState()),
			Message: c.GetMessage(), Source: twin.Source(c.GetSource()), RequestID: c.GetRequestId(),
			TTL:        c.GetTtl().AsDuration(),
			CreateTime: timeFromProto(c.GetCreateTime()), UpdateTime: timeFromProto(c.GetUpdateTime()),
			ExpireTime: timeFromProto(c.GetExpireTime()),
		}
		if c.GetParams() != nil {
			cmd.Params = document(c.GetParams())
		}
		if c.GetResult() != nil {
			cmd.Result = document(c.GetResult())
		}
		if cmd.Seq == 0 && c.GetId() != "" {
			if _, seq, err := twin.ParseCommandID(c.GetId()); err == nil {
				cmd.Seq = seq
			}
		}
		it.Commands = append(it.Commands, cmd)
	}
	for _, s := range r.GetRuleStates() {
		if it.RuleStates == nil {
			it.RuleStates = map[string]twin.RuleState{}
		}
		it.RuleStates[s.GetRuleId()] = twin.RuleState{
			Gen: s.GetGeneration(), Active: s.GetActive(), PendingSince: timeFromProto(s.GetPendingSince()),
			Fired: s.GetFired(), LastFired: timeFromProto(s.GetLastFired()),
		}
	}
	return it, nil
}

func metaFromProto(m map[string]*twinv1.FieldMetadata) map[string]twin.FieldMeta {
	if len(m) == 0 {
		return nil
	}
	out := make(map[string]twin.FieldMeta, len(m))
	for p, f := range m {
		out[p] = twin.FieldMeta{Time: timeFromProto(f.GetUpdateTime()), Version: f.GetVersion()}
	}
	return out
}

func timeFromProto(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

// exportBatch is the default number of twins per ExportTwins message;
// a message also ends before its twins pass exportMessageBytes, under
// gRPC's default 4 MiB limit on what a client receives.
const (
	exportBatch        = 500
	exportMessageBytes = 3 << 20
)

// ExportTwins streams a consistent, durable snapshot of the store.
func (ts *twinService) ExportTwins(req *twinv1.ExportTwinsRequest, stream twinv1.TwinService_ExportTwinsServer) error {
	const method = "ExportTwins"
	size := int(req.GetBatchSize())
	switch {
	case size < 0 || size > 5000:
		return invalid("batch_size is %d; give 1 to 5000, or 0 for %d", size, exportBatch)
	case size == 0:
		size = exportBatch
	}
	ctx, cancel := ts.s.streamContext(stream.Context())
	defer cancel()
	x, err := ts.s.engine.Export(ctx)
	if err != nil {
		return ts.s.streamStatus(method, ctx, err)
	}
	defer x.Close()
	timeout := ts.sendTimeout
	if timeout <= 0 {
		timeout = defaultSendTimeout
	}
	send := newSender(stream, timeout)
	defer send.close()
	header := &twinv1.ExportHeader{Revision: x.Revision(), Time: timestamppb.New(ts.s.opts.Clock())}
	msg := &twinv1.ExportTwinsResponse{Header: header}
	sent := false
	msgBytes := 0 // the size of msg's twins
	flush := func() error {
		err := send.send(ctx, msg)
		msg, sent, msgBytes = &twinv1.ExportTwinsResponse{Header: header}, true, 0
		return err
	}
	err = x.Each(ctx, func(it *twin.ExportItem) error {
		if it.RuleID != "" {
			msg.Rules = append(msg.Rules, &twinv1.RuleRecord{Id: it.RuleID, DefinitionJson: string(it.RuleDef)})
			return nil
		}
		if it.KeyName != "" {
			msg.Keys = append(msg.Keys, &twinv1.KeyRecord{Name: it.KeyName, DefinitionJson: string(it.KeyDef)})
			return nil
		}
		r := twinRecord(it)
		n := proto.Size(r)
		if len(msg.Twins) > 0 && msgBytes+n > exportMessageBytes {
			if err := flush(); err != nil {
				return err
			}
		}
		msg.Twins = append(msg.Twins, r)
		msgBytes += n
		if len(msg.Twins) >= size {
			return flush()
		}
		return nil
	})
	if err == nil && (len(msg.Twins) > 0 || len(msg.Rules) > 0 || len(msg.Keys) > 0 || !sent) {
		err = flush() // the rest; for an empty store, the header alone
	}
	return ts.s.streamStatus(method, ctx, err)
}

// twinRecord converts an exported twin.
func twinRecord(it *twin.ExportItem) *twinv1.TwinRecord {
	t := it.Twin
	r := &twinv1.TwinRecord{
		Twin:            twinProto(t),
		TokenHash:       t.TokenHash,
		Tombstones:      t.Tombstones,
		CommandSequence: t.CommandSeq,
	}
	for _, c := range it.Commands {
		r.Commands = append(r.Commands, commandProto(c))
	}
	for id, s := range it.RuleStates {
		r.RuleStates = append(r.RuleStates, &twinv1.RuleState{
			RuleId: id, Generation: s.Gen, Active: s.Active, PendingSince: timeProto(s.PendingSince),
			Fired: s.Fired, LastFired: timeProto(s.LastFired),
		})
	}
	return r
}
