package twin

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// eventJSON is an event as a comparable value: its JSON (which sorts no
// keys) decoded, without the token hash, which the log does not hold.
func eventJSON(t *testing.T, ev *Event) any {
	t.Helper()
	c := *ev
	if c.Twin != nil {
		tw := *c.Twin
		tw.TokenHash = nil
		c.Twin = &tw
	}
	b, err := json.Marshal(&c)
	if err != nil {
		t.Fatal(err)
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// randomPatch returns a merge patch that sets, replaces, nests, empties
// and removes members, turns leaves into objects and back.
func randomPatch(r *rand.Rand, depth int) Document {
	p := Document{}
	for range 1 + r.IntN(3) {
		k := fmt.Sprint("k", r.IntN(5))
		switch n := r.IntN(10); {
		case n < 3:
			p[k] = float64(r.IntN(4))
		case n < 4:
			p[k] = nil // remove
		case n < 5:
			p[k] = []any{float64(r.IntN(3)), "x", nil}
		case n < 6:
			p[k] = map[string]any{} // an empty object, a leaf
		case n < 8 && depth < 3:
			p[k] = map[string]any(randomPatch(r, depth+1))
		default:
			p[k] = fmt.Sprint("s", r.IntN(3))
		}
	}
	return p
}

// TestLogChangesRebuildTwins: the watch log stores most changes as what
// changed (logchain.go); every event a watcher far behind reads from it,
// and every history entry, equals the event as it was published, across
// every kind of change, pruning, and a restart.
func TestLogChangesRebuildTwins(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	opts := Options{LogRetention: 2500, HistoryLimit: 40, CacheBytes: 1}
	e := openMem(t, fs, opts)

	// Every event as it is published, from a watcher that keeps up.
	var mu sync.Mutex
	published := map[int64]*Event{}
	wctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		e.Watch(wctx, 1, func(ev *Event) error {
			mu.Lock()
			published[ev.Revision] = ev
			mu.Unlock()
			return nil
		})
	}()

	r := rand.New(rand.NewPCG(1, 2))
	ids := []string{"a", "b", "c", "d", "e", "f"}
	sinks := map[string]Sink{}
	// A twin that changes rarely: its chain would reach below the log's
	// floor but for the margin rule.
	if _, err := e.Create(ctx, CreateRequest{ID: "rare", Reported: Document{"n": 0.0}}); err != nil {
		t.Fatal(err)
	}
	for i := range 9000 {
		if i%700 == 699 {
			if _, err := e.Report(ctx, PatchRequest{ID: "rare", Patch: Document{"n": float64(i)}}); err != nil {
				t.Fatal(err)
			}
		}
		id := ids[r.IntN(len(ids))]
		var err error
		switch n := r.IntN(100); {
		case n < 3:
			err = e.Delete(ctx, id, 0)
			delete(sinks, id)
		case n < 8:
			_, err = e.Create(ctx, CreateRequest{ID: id, Type: "fridge", Labels: map[string]string{"site": "x"},
				Reported: randomPatch(r, 0), Desired: Document{"target": 4.0}})
		case n < 45:
			_, err = e.Report(ctx, PatchRequest{ID: id, Patch: randomPatch(r, 0)})
		case n < 50:
			_, err = e.Report(ctx, PatchRequest{ID: id, Patch: Document{}}) // only last_seen moves
		case n < 75:
			_, err = e.UpdateDesired(ctx, PatchRequest{ID: id, Patch: randomPatch(r, 0)})
		case n < 80:
			typ := fmt.Sprint("t", r.IntN(3))
			_, err = e.Update(ctx, UpdateRequest{ID: id, Type: &typ, Labels: map[string]string{fmt.Sprint("l", r.IntN(3)): "v"}, RemoveLabels: []string{"site"}})
		case n < 85:
			if s, ok := sinks[id]; ok {
				err = e.Disconnect(ctx, id, s)
				delete(sinks, id)
			} else {
				s := newRecSink()
				if _, err = e.Connect(ctx, id, s); err == nil {
					sinks[id] = s
				}
			}
		case n < 88:
			h := sha256.Sum256([]byte(fmt.Sprint(i)))
			err = e.SetTokenHash(ctx, id, h[:])
			delete(sinks, id) // a token change ends the stream
		case n < 95:
			_, err = e.SendCommand(ctx, CommandRequest{DeviceID: id, Name: "beep"})
		default:
			// An import replaces the twin: its next entry starts a chain.
			_, err = e.Import(ctx, []ImportItem{{Twin: &Twin{ID: id, Type: "fridge", Reported: Document{"imported": float64(i)}}}}, ImportOptions{Upsert: true})
		}
		if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrAlreadyExists) {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	last := e.Revision()
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		_, ok := published[last]
		mu.Unlock()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the watcher did not catch up")
		}
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	wg.Wait()

	check := func(e *Engine) {
		t.Helper()
		oldest := e.OldestRevision()
		if oldest <= 1 {
			t.Fatalf("oldest revision %d: the log was never pruned; the test needs more changes", oldest)
		}
		// A watcher far behind reads every retained event from the log.
		lr := newLogReader(e.db)
		n := 0
		for from := oldest; from <= last; {
			evs, next, err := e.readLog(lr, nil, from, last)
			if err != nil {
				t.Fatalf("reading the log from %d: %v", from, err)
			}
			for _, ev := range evs {
				n++
				if got, want := eventJSON(t, ev), eventJSON(t, published[ev.Revision]); !reflect.DeepEqual(got, want) {
					t.Fatalf("revision %d rebuilt from the log:\n%v\npublished:\n%v", ev.Revision, got, want)
				}
			}
			from = next
		}
		if want := int(last - oldest + 1); n != want {
			t.Fatalf("read %d events from the log, want %d", n, want)
		}
		// Every twin's history, newest first, is the events published.
		for _, id := range append(ids, "rare") {
			evs, err := e.History(id, 0, 40)
			if errors.Is(err, ErrNotFound) {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, ev := range evs {
				if ev.Revision < oldest {
					t.Fatalf("history of %s holds revision %d, older than the oldest retained %d", id, ev.Revision, oldest)
				}
				if got, want := eventJSON(t, ev), eventJSON(t, published[ev.Revision]); !reflect.DeepEqual(got, want) {
					t.Fatalf("history of %s, revision %d:\n%v\npublished:\n%v", id, ev.Revision, got, want)
				}
			}
		}
	}
	check(e)

	// Most entries hold a change, chains stay short, and a change entry
	// is a fraction of a whole one.
	changes, whole, changeBytes, wholeBytes := 0, 0, 0, 0
	chain := map[string]int{}
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: logKey(e.OldestRevision()), UpperBound: logKey(last + 1)})
	if err != nil {
		t.Fatal(err)
	}
	for it.First(); it.Valid(); it.Next() {
		ev, ch, err := decodeLogEntry(it.Value())
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case ch != nil:
			changes++
			changeBytes += len(it.Value())
			if chain[ch.head.ID]++; chain[ch.head.ID] >= logCheckpointEvery {
				t.Fatalf("twin %s has a chain of %d changes at revision %d; at most %d allowed", ch.head.ID, chain[ch.head.ID], ev.Revision, logCheckpointEvery-1)
			}
		case ev.Twin != nil:
			whole++
			wholeBytes += len(it.Value())
			chain[ev.Twin.ID] = 0
		}
	}
	it.Close()
	if changes < 3*whole {
		t.Errorf("%d entries hold a change, %d the whole twin; want most to hold a change", changes, whole)
	}
	t.Logf("%d change entries of %d bytes on average, %d whole ones of %d", changes, changeBytes/max(changes, 1), whole, wholeBytes/max(whole, 1))

	// After a restart, watchers resume from the oldest retained revision.
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openMem(t, fs, opts)
	defer e.Close()
	check(e)
	if got := e.Revision(); got != last {
		t.Fatalf("revision %d after the restart, want %d", got, last)
	}
}

