package twin_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/twind-io/twind/twin"
)

// checkStore is a small store made by a real engine, and what the tests
// that corrupt it need to know about it.
type checkStore struct {
	fs vfs.FS
	vs func(id string) uint16
	// revisions of the changes that made it
	carV3Rev, reV2Rev int64
}

// newCheckStore makes a store with a live twin car-1 (type car, label
// site=berlin) at version 3 with one command, a deleted twin gone, a twin re at version 3, re-created after a
// delete at version 2, and a twin dev-1 whose device is connected. The
// engine is closed when it returns.
func newCheckStore(t *testing.T) checkStore {
	t.Helper()
	ctx := context.Background()
	s := checkStore{fs: vfs.NewMem()}
	e, err := twin.Open(twin.Options{Dir: "db", FS: s.fs, VShards: 16})
	if err != nil {
		t.Fatal(err)
	}
	s.vs = e.VShard
	steps := []func() error{
		func() error {
			_, err := e.Create(ctx, twin.CreateRequest{ID: "car-1", Type: "car", Labels: map[string]string{"site": "berlin"}})
			return err
		},
		func() error {
			_, err := e.Report(ctx, twin.PatchRequest{ID: "car-1", Patch: twin.Document{"speed_kmh": 50.0}})
			return err
		},
		func() error {
			tw, err := e.UpdateDesired(ctx, twin.PatchRequest{ID: "car-1", Patch: twin.Document{"locked": true}})
			if err == nil {
				s.carV3Rev = tw.Revision
			}
			return err
		},
		func() error {
			_, err := e.SendCommand(ctx, twin.CommandRequest{DeviceID: "car-1", Name: "honk"})
			return err
		},
		func() error { _, err := e.Create(ctx, twin.CreateRequest{ID: "gone"}); return err },
		func() error { return e.Delete(ctx, "gone", 0) },
		func() error { _, err := e.Create(ctx, twin.CreateRequest{ID: "re"}); return err },
		func() error {
			tw, err := e.Report(ctx, twin.PatchRequest{ID: "re", Patch: twin.Document{"on": true}})
			if err == nil {
				s.reV2Rev = tw.Revision
			}
			return err
		},
		func() error { return e.Delete(ctx, "re", 0) },
		func() error { _, err := e.Create(ctx, twin.CreateRequest{ID: "re"}); return err },
		func() error { _, err := e.Create(ctx, twin.CreateRequest{ID: "dev-1"}); return err },
		func() error { _, err := e.Connect(ctx, "dev-1", nopSink{}); return err },
		// An API key made through the operator API: the server's, not a
		// violation.
		func() error { return e.PutAPIKey("ops", []byte(`{"role":"viewer"}`)) },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("making the store, step %d: %v", i, err)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	return s
}

func shardKey(vs uint16, section byte, id string) []byte {
	k := binary.BigEndian.AppendUint16([]byte("s/"), vs)
	return append(append(k, '/', section, '/'), id...)
}

func seqKey(vs uint16, section byte, id string, n int64) []byte {
	return binary.BigEndian.AppendUint64(append(shardKey(vs, section, id), 0), uint64(n))
}

// openRaw opens a store with Pebble directly, to corrupt it.
func openRaw(fs vfs.FS, dir string) *pebble.DB {
	db, err := pebble.Open(dir, &pebble.Options{FS: fs, Logger: quietLogger{}})
	if err != nil {
		panic(err)
	}
	return db
}

type quietLogger struct{}

func (quietLogger) Infof(string, ...any)           {}
func (quietLogger) Errorf(string, ...any)          {}
func (quietLogger) Fatalf(format string, a ...any) { panic(fmt.Sprintf(format, a...)) }

func revValue(rev int64) []byte { return binary.BigEndian.AppendUint64(nil, uint64(rev)) }

func TestCheckCleanStore(t *testing.T) {
	s := newCheckStore(t)
	got, err := twin.Check(twin.Options{Dir: "db", FS: s.fs})
	if err != nil || len(got) != 0 {
		t.Errorf("Check(a store made by the engine) = %v, %v; want no violations", got, err)
	}
}

func TestCheckNamesViolations(t *testing.T) {
	command := func(id string, seq int64) []byte {
		b, _ := json.Marshal(map[string]any{"id": twin.CommandID(id, seq), "device_id": id, "seq": seq, "name": "honk", "state": 1})
		return twin.StoreValue(seqKey(0, 'c', id, seq), b)
	}
	type edit struct {
		key, value []byte // value nil: delete the key
	}
	tests := []struct {
		name         string
		historyLimit int
		edits        func(s checkStore, db *pebble.DB) []edit
		// want is a violation that must be found: its key as String
		// prints it, and part of its problem.
		wantKey, wantProblem string
	}{{
		name: "orphan command",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("ghost"), 'c', "ghost", 1), command("ghost", 1)}}
		},
		wantKey:     "c/ghost/1",
		wantProblem: `command of twin "ghost", which does not exist`,
	}, {
		name: "command of a deleted twin",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("gone"), 'c', "gone", 1), command("gone", 1)}}
		},
		wantKey:     "c/gone/1",
		wantProblem: `command of twin "gone", which was deleted at version 1`,
	}, {
		name: "command sequence above the twin's",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("car-1"), 'c', "car-1", 7), command("car-1", 7)}}
		},
		wantKey:     "c/car-1/7",
		wantProblem: `command sequence 7 is above twin "car-1"'s last command sequence 1`,
	}, {
		name: "command under another key",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("car-1"), 'c', "car-1", 1), command("re", 1)}}
		},
		wantKey:     "c/car-1/1",
		wantProblem: `its key says "car-1~1"`,
	}, {
		name: "history of a deleted twin",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("gone"), 'h', "gone", 1), revValue(5)}}
		},
		wantKey:     "h/gone/1",
		wantProblem: `history entry of twin "gone", which was deleted`,
	}, {
		name: "history ahead of the twin",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("car-1"), 'h', "car-1", 4), revValue(3)}}
		},
		wantKey:     "h/car-1/4",
		wantProblem: `ahead of twin "car-1"'s version 3`,
	}, {
		name:         "history beyond the history limit",
		historyLimit: 2,
		edits:        func(checkStore, *pebble.DB) []edit { return nil },
		wantKey:      "h/car-1/1",
		wantProblem:  "older than the history limit of 2 versions",
	}, {
		name: "history pointing at another twin's event",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("car-1"), 'h', "car-1", 3), revValue(s.reV2Rev)}}
		},
		wantKey:     "h/car-1/3",
		wantProblem: `is version 2 of twin "re" in the watch log, not version 3 of "car-1"`,
	}, {
		name: "history pointing past the log",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("car-1"), 'h', "car-1", 3), revValue(999)}}
		},
		wantKey:     "h/car-1/3",
		wantProblem: "ahead of the watch log's last revision",
	}, {
		name: "history left over from before a re-creation",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("re"), 'h', "re", 2), revValue(s.reV2Rev)}}
		},
		wantKey:     "h/re/2",
		wantProblem: `from before twin "re" was created at version 3`,
	}, {
		name:        "history without the current version",
		edits:       func(s checkStore, db *pebble.DB) []edit { return []edit{{seqKey(s.vs("car-1"), 'h', "car-1", 3), nil}} },
		wantKey:     "t/car-1",
		wantProblem: "no history entry for its version 3",
	}, {
		name: "history with a gap",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("car-1"), 'h', "car-1", 2), nil}}
		},
		wantKey:     "h/car-1/3",
		wantProblem: "jumps from version 1 to 3",
	}, {
		name: "twin ahead of the log",
		edits: func(s checkStore, db *pebble.DB) []edit {
			k := shardKey(s.vs("car-1"), 't', "car-1")
			return []edit{{k, rewriteTwin(db, k, "revision", 999)}}
		},
		wantKey:     "t/car-1",
		wantProblem: "the twin's revision 999 is ahead of the watch log's last revision",
	}, {
		name: "twin whose revision is another's",
		edits: func(s checkStore, db *pebble.DB) []edit {
			k := shardKey(s.vs("car-1"), 't', "car-1")
			return []edit{{k, rewriteTwin(db, k, "revision", s.reV2Rev)}}
		},
		wantKey:     "t/car-1",
		wantProblem: `is version 2 of twin "re"`,
	}, {
		name: "orphan rule state",
		edits: func(s checkStore, db *pebble.DB) []edit {
			k := shardKey(s.vs("ghost"), 'x', "ghost\x00r1")
			return []edit{{k, twin.StoreValue(k, []byte(`{"g":1}`))}}
		},
		wantKey:     "x/ghost/r1",
		wantProblem: `rule state of twin "ghost", which does not exist`,
	}, {
		name: "twin in the wrong shard",
		edits: func(s checkStore, db *pebble.DB) []edit {
			k := shardKey((s.vs("car-1")+1)%16, 't', "car-1")
			return []edit{{k, twin.StoreValue(k, []byte(`{"deleted":true,"last_version":1}`))}}
		},
		wantKey:     "t/car-1",
		wantProblem: `twin "car-1" belongs to virtual shard`,
	}, {
		name: "orphan presence mark",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{shardKey(s.vs("ghost"), 'p', "ghost"), []byte{}}}
		},
		wantKey:     "p/ghost",
		wantProblem: `presence mark of twin "ghost", which does not exist`,
	}, {
		name: "presence mark of a disconnected twin",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{shardKey(s.vs("car-1"), 'p', "car-1"), []byte{}}}
		},
		wantKey:     "p/car-1",
		wantProblem: `twin "car-1" has a presence mark but is not connected`,
	}, {
		name:        "open command without an open-command mark",
		edits:       func(s checkStore, db *pebble.DB) []edit { return []edit{{seqKey(s.vs("car-1"), 'o', "car-1", 1), nil}} },
		wantKey:     "t/car-1",
		wantProblem: `command car-1~1 is not finished but has no open-command mark`,
	}, {
		name: "open-command mark of a command that does not exist",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{seqKey(s.vs("car-1"), 'o', "car-1", 7), make([]byte, 8)}}
		},
		wantKey:     "o/car-1/7",
		wantProblem: `open-command mark of command car-1~7, which is finished or does not exist`,
	}, {
		name:        "connected twin without a presence mark",
		edits:       func(s checkStore, db *pebble.DB) []edit { return []edit{{shardKey(s.vs("dev-1"), 'p', "dev-1"), nil}} },
		wantKey:     "t/dev-1",
		wantProblem: `twin "dev-1" is connected but has no presence mark`,
	}, {
		name: "corrupt log entry",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{[]byte("l/\x00\x00\x00\x00\x00\x00\x00\x02"), []byte("garbage")}}
		},
		wantKey:     "l/2",
		wantProblem: "the event does not decode",
	}, {
		name: "change whose previous entry is gone",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{[]byte("l/\x00\x00\x00\x00\x00\x00\x00\x02"), nil}}
		},
		wantKey:     "l/3",
		wantProblem: "the change applies to revision 2, which the watch log lacks",
	}, {
		name: "change below the log's first entry",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{[]byte("l/\x00\x00\x00\x00\x00\x00\x00\x01"), nil}, {[]byte("l/\x00\x00\x00\x00\x00\x00\x00\x02"), nil}}
		},
		wantKey:     "l/3",
		wantProblem: "the change applies to revision 2, below the watch log's first entry 3",
	}, {
		name: "missing type index entry",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{shardKey(s.vs("car-1"), 'y', "car\x00car-1"), nil}}
		},
		wantKey:     "t/car-1",
		wantProblem: `twin "car-1" has no type index entry (for type "car")`,
	}, {
		name: "stale type index entry",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{shardKey(s.vs("car-1"), 'y', "fridge\x00car-1"), []byte{}}}
		},
		wantKey:     `y/"fridge"/car-1`,
		wantProblem: `type index entry says type "fridge"; twin "car-1" has type "car"`,
	}, {
		name: "type index entry of a deleted twin",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{shardKey(s.vs("gone"), 'y', "\x00gone"), []byte{}}}
		},
		wantKey:     `y/""/gone`,
		wantProblem: `type index entry of twin "gone", which was deleted at version 1`,
	}, {
		name: "missing label index entry",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{shardKey(s.vs("car-1"), 'b', "site\x00berlin\x00car-1"), nil}}
		},
		wantKey:     "t/car-1",
		wantProblem: `twin "car-1" has no label index entry for site="berlin"`,
	}, {
		name: "stale label index entry",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{shardKey(s.vs("car-1"), 'b', "site\x00paris\x00car-1"), []byte{}}}
		},
		wantKey:     `b/"site"="paris"/car-1`,
		wantProblem: `label index entry says site="paris"; twin "car-1" has site="berlin"`,
	}, {
		name: "label index entry of a label the twin lacks",
		edits: func(s checkStore, db *pebble.DB) []edit {
			return []edit{{shardKey(s.vs("re"), 'b', "site\x00berlin\x00re"), []byte{}}}
		},
		wantKey:     `b/"site"="berlin"/re`,
		wantProblem: `label index entry says site="berlin"; twin "re" has no label site`,
	}, {
		name:        "unknown key",
		edits:       func(checkStore, *pebble.DB) []edit { return []edit{{[]byte("zz"), []byte("1")}} },
		wantKey:     `"zz"`,
		wantProblem: "unknown key",
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newCheckStore(t)
			db := openRaw(s.fs, "db")
			var err error
			for _, ed := range tt.edits(s, db) {
				if ed.value == nil {
					err = db.Delete(ed.key, pebble.Sync)
				} else {
					err = db.Set(ed.key, ed.value, pebble.Sync)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			got, err := twin.Check(twin.Options{Dir: "db", FS: s.fs, HistoryLimit: tt.historyLimit})
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			found := false
			for _, v := range got {
				str := v.String()
				if strings.Contains(str, tt.wantKey+": ") && strings.Contains(str, tt.wantProblem) {
					found = true
				}
			}
			if !found || len(got) > 2 {
				t.Errorf("Check = %q; want (with at most one more) a violation of key ...%s: ...%s", got, tt.wantKey, tt.wantProblem)
			}
		})
	}
}

