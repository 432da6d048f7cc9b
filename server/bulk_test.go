package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/testing/protocmp"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// importAll sends the requests on one ImportTwins stream, one at a time,
// and returns every response, the last one done.
func importAll(t *testing.T, s *testServer, reqs ...*twinv1.ImportTwinsRequest) []*twinv1.ImportTwinsResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := s.twins.ImportTwins(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []*twinv1.ImportTwinsResponse
	for _, r := range reqs {
		if err := stream.Send(r); err != nil {
			t.Fatal(err)
		}
		m, err := stream.Recv()
		if err != nil {
			t.Fatalf("import: %v", err)
		}
		out = append(out, m)
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	m, err := stream.Recv()
	if err != nil || !m.GetDone() {
		t.Fatalf("last import response = %v, %v; want done", m, err)
	}
	out = append(out, m)
	if _, err := stream.Recv(); err != io.EOF {
		t.Fatalf("import stream after done: %v; want EOF", err)
	}
	return out
}

// TestImportTwins: NDJSON and protobuf items in one stream; each bad line
// is reported with its line number and code and the rest imported; an
// existing id is refused without upsert and replaced with it; a watcher
// with a filter that matches nothing sees exactly one IMPORTED event per
// import and no event per twin.
func TestImportTwins(t *testing.T) {
	s := startServer(t, nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "fridge-0", Type: "fridge"}}); err != nil {
		t.Fatal(err)
	}
	watch, err := s.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{Filter: `twin.type == "none"`, StartRevision: 2})
	if err != nil {
		t.Fatal(err)
	}
	deep := strings.Repeat(`{"a":`, 20) + "1" + strings.Repeat("}", 20)
	ndjson := strings.Join([]string{
		`{"id":"fridge-1","type":"fridge","labels":{"site":"berlin"},"reported":{"temp_c":2.5},"desired":{"target_c":4}}`,
		``,
		`{"id":"fridge-2","type":"fridge",`,
		`{"id":"bad id","type":"fridge"}`,
		`{"id":"fridge-3","reported":` + deep + `}`,
		`{"id":"fridge-0","type":"fridge"}`,
		`{"id":"fridge-4","colour":"red"}`,
		`{"id":"fridge-5","type":"fridge","reported":{"door":"closed"}}`,
	}, "\n")
	resps := importAll(t, s,
		&twinv1.ImportTwinsRequest{Ndjson: []byte(ndjson + "\n")},
		&twinv1.ImportTwinsRequest{
			Ndjson: []byte(`{"id":"fridge-6","type":"fridge"}` + "\n" + `{"id":"fridge-1"}`),
			Twins:  []*twinv1.TwinRecord{{Twin: &twinv1.Twin{Id: "car-1", Type: "car", Reported: jsonStruct(t, `{"fuel":0.5}`)}}, {Twin: &twinv1.Twin{Id: "car-1"}}},
		})
	type e struct {
		Line  int64
		Index int32
		ID    string
		Code  string
	}
	var got []e
	for _, r := range resps {
		for _, x := range r.GetErrors() {
			got = append(got, e{x.GetLine(), x.GetIndex(), x.GetId(), x.GetCode()})
			if x.GetMessage() == "" {
				t.Errorf("error %v has no message", x)
			}
		}
	}
	want := []e{
		{3, 0, "", "INVALID_ARGUMENT"},
		{4, 0, "bad id", "INVALID_ARGUMENT"},
		{5, 0, "fridge-3", "INVALID_ARGUMENT"},
		{6, 0, "fridge-0", "ALREADY_EXISTS"},
		{7, 0, "", "INVALID_ARGUMENT"},
		{0, 1, "car-1", "ALREADY_EXISTS"},
		{10, 0, "fridge-1", "ALREADY_EXISTS"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("import errors (-want +got):\n%s", diff)
	}
	if last := resps[len(resps)-1]; last.GetTotalImported() != 4 || last.GetTotalFailed() != 7 || last.GetRevision() == 0 {
		t.Errorf("last response = %v; want 4 imported, 7 failed, the marker's revision", last)
	}
	if resps[0].GetImported() != 2 || resps[1].GetImported() != 2 {
		t.Errorf("imported per batch = %d, %d; want 2, 2", resps[0].GetImported(), resps[1].GetImported())
	}
	for _, id := range []string{"fridge-1", "fridge-5", "fridge-6", "car-1"} {
		tw, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: id})
		if err != nil || tw.GetTwin().GetVersion() != 1 {
			t.Errorf("GetTwin(%s) = %v, %v; want version 1", id, tw, err)
		}
	}
	if tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-1"}); tw.GetTwin().GetDelta().AsMap()["target_c"] != 4.0 {
		t.Errorf("imported fridge-1 = %v; want delta target_c 4", tw)
	}
	m, err := watch.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if ev := m.GetEvent(); ev.GetKind() != twinv1.TwinEventKind_TWIN_EVENT_KIND_IMPORTED || ev.GetTwin() != nil ||
		ev.GetRevision() != resps[len(resps)-1].GetRevision() || ev.GetPatch().AsMap()["twins"] != 4.0 {
		t.Errorf("watch event = %v; want the import's marker", ev)
	}

	// Upsert replaces, at the next version.
	resps = importAll(t, s, &twinv1.ImportTwinsRequest{Upsert: true, Ndjson: []byte(`{"id":"fridge-0","type":"fridge","reported":{"temp_c":9}}`)})
	if r := resps[0]; r.GetImported() != 1 || len(r.GetErrors()) != 0 {
		t.Errorf("upsert = %v", r)
	}
	if tw, _ := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "fridge-0"}); tw.GetTwin().GetVersion() != 2 || tw.GetTwin().GetReported().AsMap()["temp_c"] != 9.0 {
		t.Errorf("upserted fridge-0 = %v; want version 2, temp_c 9", tw)
	}
	m, err = watch.Recv()
	if err != nil || m.GetEvent().GetKind() != twinv1.TwinEventKind_TWIN_EVENT_KIND_IMPORTED || m.GetEvent().GetPatch().AsMap()["twins"] != 1.0 {
		t.Errorf("second watch event = %v, %v; want the second import's marker", m, err)
	}
}