// TestLogChangeEntrySize: a fridge's temperature report, the most common
// change, logs a fraction of what the whole twin takes.
func TestLogChangeEntrySize(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "fridge-123", Type: "fridge", Labels: map[string]string{"site": "berlin"},
		Reported: Document{"temp_c": 2.3, "door": "closed", "power_w": 80.0, "compressor": false, "target_c": 4.0,
			"eco": true, "fw": "1.2.3", "site": map[string]any{"city": "berlin", "floor": 3.0}},
		Desired: Document{"target_c": 4.0, "eco": true}}); err != nil {
		t.Fatal(err)
	}
	for i := range 64 {
		if _, err := e.Report(ctx, PatchRequest{ID: "fridge-123", Patch: Document{"temp_c": 2 + float64(i%10)/10}}); err != nil {
			t.Fatal(err)
		}
	}
	sizes := map[bool][]int{} // by whether the entry holds the whole twin
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: prefixLog, UpperBound: prefixEnd(prefixLog)})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		_, ch, err := decodeLogEntry(it.Value())
		if err != nil {
			t.Fatal(err)
		}
		sizes[ch == nil] = append(sizes[ch == nil], len(it.Value()))
	}
	whole, changes := sizes[true], sizes[false]
	if len(whole) != 65/logCheckpointEvery+1 || len(changes) != 65-len(whole) {
		t.Fatalf("%d whole entries and %d changes for 65 versions; want a whole one every %d", len(whole), len(changes), logCheckpointEvery)
	}
	avg := func(s []int) int {
		n := 0
		for _, v := range s {
			n += v
		}
		return n / len(s)
	}
	if c, w := avg(changes), avg(whole); c*3 > w {
		t.Errorf("a report's change entry takes %d bytes, the whole twin's %d; want less than a third", c, w)
	} else {
		t.Logf("a report's change entry takes %d bytes, the whole twin's %d", c, w)
	}
}

