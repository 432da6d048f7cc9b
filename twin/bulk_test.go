package twin

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

func checkClean(t *testing.T, fs vfs.FS) {
	t.Helper()
	vs, err := Check(Options{FS: fs, Dir: "db"})
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	for _, v := range vs {
		t.Errorf("Check: %v", v)
	}
}

func fridgeItem(t testing.TB, id string) ImportItem {
	return ImportItem{Twin: &Twin{ID: id, Type: "fridge", Labels: map[string]string{"site": "berlin"},
		Reported: doc(t, `{"temp_c":2.5,"door":"closed"}`), Desired: doc(t, `{"target_c":4}`)}}
}

// TestImport: imported twins are at version 1, readable at once, with no
// history and no watch-log entry; an existing id is refused with a per-item
// error and the rest imported; upsert replaces; keep_versions keeps the
// version and refuses one that would be reused; bad items are reported by
// index. The store passes Check and survives a restart.
func TestImport(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{Workers: 2, VShards: 8})
	if _, err := e.Create(ctx, CreateRequest{ID: "fridge-0", Type: "fridge"}); err != nil {
		t.Fatal(err)
	}
	rev := e.Revision()
	var items []ImportItem
	for i := range 5 {
		items = append(items, fridgeItem(t, fmt.Sprint("fridge-", i)))
	}
	items = append(items, ImportItem{Twin: &Twin{ID: "bad id", Type: "fridge"}},
		ImportItem{Twin: &Twin{ID: "deep", Reported: doc(t, `{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":{"l":{"m":{"n":{"o":{"p":{"q":1}}}}}}}}}}}}}}}}}`)}},
		ImportItem{})
	errs, err := e.Import(ctx, items, ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantErrs := []struct {
		index int
		is    error
	}{{0, ErrAlreadyExists}, {5, ErrInvalidID}, {6, ErrLimit}, {7, ErrInvalidArgument}}
	if len(errs) != len(wantErrs) {
		t.Fatalf("Import errors = %v; want %d", errs, len(wantErrs))
	}
	for i, w := range wantErrs {
		if errs[i].Index != w.index || !errors.Is(errs[i], w.is) {
			t.Errorf("Import error %d = %v; want item %d, %v", i, errs[i], w.index, w.is)
		}
	}
	if got := e.Revision(); got != rev {
		t.Errorf("revision after import = %d; want %d (no watch-log entry per twin)", got, rev)
	}
	for i := 1; i < 5; i++ {
		tw, err := e.Get(fmt.Sprint("fridge-", i))
		if err != nil {
			t.Fatal(err)
		}
		if tw.Version != 1 || tw.Revision != 0 || tw.Reported["temp_c"] != 2.5 || tw.Delta["target_c"] != 4.0 ||
			tw.ReportedMeta["/temp_c"].Version != 1 || tw.Labels["site"] != "berlin" {
			t.Errorf("imported twin = %+v; want version 1, revision 0, its documents, delta and metadata", tw)
		}
		if h, err := e.History(tw.ID, 0, 10); err != nil || len(h) != 0 {
			t.Errorf("History(imported) = %v, %v; want none", h, err)
		}
	}
	if tw, _ := e.Get("fridge-0"); tw.Version != 1 || tw.Type != "fridge" || len(tw.Reported) != 0 {
		t.Errorf("refused import changed the existing twin: %+v", tw)
	}

	// A change after the import is the next version, with history.
	tw, err := e.Report(ctx, PatchRequest{ID: "fridge-1", Patch: doc(t, `{"temp_c":3}`)})
	if err != nil || tw.Version != 2 {
		t.Fatalf("Report after import = %v, %v; want version 2", tw, err)
	}

	// Upsert replaces, at the next version.
	errs, err = e.Import(ctx, []ImportItem{fridgeItem(t, "fridge-1")}, ImportOptions{Upsert: true})
	if err != nil || len(errs) != 0 {
		t.Fatalf("upsert = %v, %v", errs, err)
	}
	if tw, _ := e.Get("fridge-1"); tw.Version != 3 || tw.Reported["temp_c"] != 2.5 || tw.ReportedMeta["/temp_c"].Version != 3 {
		t.Errorf("upserted twin = %+v; want version 3 with the imported state", tw)
	}

	// keep_versions keeps a higher version and refuses a reused one.
	hi := fridgeItem(t, "fridge-2")
	hi.Twin.Version = 40
	low := fridgeItem(t, "fridge-3")
	low.Twin.Version = 1
	fresh := fridgeItem(t, "fridge-9")
	fresh.Twin.Version = 7
	errs, err = e.Import(ctx, []ImportItem{hi, low, fresh}, ImportOptions{Upsert: true, KeepVersions: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(errs) != 1 || errs[0].Index != 1 || !errors.Is(errs[0], ErrVersionMismatch) {
		t.Errorf("keep_versions errors = %v; want item 1 refused with a version mismatch", errs)
	}
	if tw, _ := e.Get("fridge-2"); tw.Version != 40 {
		t.Errorf("keep_versions: version %d; want 40", tw.Version)
	}
	if tw, _ := e.Get("fridge-9"); tw.Version != 7 {
		t.Errorf("keep_versions: version %d; want 7", tw.Version)
	}
	// Deleted, then imported: the version follows the deleted one's.
	if err := e.Delete(ctx, "fridge-4", 0); err != nil {
		t.Fatal(err)
	}
	if errs, err := e.Import(ctx, []ImportItem{fridgeItem(t, "fridge-4")}, ImportOptions{}); err != nil || len(errs) != 0 {
		t.Fatalf("import after delete = %v, %v", errs, err)
	}
	if tw, _ := e.Get("fridge-4"); tw.Version != 2 {
		t.Errorf("import after delete: version %d; want 2", tw.Version)
	}
	e.Close()
	checkClean(t, fs)

	e = openMem(t, fs, Options{Workers: 2, VShards: 8})
	defer e.Close()
	if n := e.Len(); n != 6 {
		t.Errorf("after restart: %d twins; want 6", n)
	}
	if tw, err := e.Get("fridge-2"); err != nil || tw.Version != 40 || tw.Reported["door"] != "closed" {
		t.Errorf("after restart: %+v, %v", tw, err)
	}
}

// TestImportMarker: watchers see no event per imported twin and exactly
// one marker per import.
func TestImportMarker(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e := openMem(t, vfs.NewMem(), Options{Workers: 2, VShards: 8})
	defer e.Close()
	evs := make(chan *Event, 100)
	wctx, wcancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		e.Watch(wctx, 1, func(ev *Event) error { evs <- ev; return nil })
	}()
	defer func() { wcancel(); wg.Wait() }()
	var items []ImportItem
	for i := range 100 {
		items = append(items, fridgeItem(t, fmt.Sprint("f", i)))
	}
	for i := 0; i < 100; i += 25 {
		if errs, err := e.Import(ctx, items[i:i+25], ImportOptions{}); err != nil || len(errs) != 0 {
			t.Fatal(errs, err)
		}
	}
	rev, err := e.MarkImport(ctx, 100)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Create(ctx, CreateRequest{ID: "after"}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []EventKind{KindImported, KindCreated} {
		select {
		case ev := <-evs:
			if ev.Kind != want {
				t.Fatalf("event %+v; want kind %v", ev, want)
			}
			if want == KindImported && (ev.Revision != rev || ev.Twin != nil || ev.Patch["twins"] != 100.0) {
				t.Errorf("marker = %+v; want revision %d, no twin, 100 twins", ev, rev)
			}
		case <-ctx.Done():
			t.Fatal("no event")
		}
	}
	select {
	case ev := <-evs:
		t.Errorf("unexpected event %+v", ev)
	default:
	}
}

// TestExportRestore: an export of a fleet with commands, tokens and rule
// states, taken while writes go on, imports into a fresh store as the same
// twins (metadata, versions, token hashes, commands, rule states), and a
// device connects there with its old token.
func TestExportRestore(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{Workers: 2, VShards: 8})
	hash := sha256.Sum256([]byte("secret-token"))
	for i := range 20 {
		id := fmt.Sprint("car-", i)
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "car", Reported: doc(t, `{"fuel":0.5}`)}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.UpdateDesired(ctx, PatchRequest{ID: id, Patch: doc(t, `{"locked":true}`)}); err != nil {
			t.Fatal(err)
		}
		if err := e.SetTokenHash(ctx, id, hash[:]); err != nil {
			t.Fatal(err)
		}
		if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: id, Name: "honk"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.PutRule("r1", []byte(`{"id":"r1"}`)); err != nil {
		t.Fatal(err)
	}
	// A rule state, as the worker stores it.
	state := RuleState{Gen: 3, Active: true, LastFired: time.Unix(1700000000, 0).UTC()}
	if errs, err := e.Import(ctx, []ImportItem{{Twin: &Twin{ID: "planter-1", Type: "planter"},
		RuleStates: map[string]RuleState{"r1": state}}}, ImportOptions{}); err != nil || len(errs) != 0 {
		t.Fatal(errs, err)
	}
	// Writes go on during the export; it is consistent at its revision.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			e.Report(ctx, PatchRequest{ID: "car-0", Patch: Document{"speed_kmh": float64(i)}})
		}
	}()
	x, err := e.Export(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var items []ImportItem
	var rules []string
	err = x.Each(ctx, func(it *ExportItem) error {
		if it.RuleID != "" {
			rules = append(rules, it.RuleID+"="+string(it.RuleDef))
			return nil
		}
		items = append(items, ImportItem{Twin: it.Twin, Commands: it.Commands, RuleStates: it.RuleStates})
		return nil
	})
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	x.Close()
	if diff := cmp.Diff([]string{`r1={"id":"r1"}`}, rules); diff != "" {
		t.Errorf("exported rules (-want +got):\n%s", diff)
	}
	if len(items) != 21 {
		t.Fatalf("exported %d twins; want 21", len(items))
	}
	// The export's car-0 is at one revision: its revision is at most
	// the export's.
	want := map[string]*Twin{}
	for _, it := range items {
		if it.Twin.Revision > x.Revision() {
			t.Errorf("exported %q at revision %d, after the export's %d", it.Twin.ID, it.Twin.Revision, x.Revision())
		}
		want[it.Twin.ID] = it.Twin
		if it.Twin.ID != "planter-1" && (len(it.Commands) != 1 || !bytes.Equal(it.Twin.TokenHash, hash[:])) {
			t.Errorf("exported %q with %d commands, token hash %x", it.Twin.ID, len(it.Commands), it.Twin.TokenHash)
		}
	}
	e.Close()

	fs2 := vfs.NewMem()
	r := openMem(t, fs2, Options{Workers: 3, VShards: 16})
	if errs, err := r.Import(ctx, items, ImportOptions{KeepVersions: true}); err != nil || len(errs) != 0 {
		t.Fatal(errs, err)
	}
	for id, w := range want {
		got, err := r.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(w, got, cmpopts.IgnoreFields(Twin{}, "Revision", "Presence"), cmpopts.EquateEmpty()); diff != "" {
			t.Errorf("restored %q (-exported +restored):\n%s", id, diff)
		}
	}
	cmds, _, err := r.ListCommands("car-3", nil, 0, 10)
	if err != nil || len(cmds) != 1 || cmds[0].Name != "honk" || cmds[0].State != CommandQueued {
		t.Errorf("restored commands = %v, %v; want the queued honk", cmds, err)
	}
	// The device connects with its old token and gets its command.
	s := newRecSink()
	if _, err := r.ConnectWithToken(ctx, "car-3", hash[:], s); err != nil {
		t.Fatalf("connect with the old token after restore: %v", err)
	}
	// The rule state is restored: an export of the restored store has it.
	x, err = r.Export(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got RuleState
	x.Each(ctx, func(it *ExportItem) error {
		if it.Twin != nil && it.Twin.ID == "planter-1" {
			got = it.RuleStates["r1"]
		}
		return nil
	})
	x.Close()
	if got != state {
		t.Errorf("restored rule state = %+v; want %+v", got, state)
	}
	r.Close()
	checkClean(t, fs2)
}

// TestImportDurable: an import is durable once answered: a power loss
// right after keeps every twin of it (Pebble's crashable filesystem, which
// drops what was not synced).
func TestImportDurable(t *testing.T) {
	ctx := context.Background()
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	mem := vfs.NewCrashableMem()
	opts := Options{FS: mem, Dir: "db", Workers: 2, VShards: 8}
	e, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	const n = 2000
	var items []ImportItem
	for i := range n {
		items = append(items, fridgeItem(t, fmt.Sprint("f", i)))
	}
	for i := 0; i < n; i += 500 {
		if errs, err := e.Import(ctx, items[i:i+500], ImportOptions{}); err != nil || len(errs) != 0 {
			t.Fatal(errs, err)
		}
	}
	clone := mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: rng.IntN(101), RNG: rand.New(rand.NewPCG(rng.Uint64(), 2))})
	e.Close()
	opts.FS = clone
	checkClean(t, clone)
	e, err = Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if got := e.Len(); got != n {
		t.Errorf("after power loss: %d twins; want %d", got, n)
	}
}

