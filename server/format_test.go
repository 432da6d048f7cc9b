package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/structpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
	"github.com/twind-io/twind/twin"
)

// fixtureDir holds a store written by twind at commit fe533d2 (the format
// before issue 9) and what that twind served from it after a restart; its
// README.md says how it was made.
const fixtureDir = "testdata/store-fe533d2"

// expectedStore is testdata/store-fe533d2/expected.json (see make.go there).
type expectedStore struct {
	Clock    time.Time                  `json:"clock"`
	DeviceID string                     `json:"device_id"`
	Token    string                     `json:"token"`
	Ids      []string                   `json:"ids"`
	Twins    map[string]json.RawMessage `json:"twins"`
	Deleted  []string                   `json:"deleted"`
	History  map[string]json.RawMessage `json:"history"`
	Commands map[string]json.RawMessage `json:"commands"`
	List     json.RawMessage            `json:"list"`
	Rules    json.RawMessage            `json:"rules"`
	Events   []json.RawMessage          `json:"events"`
}

// copyDir copies the files of src into a new directory.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// fixtureServer runs the current server on dir with its clock running from
// the fixture's, so that the fixture's queued commands have not expired,
// and returns a connection to it and a function that stops it.
func fixtureServer(t *testing.T, dir string, clock time.Time) (*grpc.ClientConn, func()) {
	t.Helper()
	started := time.Now()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan net.Addr, 1)
	done := make(chan error, 1)
	go func() {
		done <- server.Run(ctx, server.Options{DataDir: dir, Listener: l,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
			Clock:  func() time.Time { return clock.Add(time.Since(started)) },
			Ready:  func(a net.Addr) { ready <- a }})
	}()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("server on the fixture store: %v", err)
	}
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		conn.Close()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server.Run on the fixture store: %v", err)
		}
	}
	t.Cleanup(stop)
	return conn, stop
}

// storeFormat returns the format the store in dir records.
func storeFormat(t *testing.T, dir string) int {
	t.Helper()
	db, err := pebble.Open(dir, &pebble.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	v, closer, err := db.Get([]byte("m/format"))
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	var f struct {
		Format int `json:"format"`
	}
	if err := json.Unmarshal(v, &f); err != nil {
		t.Fatal(err)
	}
	return f.Format
}

func unmarshal[M proto.Message](t *testing.T, js json.RawMessage, m M) M {
	t.Helper()
	if err := protojson.Unmarshal(js, m); err != nil {
		t.Fatalf("expected.json: %v", err)
	}
	return m
}

// checkServedAsBefore compares what the server serves with what twind
// fe533d2 served from the same store.
func checkServedAsBefore(t *testing.T, conn *grpc.ClientConn, exp *expectedStore) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	twins, cmds := twinv1.NewTwinServiceClient(conn), twinv1.NewCommandServiceClient(conn)
	rules := twinv1.NewRuleServiceClient(conn)
	diff := func(what string, want, got proto.Message) {
		t.Helper()
		if d := cmp.Diff(want, got, protocmp.Transform()); d != "" {
			t.Errorf("%s differs from what twind fe533d2 served (-want +got):\n%s", what, d)
		}
	}
	for _, id := range exp.Deleted {
		if _, err := twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: id}); status.Code(err) != codes.NotFound {
			t.Errorf("GetTwin(%s) of a deleted twin = %v; want NotFound", id, err)
		}
	}
	for id, js := range exp.Twins {
		got, err := twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: id})
		if err != nil {
			t.Errorf("GetTwin(%s): %v", id, err)
			continue
		}
		diff("GetTwin("+id+")", unmarshal(t, js, &twinv1.GetTwinResponse{}), got)
		h, err := twins.ListTwinHistory(ctx, &twinv1.ListTwinHistoryRequest{Id: id, PageSize: 1000})
		if err != nil {
			t.Errorf("ListTwinHistory(%s): %v", id, err)
		} else {
			diff("ListTwinHistory("+id+")", unmarshal(t, exp.History[id], &twinv1.ListTwinHistoryResponse{}), h)
		}
		c, err := cmds.ListCommands(ctx, &twinv1.ListCommandsRequest{DeviceId: id, PageSize: 1000})
		if err != nil {
			t.Errorf("ListCommands(%s): %v", id, err)
		} else {
			diff("ListCommands("+id+")", unmarshal(t, exp.Commands[id], &twinv1.ListCommandsResponse{}), c)
		}
	}
	list, err := twins.ListTwins(ctx, &twinv1.ListTwinsRequest{PageSize: 1000})
	if err != nil {
		t.Fatalf("ListTwins: %v", err)
	}
	diff("ListTwins", unmarshal(t, exp.List, &twinv1.ListTwinsResponse{}), list)
	rl, err := rules.ListRules(ctx, &twinv1.ListRulesRequest{})
	if err != nil {
		t.Fatalf("ListRules: %v", err)
	}
	diff("ListRules", unmarshal(t, exp.Rules, &twinv1.ListRulesResponse{}), rl)
	// The watch log replays every change from revision 1.
	w, err := twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{StartRevision: 1})
	if err != nil {
		t.Fatalf("WatchTwins: %v", err)
	}
	for i, js := range exp.Events {
		got, err := w.Recv()
		if err != nil {
			t.Fatalf("WatchTwins from revision 1, event %d of %d: %v", i+1, len(exp.Events), err)
		}
		want := unmarshal(t, js, &twinv1.WatchTwinsResponse{})
		diff(fmt.Sprintf("WatchTwins event at revision %d", want.GetEvent().GetRevision()), want, got)
	}
}