// BenchmarkLogReplay measures what rebuilding twins from change entries
// costs readers: a watcher catching up through the log (each change
// applied to the twin before it) and a twin's history page (each read
// oldest first, its first from the chain's whole entry).
func BenchmarkLogReplay(b *testing.B) {
	ctx := context.Background()
	e := openMem(b, vfs.NewMem(), Options{})
	defer e.Close()
	const twins, reports = 100, 64
	for i := range twins {
		id := fmt.Sprint("fridge-", i)
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "fridge", Labels: map[string]string{"site": "berlin"},
			Reported: Document{"temp_c": 2.3, "door": "closed", "power_w": 80.0, "compressor": false, "target_c": 4.0,
				"eco": true, "fw": "1.2.3", "site": map[string]any{"city": "berlin", "floor": 3.0}},
			Desired: Document{"target_c": 4.0, "eco": true}}); err != nil {
			b.Fatal(err)
		}
	}
	for r := range reports {
		for i := range twins {
			if _, err := e.Report(ctx, PatchRequest{ID: fmt.Sprint("fridge-", i), Patch: Document{"temp_c": float64(r)}}); err != nil {
				b.Fatal(err)
			}
		}
	}
	last := e.Revision()
	b.Run("catch-up", func(b *testing.B) {
		for b.Loop() {
			lr := newLogReader(e.db)
			for from := int64(1); from <= last; {
				var err error
				if _, from, err = e.readLog(lr, nil, from, last); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(int64(b.N)*last), "ns/event")
	})
	b.Run("history", func(b *testing.B) {
		for b.Loop() {
			if _, err := e.History("fridge-7", 0, 50); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*50), "ns/event")
	})
}