// TestImportUpsertConnected: an upsert over a twin whose device is
// connected ends the device's stream, leaves the twin disconnected with no
// presence mark, and replaces its commands; nulls in an imported document
// delete nothing and are dropped. The store passes Check.
func TestImportUpsertConnected(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{Workers: 2, VShards: 8})
	if _, err := e.Create(ctx, CreateRequest{ID: "car-1", Type: "car"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: "car-1", Name: "honk"}); err != nil {
		t.Fatal(err)
	}
	s := newRecSink()
	if _, err := e.Connect(ctx, "car-1", s); err != nil {
		t.Fatal(err)
	}
	it := ImportItem{Twin: &Twin{ID: "car-1", Type: "car", Reported: doc(t, `{"fuel":0.5,"gone":null,"loc":{"lat":null}}`)},
		Commands: []*Command{{Seq: 5, Name: "navigate", State: CommandQueued}}}
	if errs, err := e.Import(ctx, []ImportItem{it}, ImportOptions{Upsert: true}); err != nil || len(errs) != 0 {
		t.Fatal(errs, err)
	}
	deadline := time.After(10 * time.Second)
	for {
		s.mu.Lock()
		closed := s.closed
		s.mu.Unlock()
		if closed != nil {
			if !errors.Is(closed, ErrTokenRevoked) {
				t.Errorf("stream closed with %v; want ErrTokenRevoked", closed)
			}
			break
		}
		select {
		case <-s.ch:
		case <-deadline:
			t.Fatal("the connected device's stream was not closed")
		}
	}
	tw, err := e.Get("car-1")
	if err != nil {
		t.Fatal(err)
	}
	if tw.Presence.Connected || tw.Version != 2 {
		t.Errorf("upserted twin: connected %v, version %d; want disconnected at version 2", tw.Presence.Connected, tw.Version)
	}
	if diff := cmp.Diff(doc(t, `{"fuel":0.5,"loc":{}}`), tw.Reported); diff != "" {
		t.Errorf("reported with nulls (-want +got):\n%s", diff)
	}
	if _, ok := tw.ReportedMeta["/loc"]; !ok || len(tw.ReportedMeta) != 2 {
		t.Errorf("metadata = %v; want /fuel and /loc (an empty object is a leaf)", tw.ReportedMeta)
	}
	cmds, _, err := e.ListCommands("car-1", nil, 0, 10)
	if err != nil || len(cmds) != 1 || cmds[0].ID != "car-1~5" {
		t.Errorf("commands = %v, %v; want only the imported car-1~5", cmds, err)
	}
	e.Close()
	checkClean(t, fs)
}