// TestImportTwinsDisconnect: a client that goes away mid-stream keeps the
// batches it had acknowledged, and watchers still see the marker.
func TestImportTwinsDisconnect(t *testing.T) {
	s := startServer(t, nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	watch, err := s.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{StartRevision: 1})
	if err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithCancel(ctx)
	stream, err := s.twins.ImportTwins(sctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&twinv1.ImportTwinsRequest{Ndjson: []byte(`{"id":"a","type":"x"}` + "\n" + `{"id":"b","type":"x"}`)}); err != nil {
		t.Fatal(err)
	}
	if m, err := stream.Recv(); err != nil || m.GetImported() != 2 {
		t.Fatalf("first batch = %v, %v", m, err)
	}
	scancel() // gone, without closing its side
	m, err := watch.Recv()
	if err != nil || m.GetEvent().GetKind() != twinv1.TwinEventKind_TWIN_EVENT_KIND_IMPORTED || m.GetEvent().GetPatch().AsMap()["twins"] != 2.0 {
		t.Errorf("watch after a disconnected import = %v, %v; want its marker", m, err)
	}
	for _, id := range []string{"a", "b"} {
		if _, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: id}); err != nil {
			t.Errorf("GetTwin(%s) after the client left: %v", id, err)
		}
	}
}

// export reads a whole ExportTwins stream.
func export(t *testing.T, s *testServer) (*twinv1.ExportHeader, []*twinv1.TwinRecord, []*twinv1.RuleRecord) {
	t.Helper()
	stream, err := s.twins.ExportTwins(context.Background(), &twinv1.ExportTwinsRequest{BatchSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	var (
		h     *twinv1.ExportHeader
		twins []*twinv1.TwinRecord
		rules []*twinv1.RuleRecord
	)
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return h, twins, rules
		}
		if err != nil {
			t.Fatal(err)
		}
		if h != nil && !sameHeader(h, m.GetHeader()) {
			t.Errorf("header changed: %v, then %v", h, m.GetHeader())
		}
		h = m.GetHeader()
		if len(m.GetRules()) > 0 && len(twins) > 0 {
			t.Errorf("rules after twins")
		}
		twins = append(twins, m.GetTwins()...)
		rules = append(rules, m.GetRules()...)
	}
}

func sameHeader(a, b *twinv1.ExportHeader) bool { return cmp.Diff(a, b, protocmp.Transform()) == "" }