// nopSink is a device stream that ignores what it is told.
type nopSink struct{}

func (nopSink) Welcome(*twin.Twin, []*twin.Command)      {}
func (nopSink) DesiredChanged(*twin.Twin, twin.Document) {}
func (nopSink) Commands([]*twin.Command)                 {}
func (nopSink) Close(error)                              {}

// rewriteTwin returns the stored twin at key k with one field set.
func rewriteTwin(db *pebble.DB, k []byte, field string, value any) []byte {
	v, closer, err := db.Get(k)
	if err != nil {
		panic(err)
	}
	defer closer.Close()
	var m map[string]any
	if err := json.Unmarshal(twin.StoredRecordJSON(v), &m); err != nil {
		panic(err)
	}
	m[field] = value
	b, _ := json.Marshal(m)
	return twin.StoreValue(k, b)
}

func TestCheckNeedsTheStoreToItself(t *testing.T) {
	fs := vfs.NewMem()
	e, err := twin.Open(twin.Options{Dir: "db", FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if _, err := twin.Check(twin.Options{Dir: "db", FS: fs}); err == nil || !strings.Contains(err.Error(), "stop it first") {
		t.Errorf("Check(a store in use) = %v; want an error saying to stop twind", err)
	}
	if _, err := twin.Check(twin.Options{Dir: "nothing-here", FS: fs}); err == nil || !strings.Contains(err.Error(), "no store in nothing-here") {
		t.Errorf("Check(a directory with no store) = nil; want an error")
	}
}

// ExampleCheck checks a store offline, as `twind check --data DIR` does,
// after a command was written for a twin that does not exist.
func ExampleCheck() {
	ctx := context.Background()
	fs := vfs.NewMem()
	e, err := twin.Open(twin.Options{Dir: "store", FS: fs, VShards: 16})
	if err != nil {
		panic(err)
	}
	e.Create(ctx, twin.CreateRequest{ID: "fridge-1", Type: "fridge"})
	e.SendCommand(ctx, twin.CommandRequest{DeviceID: "fridge-1", Name: "defrost"})
	e.Close()

	vs, _ := twin.Check(twin.Options{Dir: "store", FS: fs})
	fmt.Println(len(vs), "violations")

	// Corrupt the store: a command of fridge-2, which was never created.
	db := openRaw(fs, "store")
	k := seqKey(11, 'c', "fridge-2", 1)
	db.Set(k, twin.StoreValue(k, []byte(`{"id":"fridge-2~1","device_id":"fridge-2","seq":1,"state":1}`)), pebble.Sync)
	db.Close()

	vs, _ = twin.Check(twin.Options{Dir: "store", FS: fs})
	for _, v := range vs {
		fmt.Println(v)
	}
	// Output:
	// 0 violations
	// s/11/c/fridge-2/1: command of twin "fridge-2", which does not exist
}

// TestCheckAfterLoweringHistoryLimit lowers the history limit of a store
// and writes to its twin: the twin's history is then within the new limit,
// with nothing left behind under it.
func TestCheckAfterLoweringHistoryLimit(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	for _, limit := range []int{10, 3} {
		e, err := twin.Open(twin.Options{Dir: "db", FS: fs, HistoryLimit: limit})
		if err != nil {
			t.Fatal(err)
		}
		if limit == 10 {
			if _, err := e.Create(ctx, twin.CreateRequest{ID: "planter-1"}); err != nil {
				t.Fatal(err)
			}
		}
		for i := range 9 {
			if _, err := e.Report(ctx, twin.PatchRequest{ID: "planter-1", Patch: twin.Document{"soil_moisture": float64(limit*10 + i)}}); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
	got, err := twin.Check(twin.Options{Dir: "db", FS: fs, HistoryLimit: 3})
	if err != nil || len(got) != 0 {
		t.Errorf("Check(history limit lowered from 10 to 3, then 9 writes) = %q, %v; want no violations", got, err)
	}
}

// TestCheckUsesTheStoresHistoryLimit checks history against the largest
// history limit the store was opened with, unless told another.
func TestCheckUsesTheStoresHistoryLimit(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e, err := twin.Open(twin.Options{Dir: "db", FS: fs, HistoryLimit: 3, VShards: 16})
	if err != nil {
		t.Fatal(err)
	}
	created, err := e.Create(ctx, twin.CreateRequest{ID: "car-1"})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		if _, err := e.Report(ctx, twin.PatchRequest{ID: "car-1", Patch: twin.Document{"speed_kmh": float64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	vs := e.VShard("car-1")
	e.Close()
	// Version 1's entry, pruned at version 4, comes back.
	db := openRaw(fs, "db")
	db.Set(seqKey(vs, 'h', "car-1", 1), revValue(created.Revision), pebble.Sync)
	db.Close()
	for _, tt := range []struct {
		limit int
		want  string
	}{
		{0, "older than the history limit of 3 versions"},
		{3, "older than the history limit of 3 versions"},
		{5, "jumps from version 1 to 3"}, // 2 was pruned, with a limit of 3
	} {
		got, err := twin.Check(twin.Options{Dir: "db", FS: fs, HistoryLimit: tt.limit})
		if err != nil || len(got) != 1 || !strings.Contains(got[0].Problem, tt.want) {
			t.Errorf("Check(HistoryLimit %d) = %q, %v; want one violation: ...%s", tt.limit, got, err, tt.want)
		}
	}
}