// A store written by twind before issue 9 (commit fe533d2) opens with this
// twind, which serves every twin, version, history entry, watch event,
// command and rule as the old one did, twice (a conversion at start must
// not convert again, nor lose anything, on the next start); the device
// connects with the token issued then, and the rule's state for a twin
// carries over: a report that keeps its condition true does not fire it
// again, one that makes it true again does.
func TestStoreOfFe533d2(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(fixtureDir, "expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	var exp expectedStore
	if err := json.Unmarshal(b, &exp); err != nil {
		t.Fatal(err)
	}
	dir := copyDir(t, filepath.Join(fixtureDir, "data"))
	if vs, err := twin.Check(twin.Options{Dir: dir}); err != nil || len(vs) != 0 {
		t.Fatalf("Check(the fixture, format 1) = %v, %v; want no violations", vs, err)
	}
	_, stop := fixtureServer(t, dir, exp.Clock)
	stop() // opened and closed once: converted to format 3
	if f := storeFormat(t, dir); f != 3 {
		t.Errorf("the fixture's format after an open = %d; want 3", f)
	}
	// Check reports a value of format 1 left in a store of format 3.
	if vs, err := twin.Check(twin.Options{Dir: dir}); err != nil || len(vs) != 0 {
		t.Errorf("Check(the converted fixture) = %v, %v; want no violations", vs, err)
	}
	conn, stop := fixtureServer(t, dir, exp.Clock)
	checkServedAsBefore(t, conn, &exp)
	stop()
	conn, _ = fixtureServer(t, dir, exp.Clock)
	checkServedAsBefore(t, conn, &exp)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	devices := twinv1.NewDeviceServiceClient(conn)
	hello := func(token string) (*twinv1.ConnectResponse, error) {
		st, err := devices.Connect(ctx)
		if err != nil {
			return nil, err
		}
		defer st.CloseSend()
		if err := st.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{DeviceId: exp.DeviceID, Token: token}}}); err != nil {
			return nil, err
		}
		return st.Recv()
	}
	if _, err := hello(exp.Token + "x"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("Connect(%s) with a wrong token = %v; want Unauthenticated", exp.DeviceID, err)
	}
	if m, err := hello(exp.Token); err != nil || m.GetWelcome() == nil {
		t.Errorf("Connect(%s) with the token issued by twind fe533d2 = %v, %v; want a welcome", exp.DeviceID, m, err)
	}

	// fridge-1 is warm and rule fridge-warm (RISING) fired for it once.
	twins, cmds := twinv1.NewTwinServiceClient(conn), twinv1.NewCommandServiceClient(conn)
	alarms := func() int {
		t.Helper()
		resp, err := cmds.ListCommands(ctx, &twinv1.ListCommandsRequest{DeviceId: "fridge-1", PageSize: 1000})
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, c := range resp.Commands {
			if c.Name == "alarm" {
				n++
			}
		}
		return n
	}
	for _, step := range []struct {
		temp float64
		want int
	}{
		{9.7, 1},  // still warm: the rule's state says it fired in this period
		{3.0, 1},  // cool again
		{10.0, 2}, // warm again: it fires
	} {
		p, err := structpb.NewStruct(map[string]any{"temp_c": step.temp})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "fridge-1", Patch: p}); err != nil {
			t.Fatal(err)
		}
		if got := alarms(); got != step.want {
			t.Errorf("after reporting temp_c %v: %d alarm commands for fridge-1; want %d", step.temp, got, step.want)
		}
	}
}
