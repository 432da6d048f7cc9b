package twin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// memLog is a replicated log in memory.
type memLog struct {
	mu      sync.Mutex
	entries [][]byte
	fail    error // if set, Append fails with it
}

func (l *memLog) Append(_ context.Context, entry []byte) (uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fail != nil {
		return 0, l.fail
	}
	l.entries = append(l.entries, append([]byte(nil), entry...))
	return uint64(len(l.entries)), nil
}

func (l *memLog) all() [][]byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([][]byte(nil), l.entries...)
}

// rawContents returns every key and value of the store in fs, but for the
// store's metadata (m/), which each node keeps for itself.
func rawContents(t *testing.T, fs vfs.FS) map[string]string {
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
	out := map[string]string{}
	for it.First(); it.Valid(); it.Next() {
		if bytes.HasPrefix(it.Key(), []byte("m/")) {
			continue
		}
		out[string(it.Key())] = string(it.Value())
	}
	return out
}

// replicatedWork makes changes of every kind through e.
func replicatedWork(t *testing.T, e *Engine, round int) {
	t.Helper()
	ctx := context.Background()
	for i := range 20 - round {
		id := fmt.Sprintf("planter-%d", i)
		if round == 0 {
			if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "planter", Desired: doc(t, `{"light":"on"}`)}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: doc(t, fmt.Sprintf(`{"moisture":%d,"pump":{"on":%v}}`, i+round, i%2 == 0))}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.UpdateDesired(ctx, PatchRequest{ID: id, Patch: doc(t, fmt.Sprintf(`{"target":%d}`, round))}); err != nil {
			t.Fatal(err)
		}
		if i%5 == 0 {
			if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: id, Name: "water", Params: doc(t, `{"ml":50}`)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := e.Delete(ctx, fmt.Sprintf("planter-%d", 19-round), 0); err != nil {
		t.Fatal(err)
	}
	if err := e.PutRule(fmt.Sprintf("rule-%d", round), []byte(`{"id":"x"}`)); err != nil {
		t.Fatal(err)
	}
	if err := e.PutAPIKey(fmt.Sprintf("key-%d", round), []byte("hash")); err != nil {
		t.Fatal(err)
	}
	if round > 0 {
		if err := e.DeleteAPIKey(fmt.Sprintf("key-%d", round-1)); err != nil {
			t.Fatal(err)
		}
	}
}

// A follower that applies a clustered engine's log holds exactly what the
// engine's store holds, and serves on as the next owner from there.
func TestFollowerMaterializesTheLog(t *testing.T) {
	log := &memLog{}
	ownerFS, followerFS := vfs.NewMem(), vfs.NewMem()
	owner := openMem(t, ownerFS, Options{Log: log})
	replicatedWork(t, owner, 0)
	replicatedWork(t, owner, 1)
	if got, want := owner.Applied(), uint64(len(log.all())); got != want {
		t.Errorf("owner applied %d; the log has %d entries", got, want)
	}
	ownerRev := owner.Revision()
	if err := owner.Close(); err != nil {
		t.Fatal(err)
	}

	f := openMem(t, followerFS, Options{Follow: true})
	if _, err := f.Create(context.Background(), CreateRequest{ID: "x"}); !errors.Is(err, ErrFollowing) {
		t.Errorf("Create on a follower = %v; want ErrFollowing", err)
	}
	entries := log.all()
	half := len(entries) / 2
	for i, entry := range entries[:half] {
		if err := f.ApplyEntry(uint64(i+1), entry); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	// A restarted follower resumes where its store says.
	f = openMem(t, followerFS, Options{Follow: true})
	if got := f.Applied(); got != uint64(half) {
		t.Fatalf("reopened follower applied %d; want %d", got, half)
	}
	for i, entry := range entries {
		if err := f.ApplyEntry(uint64(i+1), entry); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	want, got := rawContents(t, ownerFS), rawContents(t, followerFS)
	if len(want) == 0 {
		t.Fatal("the owner's store is empty")
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("key %q: the follower has %q; the owner %q", k, got[k], v)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("key %q: the follower has it; the owner does not", k)
		}
	}

	// The follower takes over: it serves what the owner served, and its
	// next change continues the owner's versions and revisions.
	next := openMem(t, followerFS, Options{Log: log})
	defer next.Close()
	if got := next.Revision(); got != ownerRev {
		t.Errorf("the new owner is at revision %d; the old one was at %d", got, ownerRev)
	}
	tw, err := next.Report(context.Background(), PatchRequest{ID: "planter-3", Patch: doc(t, `{"moisture":1}`)})
	if err != nil {
		t.Fatal(err)
	}
	if tw.Version != 6 || tw.Revision != ownerRev+1 {
		t.Errorf("the new owner's report made version %d revision %d; want 6 and %d", tw.Version, tw.Revision, ownerRev+1)
	}
	if rules, err := next.Rules(); err != nil || len(rules) != 2 {
		t.Errorf("the new owner has rules %v (%v); want rule-0 and rule-1", rules, err)
	}
	if keys, err := next.APIKeys(); err != nil || len(keys) != 1 || keys["key-1"] == nil {
		t.Errorf("the new owner has keys %v (%v); want key-1 only", keys, err)
	}
}

// A change the log refuses is answered with an error, never reaches the
// store, and stops the engine: its working state is ahead of the log.
func TestLogRefusalStopsTheEngine(t *testing.T) {
	log := &memLog{}
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{Log: log})
	ctx := context.Background()
	if _, err := e.Create(ctx, CreateRequest{ID: "car-1"}); err != nil {
		t.Fatal(err)
	}
	refused := errors.New("fenced: another node owns the shards")
	log.mu.Lock()
	log.fail = refused
	log.mu.Unlock()
	if _, err := e.Report(ctx, PatchRequest{ID: "car-1", Patch: doc(t, `{"speed":3}`)}); err == nil {
		t.Fatal("a report the log refused succeeded")
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "car-1", Patch: doc(t, `{"speed":4}`)}); !errors.Is(err, ErrClosed) {
		t.Errorf("a report after a refusal = %v; want ErrClosed", err)
	}
	if err := e.PutRule("r", []byte("{}")); err == nil {
		t.Error("PutRule after a refusal succeeded")
	}
	e.Close()
	e = openMem(t, fs, Options{})
	defer e.Close()
	tw, err := e.Get("car-1")
	if err != nil {
		t.Fatal(err)
	}
	if tw.Version != 1 || len(tw.Reported) != 0 {
		t.Errorf("the store holds car-1 at version %d, reported %v; want version 1, nothing reported", tw.Version, tw.Reported)
	}
}