// TestExportRestore: a fleet with commands, tokens, a rule and rule states
// is exported, imported into a fresh store, and is the same there; a device
// connects with its old token and gets its queued command; the restore
// survives a restart.
func TestExportRestore(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := startServer(t, nil, nil)
	rulesC := twinv1.NewRuleServiceClient(s.conn)
	if _, err := rulesC.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: &twinv1.Rule{Id: "warm", Types: []string{"fridge"},
		Condition: "twin.reported.temp_c > 8.0",
		Actions:   []*twinv1.Action{{Action: &twinv1.Action_Emit{Emit: &twinv1.EmitAction{Severity: twinv1.Severity_SEVERITY_WARNING, Message: `"warm"`}}}}}}); err != nil {
		t.Fatal(err)
	}
	cmds := twinv1.NewCommandServiceClient(s.conn)
	tokens := map[string]string{}
	for i := range 5 {
		id := fmt.Sprint("fridge-", i)
		tokens[id] = createDevice(t, s, id, "fridge")
		if _, err := s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: id, Patch: jsonStruct(t, `{"temp_c":9}`)}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: id, Patch: jsonStruct(t, `{"target_c":4,"eco":true}`)}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: id, Patch: jsonStruct(t, `{"eco":null}`)}); err != nil {
			t.Fatal(err)
		}
		if _, err := cmds.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: id, Name: "defrost"}); err != nil {
			t.Fatal(err)
		}
	}
	h, twins, rules := export(t, s)
	if h.GetRevision() != s.engine.Revision() || len(twins) != 5 || len(rules) != 1 {
		t.Fatalf("export: header %v, %d twins, %d rules; want revision %d, 5 twins, 1 rule", h, len(twins), len(rules), s.engine.Revision())
	}
	for _, r := range twins {
		if len(r.GetTokenHash()) != 32 || len(r.GetCommands()) != 1 || len(r.GetRuleStates()) != 1 || !r.GetRuleStates()[0].GetActive() ||
			r.GetTombstones()["/eco"] == 0 {
			t.Errorf("exported record %v lacks its token hash, command, rule state or tombstone", r)
		}
	}

	fs := vfs.NewMem()
	r := startServer(t, fs, nil)
	resps := importAll(t, r, &twinv1.ImportTwinsRequest{KeepVersions: true, Rules: rules, Twins: twins})
	if got := resps[0]; got.GetImported() != 5 || got.GetRulesImported() != 1 || len(got.GetErrors()) != 0 {
		t.Fatalf("restore = %v", got)
	}
	_, again, rulesAgain := export(t, r)
	ignore := protocmp.IgnoreFields(&twinv1.Twin{}, "revision", "presence")
	if diff := cmp.Diff(twins, again, protocmp.Transform(), ignore, protocmp.SortRepeated(func(a, b *twinv1.TwinRecord) bool {
		return a.GetTwin().GetId() < b.GetTwin().GetId()
	})); diff != "" {
		t.Errorf("restored fleet (-exported +restored):\n%s", diff)
	}
	if diff := cmp.Diff(rules, rulesAgain, protocmp.Transform()); diff != "" {
		t.Errorf("restored rules (-exported +restored):\n%s", diff)
	}
	// The same backup as NDJSON, as twinctl export writes it (the fast
	// path), and one line in protobuf JSON's lowerCamelCase: the same
	// fleet.
	var nd []byte
	for i, tw := range twins {
		opts := protojson.MarshalOptions{UseProtoNames: i != 0}
		b, err := opts.Marshal(tw)
		if err != nil {
			t.Fatal(err)
		}
		nd = append(append(nd, compactLine(t, b)...), '\n')
	}
	for _, r := range rules {
		b, _ := protojson.MarshalOptions{UseProtoNames: true}.Marshal(r)
		nd = append(append(append(append(nd, `{"rule":`...), compactLine(t, b)...), '}'), '\n')
	}
	r2 := startServer(t, nil, nil)
	resps = importAll(t, r2, &twinv1.ImportTwinsRequest{KeepVersions: true, Ndjson: nd})
	if got := resps[0]; got.GetImported() != 5 || got.GetRulesImported() != 1 || len(got.GetErrors()) != 0 {
		t.Fatalf("restore from NDJSON = %v", got)
	}
	_, again, _ = export(t, r2)
	if diff := cmp.Diff(twins, again, protocmp.Transform(), ignore, protocmp.SortRepeated(func(a, b *twinv1.TwinRecord) bool {
		return a.GetTwin().GetId() < b.GetTwin().GetId()
	})); diff != "" {
		t.Errorf("restored from NDJSON (-exported +restored):\n%s", diff)
	}

	// The device connects with its old token and gets its command.
	d := connect(t, r, &twinv1.Hello{DeviceId: "fridge-3", Token: tokens["fridge-3"]}, true)
	if w := d.next().GetWelcome(); w == nil || w.GetVersion() != twins[0].GetTwin().GetVersion() {
		t.Errorf("welcome = %v; want one at the twin's version", w)
	}
	if c := d.next().GetCommand(); c.GetName() != "defrost" || c.GetId() != "fridge-3~1" {
		t.Errorf("after welcome: %v; want the defrost command", c)
	}
	d.cancel()

	// A wrong token is still refused.
	bad := connect(t, r, &twinv1.Hello{DeviceId: "fridge-2", Token: tokens["fridge-3"]}, true)
	if err := bad.end(); status.Code(err) != codes.Unauthenticated {
		t.Errorf("connect with another device's token = %v; want UNAUTHENTICATED", err)
	}
}

