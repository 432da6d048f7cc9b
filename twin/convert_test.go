package twin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/google/go-cmp/cmp"
)

// fillStore writes, through the engine, twins of every kind of history: with
// documents and metadata, labels, tokens, desired removals (tombstones),
// commands open and finished, presence, deletions and re-creations; then
// rule states, directly.
func fillStore(t *testing.T, fs vfs.FS, twins int) {
	t.Helper()
	ctx := context.Background()
	e := openMem(t, fs, Options{VShards: 16})
	for i := range twins {
		id := fmt.Sprintf("fridge-%d", i)
		must := func(_ any, err error) {
			t.Helper()
			if err != nil {
				t.Fatalf("%s: %v", id, err)
			}
		}
		must(e.Create(ctx, CreateRequest{ID: id, Type: "fridge", Labels: map[string]string{"site": "berlin"},
			Reported: Document{"temp_c": 2.3, "door": "closed", "site": map[string]any{"city": "berlin", "floor": 3.0}},
			Desired:  Document{"target_c": 4.0, "eco": true}}))
		must(e.Report(ctx, PatchRequest{ID: id, Patch: Document{"temp_c": float64(i) / 10, "tags": []any{"a", 1.0, nil}}}))
		must(e.UpdateDesired(ctx, PatchRequest{ID: id, Patch: Document{"eco": nil}}))
		switch i % 5 {
		case 0:
			must(e.SendCommand(ctx, CommandRequest{DeviceID: id, Name: "defrost", Params: Document{"minutes": 5.0}, RequestID: "r-" + id}))
		case 1:
			must(e.SendCommand(ctx, CommandRequest{DeviceID: id, Name: "defrost"}))
			must(nil, e.SetTokenHash(ctx, id, []byte("0123456789abcdef0123456789abcdef")))
		case 2:
			must(nil, e.Delete(ctx, id, 0))
		case 3:
			must(nil, e.Delete(ctx, id, 0))
			must(e.Create(ctx, CreateRequest{ID: id, Type: "fridge"}))
		case 4:
			must(e.Update(ctx, UpdateRequest{ID: id, Labels: map[string]string{"site": "paris"}}))
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := pebble.Open("db", &pebble.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	at := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	for i := 0; i < twins; i += 5 {
		id := fmt.Sprintf("fridge-%d", i)
		s := &RuleState{Gen: 1, Active: true, PendingSince: at, Fired: i%2 == 0, LastFired: at}
		b := db.NewBatch()
		vs := uint16(vshardOf(id, 16))
		if err := writeRuleStates(b, vs, id, map[string]*RuleState{"warm": s}); err != nil {
			t.Fatal(err)
		}
		// Waiting for a hold_for: marked, as the engine marks it.
		if err := b.Set(pendingKey(vs, id), nil, nil); err != nil {
			t.Fatal(err)
		}
		if err := b.Commit(pebble.Sync); err != nil {
			t.Fatal(err)
		}
	}
}

// storeContents decodes every value of the store in dir, by key.
func storeContents(t *testing.T, fs vfs.FS) map[string]any {
	t.Helper()
	db, err := pebble.Open("db", &pebble.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	it, err := db.NewIter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	out := map[string]any{}
	lr := newLogReader(db)
	for it.First(); it.Valid(); it.Next() {
		k, v := it.Key(), it.Value()
		var got any
		var err error
		switch {
		case bytes.Equal(k, keyFormat):
			var f storeFormat
			err = json.Unmarshal(v, &f)
			// The format is compared apart; Open records the history
			// limit if the store did not.
			f.Format, f.MaxHistoryLimit = 0, 0
			got = f
		case bytes.HasPrefix(k, prefixLog):
			got, _, err = lr.event(v)
		case bytes.HasPrefix(k, prefixShards) && k[5] == 't' && !isSubKey(k[7:]):
			var r record
			r, err = decodeRecord(v)
			// A converted log holds whole twins only: each twin's next
			// entry starts a chain (logchain.go).
			r.Log = logPosition{}
			got = r
		case bytes.HasPrefix(k, prefixShards) && k[5] == 'c':
			got, err = decodeCommand(v)
		case bytes.HasPrefix(k, prefixShards) && k[5] == 'x':
			got, err = decodeRuleState(v)
		default:
			got = string(v)
		}
		if err != nil {
			t.Fatalf("%s: %v", keyString(k), err)
		}
		out[keyString(k)] = got
	}
	return out
}

// downgradeStore rewrites the store in dir as twind wrote it before issue
// 9: every value JSON, format 1.
func downgradeStore(t *testing.T, fs vfs.FS) {
	t.Helper()
	db, err := pebble.Open("db", &pebble.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	it, err := db.NewIter(nil)
	if err != nil {
		t.Fatal(err)
	}
	b := db.NewBatch()
	lr := newLogReader(db)
	for it.First(); it.Valid(); it.Next() {
		k, v := it.Key(), it.Value()
		var nv []byte
		switch {
		case bytes.Equal(k, keyFormat):
			var f storeFormat
			if err := json.Unmarshal(v, &f); err != nil {
				t.Fatal(err)
			}
			f.Format = 1
			nv, _ = json.Marshal(f)
		case bytes.HasPrefix(k, prefixLog):
			ev, _, err := lr.event(v)
			if err != nil {
				t.Fatal(err)
			}
			nv = appendEventJSON(nil, ev, appendTwinJSON(nil, ev.Twin))
		case bytes.HasPrefix(k, prefixShards) && k[5] == 't' && !isSubKey(k[7:]):
			r, err := decodeRecord(v)
			if err != nil {
				t.Fatal(err)
			}
			nv = encodeRecordJSON(r)
		case bytes.HasPrefix(k, prefixShards) && k[5] == 'c':
			c, err := decodeCommand(v)
			if err != nil {
				t.Fatal(err)
			}
			nv, _ = encodeCommandJSON(c)
		case bytes.HasPrefix(k, prefixShards) && k[5] == 'x':
			s, err := decodeRuleState(v)
			if err != nil {
				t.Fatal(err)
			}
			nv, _ = encodeRuleStateJSON(&s)
		default:
			continue
		}
		b.Set(k, nv, nil)
	}
	if err := it.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(pebble.Sync); err != nil {
		t.Fatal(err)
	}
}

// storeFormatOf returns the format a store records and how many of its
// values are in each encoding.
func storeFormatOf(t *testing.T, fs vfs.FS) (format, jsonValues, binaryValues int) {
	t.Helper()
	db, err := pebble.Open("db", &pebble.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	it, _ := db.NewIter(nil)
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		switch {
		case bytes.Equal(k, keyFormat):
			var f storeFormat
			json.Unmarshal(it.Value(), &f)
			format = f.Format
		case bytes.HasPrefix(k, prefixShards) && k[5] == 't' && isSubKey(k[7:]):
			// A seen key: 8 bytes in either format.
		case bytes.HasPrefix(k, prefixLog) || bytes.HasPrefix(k, prefixShards) && bytes.IndexByte([]byte("tcx"), k[5]) >= 0:
			if isBinary(it.Value()) {
				binaryValues++
			} else {
				jsonValues++
			}
		}
	}
	return format, jsonValues, binaryValues
}

func smallConvertBatches(t *testing.T, keys int) {
	k, b := convertBatchKeys, convertBatchBytes
	convertBatchKeys, convertBatchBytes = keys, 4<<10
	t.Cleanup(func() { convertBatchKeys, convertBatchBytes = k, b })
}

// A store of format 1 opens: Open converts every value, in batches, then
// records format 2; what the store holds is unchanged, and the next Open
// converts nothing.
func TestConvertStore(t *testing.T) {
	smallConvertBatches(t, 7)
	fs := vfs.NewMem()
	fillStore(t, fs, 60)
	want := storeContents(t, fs)
	downgradeStore(t, fs)
	if f, j, b := storeFormatOf(t, fs); f != 1 || b != 0 || j < 300 {
		t.Fatalf("downgraded store: format %d, %d JSON and %d binary values; want format 1, all JSON", f, j, b)
	}
	if d := cmp.Diff(want, storeContents(t, fs)); d != "" {
		t.Fatalf("the store read as JSON differs (-binary +JSON):\n%s", d)
	}
	batches := 0
	convertBatchDone = func() { batches++ }
	defer func() { convertBatchDone = nil }()
	e := openMem(t, fs, Options{})
	if tw, err := e.Get("fridge-4"); err != nil || tw.Labels["site"] != "paris" || tw.Reported["temp_c"] != 0.4 {
		t.Errorf("after conversion: Get(fridge-4) = %v, %v", tw, err)
	}
	if _, err := e.Get("fridge-2"); !errors.Is(err, ErrNotFound) {
		t.Errorf("after conversion: Get(fridge-2), deleted = %v; want ErrNotFound", err)
	}
	e.Close()
	if batches < 40 {
		t.Errorf("converted in %d batches; want many small ones", batches)
	}
	if f, j, b := storeFormatOf(t, fs); f != formatVersion || j != 0 || b < 300 {
		t.Fatalf("converted store: format %d, %d JSON and %d binary values; want format %d, all binary", f, j, b, formatVersion)
	}
	if d := cmp.Diff(want, storeContents(t, fs)); d != "" {
		t.Fatalf("the converted store differs (-before +after):\n%s", d)
	}
	if vs, err := Check(Options{Dir: "db", FS: fs}); err != nil || len(vs) != 0 {
		t.Errorf("Check(the converted store) = %v, %v", vs, err)
	}
	batches = 0
	openMem(t, fs, Options{}).Close()
	if batches != 0 {
		t.Errorf("the second Open converted again (%d batches)", batches)
	}
}

// A process that dies while converting leaves a store that the next Open
// converts: the crash is taken after a random batch, keeping a random part
// of what was not synced.
func TestConvertStoreCrash(t *testing.T) {
	smallConvertBatches(t, 5)
	mem := vfs.NewCrashableMem()
	fillStore(t, mem, 40)
	want := storeContents(t, mem)
	downgradeStore(t, mem)
	rng := rand.New(rand.NewPCG(7, 8))
	var crashes []*vfs.MemFS
	batch := 0
	convertBatchDone = func() {
		batch++
		if rng.IntN(8) == 0 {
			crashes = append(crashes, mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: rng.IntN(101), RNG: rand.New(rand.NewPCG(rng.Uint64(), 2))}))
		}
	}
	e := openMem(t, mem, Options{})
	convertBatchDone = nil
	e.Close()
	if len(crashes) < 3 {
		t.Fatalf("%d crashes in %d batches; want a few", len(crashes), batch)
	}
	partial := 0
	for i, fs := range crashes {
		f, j, b := storeFormatOf(t, fs)
		if f != 1 {
			t.Fatalf("crash %d: format %d before the conversion finished", i, f)
		}
		if j > 0 && b > 0 {
			partial++
		}
		// Check reads a store half converted.
		if vs, err := Check(Options{Dir: "db", FS: fs}); err != nil || len(vs) != 0 {
			t.Errorf("crash %d: Check(a store half converted) = %v, %v", i, vs, err)
		}
		openMem(t, fs, Options{}).Close()
		if f, j, _ := storeFormatOf(t, fs); f != formatVersion || j != 0 {
			t.Errorf("crash %d, reopened: format %d with %d JSON values", i, f, j)
		}
		if d := cmp.Diff(want, storeContents(t, fs)); d != "" {
			t.Errorf("crash %d, reopened: the store differs (-before +after):\n%s", i, d)
		}
		if vs, err := Check(Options{Dir: "db", FS: fs}); err != nil || len(vs) != 0 {
			t.Errorf("crash %d, reopened: Check = %v, %v", i, vs, err)
		}
	}
	if partial == 0 {
		t.Errorf("no crash left a store half converted")
	}
}

// A store of a format this build does not know is refused, unchanged.
func TestConvertStoreNewerFormat(t *testing.T) {
	fs := vfs.NewMem()
	openMem(t, fs, Options{}).Close()
	db, err := pebble.Open("db", &pebble.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	newer := formatVersion + 1
	db.Set(keyFormat, fmt.Appendf(nil, `{"vshards":256,"format":%d}`, newer), pebble.Sync)
	db.Close()
	if _, err := Open(Options{Dir: "db", FS: fs}); err == nil || !bytes.Contains(fmt.Append(nil, err), fmt.Appendf(nil, "store format %d is not supported", newer)) {
		t.Errorf("Open(a store of format %d) = %v; want an error saying the format is not supported", newer, err)
	}
}

// A store of format 2 (binary values, whole twins in the watch log) is
// format 3 as it is: Open records format 3, so that a build of format 2
// refuses it from then on, and serves what it holds.
func TestConvertStoreFormat2(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{})
	for i := range 3 {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("f", i), Reported: Document{"t": float64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	e.Close()
	db, err := pebble.Open("db", &pebble.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	db.Set(keyFormat, []byte(`{"vshards":256,"format":2,"max_history_limit":100}`), pebble.Sync)
	db.Close()
	openMem(t, fs, Options{}).Close()
	if f, _, _ := storeFormatOf(t, fs); f != formatVersion {
		t.Errorf("format %d after opening a store of format 2; want %d", f, formatVersion)
	}
	e = openMem(t, fs, Options{})
	defer e.Close()
	if tw, err := e.Get("f2"); err != nil || tw.Reported["t"] != 2.0 {
		t.Errorf("Get(f2) = %v, %v after the conversion", tw, err)
	}
	evs, err := e.History("f1", 0, 10)
	if err != nil || len(evs) != 1 || evs[0].Twin.Reported["t"] != 1.0 {
		t.Errorf("History(f1) = %v, %v after the conversion", evs, err)
	}
}

// BenchmarkConvertStore converts a store of format 1 holding 20,000
// fridge twins, each with its record, one watch-log entry, one history
// entry and one command, from a directory on disk.
func BenchmarkConvertStore(b *testing.B) {
	const twins = 20000
	dir := b.TempDir()
	db, err := pebble.Open(dir, &pebble.Options{})
	if err != nil {
		b.Fatal(err)
	}
	batch := db.NewBatch()
	for i := range twins {
		tw := fridgeTwin()
		tw.ID = fmt.Sprintf("fridge-%d", i)
		tw.Revision = int64(i + 1)
		vs := uint16(vshardOf(tw.ID, 256))
		rec := appendTwinJSON(nil, tw)
		batch.Set(twinKey(vs, tw.ID), rec, nil)
		ev := &Event{Revision: tw.Revision, Kind: KindReported, Twin: tw, Patch: Document{"temp_c": 2.3}, Time: tw.UpdateTime, Source: SourceDevice}
		batch.Set(logKey(tw.Revision), appendEventJSON(nil, ev, rec), nil)
		batch.Set(historyKey(vs, tw.ID, tw.Version), appendUint64(nil, uint64(tw.Revision)), nil)
		c, _ := encodeCommandJSON(&Command{ID: CommandID(tw.ID, 1), DeviceID: tw.ID, Seq: 1, Name: "defrost", State: CommandQueued,
			TTL: time.Hour, CreateTime: tw.CreateTime, UpdateTime: tw.CreateTime, ExpireTime: tw.CreateTime.Add(time.Hour)})
		batch.Set(commandKey(vs, tw.ID, 1), c, nil)
	}
	if err := batch.Commit(pebble.Sync); err != nil {
		b.Fatal(err)
	}
	db.Close()
	// Each round converts a copy.
	src := vfs.Default
	for b.Loop() {
		b.StopTimer()
		cp := b.TempDir()
		entries, _ := src.List(dir)
		for _, name := range entries {
			if _, err := vfs.Clone(src, src, src.PathJoin(dir, name), src.PathJoin(cp, name)); err != nil {
				b.Fatal(err)
			}
		}
		db, err := pebble.Open(cp, &pebble.Options{Logger: quietPebble{}})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := convertStore(db, storeFormat{VShards: 256, Format: 1}, slog.New(slog.DiscardHandler)); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		db.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(twins)*float64(b.N)/b.Elapsed().Seconds(), "twins/s")
}

type quietPebble struct{}

func (quietPebble) Infof(string, ...any)           {}
func (quietPebble) Errorf(string, ...any)          {}
func (quietPebble) Fatalf(format string, a ...any) { panic(fmt.Sprintf(format, a...)) }

// loadFixture copies the store of format 1 committed in
// server/testdata/store-fe533d2 (written by twind fe533d2) into a new
// crashable in-memory filesystem, under "db", durably.
func loadFixture(t *testing.T) *vfs.MemFS {
	t.Helper()
	const src = "../server/testdata/store-fe533d2/data"
	mem := vfs.NewCrashableMem()
	if err := mem.MkdirAll("db", 0o755); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		f, err := mem.Create(mem.PathJoin("db", e.Name()), vfs.WriteCategoryUnspecified)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(b); err != nil {
			t.Fatal(err)
		}
		if err := errors.Join(f.Sync(), f.Close()); err != nil {
			t.Fatal(err)
		}
	}
	d, err := mem.OpenDir("db")
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(d.Sync(), d.Close()); err != nil {
		t.Fatal(err)
	}
	return mem
}

// The fixture of format 1 converts, and a conversion of it interrupted by
// a crash after any batch finishes at the next Open, with the same
// contents.
func TestConvertFixtureCrash(t *testing.T) {
	smallConvertBatches(t, 3)
	want := storeContents(t, loadFixture(t))
	if f, j, b := storeFormatOf(t, loadFixture(t)); f != 1 || j < 30 || b != 0 {
		t.Fatalf("the fixture: format %d, %d JSON and %d binary values; want format 1, all JSON", f, j, b)
	}
	// The engine runs at the fixture's time, so that its commands have
	// not expired.
	b, err := os.ReadFile("../server/testdata/store-fe533d2/expected.json")
	if err != nil {
		t.Fatal(err)
	}
	var exp struct {
		Clock time.Time `json:"clock"`
	}
	if err := json.Unmarshal(b, &exp); err != nil {
		t.Fatal(err)
	}
	opts := Options{Clock: func() time.Time { return exp.Clock }}
	mem := loadFixture(t)
	rng := rand.New(rand.NewPCG(9, 10))
	var crashes []*vfs.MemFS
	convertBatchDone = func() {
		crashes = append(crashes, mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: rng.IntN(101), RNG: rand.New(rand.NewPCG(rng.Uint64(), 2))}))
	}
	e := openMem(t, mem, opts)
	convertBatchDone = nil
	e.Close()
	crashes = append(crashes, mem)
	if len(crashes) < 10 {
		t.Fatalf("the fixture converted in %d batches; want more", len(crashes))
	}
	for i, fs := range crashes {
		openMem(t, fs, opts).Close()
		if f, j, _ := storeFormatOf(t, fs); f != formatVersion || j != 0 {
			t.Errorf("crash %d, reopened: format %d with %d JSON values", i, f, j)
		}
		got := storeContents(t, fs)
		for k := range got {
			// Twin counts, pending marks and the index, which Open
			// adds to a store that lacks them (upgradeShard,
			// ensureIndex).
			if _, ok := want[k]; !ok && (strings.Contains(k, "/n/") || strings.Contains(k, "/w/") ||
				strings.Contains(k, "/y/") || strings.Contains(k, "/b/") || strings.Contains(k, "/o/") || k == `"m/index"` || k == "m/index") {
				delete(got, k)
			}
		}
		if d := cmp.Diff(want, got); d != "" {
			t.Errorf("crash %d, reopened: the store differs from the fixture (-fixture +converted):\n%s", i, d)
		}
		if vs, err := Check(Options{Dir: "db", FS: fs}); err != nil || len(vs) != 0 {
			t.Errorf("crash %d, reopened: Check = %v, %v", i, vs, err)
		}
	}
}
