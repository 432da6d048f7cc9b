package twin

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// logKeys counts the watch log's entries in the store in fs.
func logKeys(t *testing.T, fs vfs.FS) int {
	t.Helper()
	db, err := pebble.Open("db", &pebble.Options{FS: fs, Logger: quietLogger{}})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: prefixLog, UpperBound: prefixEnd(prefixLog)})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	n := 0
	for it.First(); it.Valid(); it.Next() {
		if bytes.HasPrefix(it.Key(), prefixLog) {
			n++
		}
	}
	return n
}

// A follower keeps its watch log within the retention as the owner does:
// a standby that follows for a long time must not grow its store without
// bound, and the node that takes over from it serves watchers the same
// retention.
func TestFollowerPrunesItsWatchLog(t *testing.T) {
	defer func(v int64) { logChainSpan = v }(logChainSpan)
	logChainSpan = 100
	const retention = 200
	log := &memLog{}
	ownerFS, followerFS := vfs.NewMem(), vfs.NewMem()
	owner := openMem(t, ownerFS, Options{Log: log, LogRetention: retention})
	ctx := context.Background()
	if _, err := owner.Create(ctx, CreateRequest{ID: "meter", Type: "meter"}); err != nil {
		t.Fatal(err)
	}
	for i := range 3000 {
		if _, err := owner.Report(ctx, PatchRequest{ID: "meter", Patch: Document{"kwh": float64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := owner.Close(); err != nil {
		t.Fatal(err)
	}
	f := openMem(t, followerFS, Options{Follow: true, LogRetention: retention})
	for i, entry := range log.all() {
		if err := f.ApplyEntry(uint64(i+1), entry); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	// Pruning goes in steps of 1024 revisions.
	bound := retention + int(logChainSpan) + 1024
	ownerN, followerN := logKeys(t, ownerFS), logKeys(t, followerFS)
	if ownerN > bound {
		t.Fatalf("the owner's watch log holds %d entries; want at most %d", ownerN, bound)
	}
	if followerN > bound {
		t.Errorf("the follower's watch log holds %d entries, the owner's %d; want at most %d (retention %d)", followerN, ownerN, bound, retention)
	}

	// The follower, as the next owner, serves watchers from its oldest
	// retained revision, and on.
	next := openMem(t, followerFS, Options{Log: log, LogRetention: retention})
	defer next.Close()
	if got, min := next.OldestRevision(), next.Revision()-retention-1024; got < min {
		t.Errorf("the next owner's oldest revision is %d; want at least %d", got, min)
	}
	if _, err := next.Report(ctx, PatchRequest{ID: "meter", Patch: Document{"kwh": fmt.Sprint("done")}}); err != nil {
		t.Fatal(err)
	}
}