// TestImportSurvivesRestart: what an import acknowledged is there after a
// restart.
func TestImportSurvivesRestart(t *testing.T) {
	fs := vfs.NewMem()
	s := startServer(t, fs, nil)
	var b strings.Builder
	for i := range 3000 {
		fmt.Fprintf(&b, `{"id":"f%d","type":"fridge","reported":{"temp_c":%d}}`+"\n", i, i%10)
	}
	resps := importAll(t, s, &twinv1.ImportTwinsRequest{Ndjson: []byte(b.String())})
	if resps[0].GetImported() != 3000 {
		t.Fatalf("imported %d; want 3000", resps[0].GetImported())
	}
	if err := s.Shutdown(); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, fs, nil)
	tw, err := s.twins.GetTwin(context.Background(), &twinv1.GetTwinRequest{Id: "f2999"})
	if err != nil || tw.GetTwin().GetReported().AsMap()["temp_c"] != 9.0 {
		t.Errorf("after restart: %v, %v", tw, err)
	}
	if n := s.engine.Len(); n != 3000 {
		t.Errorf("after restart: %d twins; want 3000", n)
	}
}

func compactLine(t *testing.T, b []byte) []byte {
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestExportRestoreKeys: API keys made through the API go into an export
// and come back with its import, so that a restored server takes the same
// keys; keys of the flag stay with the server's flags.
func TestExportRestoreKeys(t *testing.T) {
	s := startServer(t, nil, func(o *Options) { o.APIToken = "root" })
	keys := twinv1.NewKeyServiceClient(s.conn)
	ops, err := keys.CreateKey(as("root"), &twinv1.CreateKeyRequest{Name: "ops", Role: twinv1.Role_ROLE_OPERATOR})
	if err != nil {
		t.Fatal(err)
	}
	stream, err := s.twins.ExportTwins(as("root"), &twinv1.ExportTwinsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var exported []*twinv1.KeyRecord
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		exported = append(exported, m.GetKeys()...)
	}
	if len(exported) != 1 || exported[0].GetName() != "ops" || strings.Contains(exported[0].GetDefinitionJson(), ops.GetSecret()) {
		t.Fatalf("exported keys %v; want ops alone, without its secret", exported)
	}

	r := startServer(t, nil, func(o *Options) { o.APIToken = "root2" })
	imp := func(req *twinv1.ImportTwinsRequest) *twinv1.ImportTwinsResponse {
		t.Helper()
		st, err := r.twins.ImportTwins(as("root2"))
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(req); err != nil {
			t.Fatal(err)
		}
		resp, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		st.CloseSend()
		for {
			if _, err := st.Recv(); err != nil {
				break
			}
		}
		return resp
	}
	if resp := imp(&twinv1.ImportTwinsRequest{Keys: exported}); resp.GetKeysImported() != 1 || len(resp.GetErrors()) != 0 {
		t.Fatalf("import of the keys = %v", resp)
	}
	if _, err := r.twins.ListTwins(as(ops.GetSecret()), &twinv1.ListTwinsRequest{}); err != nil {
		t.Errorf("the restored key on the new server: %v", err)
	}
	if _, err := r.twins.CreateTwin(as(ops.GetSecret()), &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "x"}}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("the restored operator key creating a twin = %v; want PERMISSION_DENIED (its role came with it)", err)
	}
	// Again: refused without upsert, taken with it; as an NDJSON line too.
	resp := imp(&twinv1.ImportTwinsRequest{Keys: exported})
	if len(resp.GetErrors()) != 1 || !resp.GetErrors()[0].GetKey() || resp.GetErrors()[0].GetCode() != "ALREADY_EXISTS" {
		t.Errorf("importing an existing key without upsert = %v; want ALREADY_EXISTS for the key", resp)
	}
	line := `{"key": {"name": "ops", "definition_json": ` + strconv.Quote(exported[0].GetDefinitionJson()) + `}}` + "\n"
	if resp := imp(&twinv1.ImportTwinsRequest{Upsert: true, Ndjson: []byte(line)}); resp.GetKeysImported() != 1 || len(resp.GetErrors()) != 0 {
		t.Errorf("importing the key as an NDJSON line with upsert = %v", resp)
	}
	bad := imp(&twinv1.ImportTwinsRequest{Keys: []*twinv1.KeyRecord{{Name: "bad", DefinitionJson: `{"role": "king"}`}, {Name: "api-token", DefinitionJson: exported[0].GetDefinitionJson()}}})
	if len(bad.GetErrors()) != 2 || bad.GetErrors()[0].GetCode() != "INVALID_ARGUMENT" || bad.GetErrors()[1].GetCode() != "FAILED_PRECONDITION" {
		t.Errorf("importing a bad key record and one named as the flag's key = %v; want INVALID_ARGUMENT and FAILED_PRECONDITION", bad)
	}
}
