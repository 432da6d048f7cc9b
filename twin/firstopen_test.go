package twin

import (
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/google/go-cmp/cmp"
)

// hookSyncFS calls after once each WAL sync has returned.
type hookSyncFS struct {
	vfs.FS
	after func()
}

type hookSyncFile struct {
	vfs.File
	after func()
}

func (f hookSyncFile) Sync() error {
	err := f.File.Sync()
	f.after()
	return err
}

func (f hookSyncFile) SyncData() error {
	err := f.File.SyncData()
	f.after()
	return err
}

func (f hookSyncFile) SyncTo(n int64) (bool, error) {
	ok, err := f.File.SyncTo(n)
	f.after()
	return ok, err
}

func (f hookSyncFS) wrap(name string, file vfs.File, err error) (vfs.File, error) {
	if err != nil || filepath.Ext(name) != ".log" {
		return file, err
	}
	return hookSyncFile{file, f.after}, nil
}

func (f hookSyncFS) Create(name string, c vfs.DiskWriteCategory) (vfs.File, error) {
	file, err := f.FS.Create(name, c)
	return f.wrap(name, file, err)
}

func (f hookSyncFS) ReuseForWrite(oldname, newname string, c vfs.DiskWriteCategory) (vfs.File, error) {
	file, err := f.FS.ReuseForWrite(oldname, newname, c)
	return f.wrap(newname, file, err)
}

func (f hookSyncFS) OpenReadWrite(name string, c vfs.DiskWriteCategory, opts ...vfs.OpenOption) (vfs.File, error) {
	file, err := f.FS.OpenReadWrite(name, c, opts...)
	return f.wrap(name, file, err)
}

// TestFixtureFirstOpenCrashes: the first Open of the format-1
// fixture runs three one-time steps in sequence: the conversion of its
// values, the shards' counts and marks (upgradeShard) and the index
// (ensureIndex). A power loss after any WAL sync of that Open (keeping a
// random part of what was not synced) leaves a store that the next Open
// finishes: Check finds nothing wrong, and it holds what an Open that was
// not interrupted leaves.
func TestFixtureFirstOpenCrashes(t *testing.T) {
	smallConvertBatches(t, 3)
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
	opts := Options{Clock: func() time.Time { return exp.Clock }, Logger: quiet}
	mem := loadFixture(t)
	rng := rand.New(rand.NewPCG(11, 12))
	var (
		mu      sync.Mutex
		crashes []*vfs.MemFS
	)
	hooked := hookSyncFS{FS: mem, after: func() {
		mu.Lock()
		defer mu.Unlock()
		crashes = append(crashes, mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: rng.IntN(101), RNG: rand.New(rand.NewPCG(rng.Uint64(), 3))}))
	}}
	e := openMem(t, hooked, opts)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	want := storeContents(t, mem)
	mu.Lock()
	defer mu.Unlock()
	if len(crashes) < 10 {
		t.Fatalf("the first Open synced the WAL %d times; want more", len(crashes))
	}
	for i, fs := range crashes {
		openMem(t, fs, opts).Close()
		if vs, err := Check(Options{Dir: "db", FS: fs}); err != nil || len(vs) != 0 {
			t.Errorf("crash after sync %d of %d, reopened: Check = %v, %v", i, len(crashes), vs, err)
		}
		if d := cmp.Diff(want, storeContents(t, fs)); d != "" {
			t.Errorf("crash after sync %d of %d, reopened: the store differs from an uninterrupted first Open (-want +got):\n%s", i, len(crashes), d)
		}
	}
}
