package twin

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strings"
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
	if ev == nil {
		t.Fatal("an event the watcher did not see")
	}
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
// every kind of change, pruning, and restarts that raise and lower the
// log's retention.
func TestLogChangesRebuildTwins(t *testing.T) {
	defer func(v int64) { logChainSpan = v }(logChainSpan)
	logChainSpan = 1250
	ctx := context.Background()
	fs := vfs.NewMem()
	r := rand.New(rand.NewPCG(1, 2))
	ids := []string{"a", "b", "c", "d", "e", "f"}
	published := map[int64]*Event{} // every event as it was published
	imported := map[string]int64{}  // the revision at each twin's last import

	// phase opens the store with the retention given, makes n random
	// changes while a watcher that keeps up records them, and checks what
	// the log rebuilds.
	phase := func(retention int64, n int, rare bool) {
		t.Helper()
		opts := Options{FS: fs, Dir: "db", LogRetention: retention, HistoryLimit: 40, CacheBytes: 1}
		e := openMem(t, fs, opts)
		defer func() {
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			if vs, err := Check(opts); err != nil || len(vs) > 0 {
				t.Fatalf("Check = %v, %v", vs, err)
			}
		}()
		// After a restart, the log serves what it did before.
		check(t, e, ids, published, imported)

		var mu sync.Mutex
		wctx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Add(1)
		from := e.Revision() + 1 // before any change of this phase
		go func() {
			defer wg.Done()
			e.Watch(wctx, from, func(ev *Event) error {
				mu.Lock()
				published[ev.Revision] = ev
				mu.Unlock()
				return nil
			})
		}()
		if rare {
			// A twin that changes rarely: its chain would reach below
			// the log's floor but for the span rule.
			if _, err := e.Create(ctx, CreateRequest{ID: "rare", Reported: Document{"n": 0.0}}); err != nil && !errors.Is(err, ErrAlreadyExists) {
				t.Fatal(err)
			}
		}
		sinks := map[string]Sink{}
		for i := range n {
			if rare && i%700 == 699 {
				if _, err := e.Report(ctx, PatchRequest{ID: "rare", Patch: Document{"n": float64(i)}}); err != nil {
					t.Fatal(err)
				}
			}
			randomChange(t, e, r, ids, sinks, imported, i)
		}
		last := e.Revision()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			mu.Lock()
			_, ok := published[last]
			mu.Unlock()
			if ok || last == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the watcher did not catch up")
			}
		}
		stop()
		wg.Wait()
		check(t, e, ids, published, imported)
	}
	phase(2500, 9000, true)
	phase(2500, 0, false)     // a restart alone
	phase(10_000, 6000, true) // the retention raised
	phase(1000, 6000, true)   // and lowered
}

// randomChange makes change i, one of every kind, to a random twin.
// imported records the revision at each twin's last import.
func randomChange(t *testing.T, e *Engine, r *rand.Rand, ids []string, sinks map[string]Sink, imported map[string]int64, i int) {
	t.Helper()
	ctx := context.Background()
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
		imported[id] = e.Revision()
		delete(sinks, id)
	}
	if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrAlreadyExists) {
		t.Fatalf("change %d: %v", i, err)
	}
}

// check reads every event the engine may serve from its log, as a watcher
// far behind does, and every twin's history, and compares each with the
// event as it was published; it also checks the store (Check) and how the
// log's entries are made.
func check(t *testing.T, e *Engine, ids []string, published map[int64]*Event, imported map[string]int64) {
	t.Helper()
	last := e.Revision()
	if last == 0 {
		return
	}
	oldest := e.OldestRevision()
	if oldest <= 1 {
		t.Fatalf("oldest revision %d: the log was never pruned; the test needs more changes", oldest)
	}
	lr := newLogReader(e.db)
	n := 0
	for from := oldest; from <= last; {
		evs, next, err := e.readLog(lr, nil, from, last)
		if err != nil {
			t.Fatalf("reading the log from %d (oldest %d): %v", from, oldest, err)
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
	for _, id := range append(ids, "rare") {
		evs, err := e.History(id, 0, 40)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		// The history holds every version the log still serves, up to
		// the limit.
		versions, want := 0, int64(0) // want: the version before the last counted
	count:
		for rev := last; rev >= max(oldest, imported[id]+1) && versions < 40; rev-- {
			ev := published[rev]
			switch {
			case ev.Twin == nil || ev.Twin.ID != id || ev.Kind == KindPresence:
			case ev.Kind == KindDeleted, want != 0 && ev.Twin.Version != want:
				// The history of the twin before a deletion, or an
				// import (no event of the twin's own), is gone.
				break count
			case ev.Kind == KindCreated:
				versions++
				break count
			default:
				versions++
				want = ev.Twin.Version - 1
			}
		}
		if len(evs) < versions {
			t.Errorf("history of %s holds %d events; the log serves %d of its versions", id, len(evs), versions)
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
	// Most entries hold a change, and chains stay short.
	changes, whole := 0, 0
	chain := map[string]int{}
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: logKey(oldest), UpperBound: logKey(last + 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		ev, ch, err := decodeLogEntry(it.Value())
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case ch != nil:
			changes++
			if chain[ch.head.ID]++; chain[ch.head.ID] >= logCheckpointEvery {
				t.Fatalf("twin %s has a chain of %d changes at revision %d; at most %d allowed", ch.head.ID, chain[ch.head.ID], ev.Revision, logCheckpointEvery-1)
			}
		case ev.Twin != nil:
			whole++
			chain[ev.Twin.ID] = 0
		}
	}
	if changes < 3*whole {
		t.Errorf("%d entries hold a change, %d the whole twin; want most to hold a change", changes, whole)
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

// TestLogReaderBounded: a batch read from the log weighs its events' whole
// twins, not their small change entries, and a reader keeps a bounded
// amount of rebuilt twins however many it passes.
func TestLogReaderBounded(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	big := Document{}
	for i := range 500 {
		big[fmt.Sprintf("leaf-%03d", i)] = fmt.Sprintf("a value of some length, number %d", i)
	}
	const twins = 400 // about 26 MB of documents in all
	for i := range twins {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("big-", i), Reported: big}); err != nil {
			t.Fatal(err)
		}
	}
	from := e.Revision() + 1
	for i := range twins {
		if _, err := e.Report(ctx, PatchRequest{ID: fmt.Sprint("big-", i), Patch: Document{"t": 1.0}}); err != nil {
			t.Fatal(err)
		}
	}
	lr := newLogReader(e.db)
	evs, next, err := e.readLog(lr, nil, from, e.Revision())
	if err != nil {
		t.Fatal(err)
	}
	// Each twin encodes to about 30 KB: a batch of 1 MiB holds about 36.
	if len(evs) == 0 || len(evs) > 64 {
		t.Errorf("one batch of reports to twins of about 30 KB holds %d events; want at most 64 (1 MiB)", len(evs))
	}
	for next <= e.Revision() {
		if _, next, err = e.readLog(lr, nil, next, e.Revision()); err != nil {
			t.Fatal(err)
		}
	}
	if lr.bytes > logReaderBytes || len(lr.last) == twins {
		t.Errorf("the reader holds %d twins of %d bytes estimated; want at most %d bytes", len(lr.last), lr.bytes, logReaderBytes)
	}
}

// TestImportDropsOrphanMetadata: an import keeps the metadata of the
// document's members only, so that no twin holds metadata of a path that
// names nothing, which the log's changes could not carry: the events
// rebuilt from the log after such an import are the events published.
func TestImportDropsOrphanMetadata(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	meta := map[string]FieldMeta{"/a": {Time: at}, "/a/x": {Time: at}, "/b": {Time: at}, "/gone": {Time: at}}
	if _, err := e.Import(ctx, []ImportItem{{Twin: &Twin{ID: "f", Reported: Document{"a": 1.0, "b": 2.0}, ReportedMeta: meta}}}, ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	tw, err := e.Get("f")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := tw.ReportedMeta["/a/x"]; ok || len(tw.ReportedMeta) != 2 {
		t.Errorf("imported metadata %v; want /a and /b only", tw.ReportedMeta)
	}
	from := e.Revision() + 1
	var published []*Event
	for i := range 3 {
		tw, err := e.Report(ctx, PatchRequest{ID: "f", Patch: Document{"a": float64(10 + i)}})
		if err != nil {
			t.Fatal(err)
		}
		evs, err := e.History("f", 0, 1)
		if err != nil || len(evs) != 1 || evs[0].Twin.Version != tw.Version {
			t.Fatalf("History = %v, %v", evs, err)
		}
		published = append(published, &Event{Twin: tw})
	}
	evs, _, err := e.readLog(newLogReader(e.db), nil, from, e.Revision())
	if err != nil || len(evs) != 3 {
		t.Fatalf("readLog = %d events, %v", len(evs), err)
	}
	for i, ev := range evs {
		if got, want := eventJSON(t, &Event{Twin: ev.Twin}), eventJSON(t, published[i]); !reflect.DeepEqual(got, want) {
			t.Errorf("event %d rebuilt from the log:\n%v\npublished:\n%v", i, got, want)
		}
	}
}

// TestCheckLogChains: Check finds a record whose place in the watch log's
// chains is not where its twin's last entry is, and a chain longer than
// the writer makes.
func TestCheckLogChains(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	opts := Options{FS: fs, Dir: "db"}
	e := openMem(t, fs, opts)
	for i := range 5 {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("f", i)}); err != nil {
			t.Fatal(err)
		}
		for j := range 3 {
			if _, err := e.Report(ctx, PatchRequest{ID: fmt.Sprint("f", i), Patch: Document{"t": float64(j)}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	vs := e.VShard("f2")
	e.Close()
	if got, err := Check(opts); err != nil || len(got) > 0 {
		t.Fatalf("Check = %v, %v on a sound store", got, err)
	}
	db, err := pebble.Open("db", &pebble.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	v, closer, err := db.Get(twinKey(vs, "f2"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := decodeRecord(v)
	closer.Close()
	if err != nil || r.Log.Chain != 3 {
		t.Fatalf("f2's record: %+v, %v; want 3 changes after its creation", r.Log, err)
	}
	r.Log.Chain = 2
	db.Set(twinKey(vs, "f2"), encodeRecord(r), pebble.Sync)
	db.Close()
	got, err := Check(opts)
	if err != nil || len(got) != 1 || !strings.Contains(got[0].Problem, "the record puts the twin 2 changes after revision") {
		t.Errorf("Check = %v, %v; want the record's place in the log named", got, err)
	}
}

// TestLogChainsSurvivePowerLoss: the watch log's chains and its pruning
// hold across power cuts. Writers batch changes to many twins per step
// while the log is pruned (which is not synced, and records the oldest
// revision with its deletion); a crash at any point leaves a store whose
// every servable event rebuilds from the log, whose histories read, and
// that Check finds sound.
func TestLogChainsSurvivePowerLoss(t *testing.T) {
	defer func(v int64) { logChainSpan = v }(logChainSpan)
	logChainSpan = 300
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	ctx := context.Background()
	mem := vfs.NewCrashableMem()
	opts := Options{FS: mem, Dir: "db", Workers: 2, VShards: 8, LogRetention: 400, HistoryLimit: 20, CacheBytes: 1}
	e, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	const writers, twins = 8, 24
	for i := range twins {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("t", i), Reported: Document{"n": 0.0}}); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	// The revisions of acknowledged changes, in the order of their
	// acknowledgements: those acknowledged before a crash must survive it.
	// Others may not: a revision handed out to a change that was not yet
	// durable leaves a hole in the log when the power cut takes it.
	var ackMu sync.Mutex
	var acked []int64
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(w)+10))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := fmt.Sprint("t", r.IntN(twins))
				var tw *Twin
				var err error
				if i%3 == 0 {
					tw, err = e.UpdateDesired(ctx, PatchRequest{ID: id, Patch: randomPatch(r, 0)})
				} else {
					tw, err = e.Report(ctx, PatchRequest{ID: id, Patch: randomPatch(r, 0)})
				}
				if errors.Is(err, ErrClosed) {
					return
				}
				if err == nil {
					ackMu.Lock()
					acked = append(acked, tw.Revision)
					ackMu.Unlock()
				}
			}
		}()
	}
	var clones []vfs.FS
	var ackedBefore []int // len(acked) when each clone was taken
	for len(clones) < 6 {
		// Pruning starts once the log holds its retention and a pruning
		// step (1,024 revisions) more.
		for target := max(e.Stats().Changes, 2000) + int64(300+rng.IntN(900)); e.Stats().Changes < target; {
			time.Sleep(time.Millisecond)
		}
		ackMu.Lock()
		ackedBefore = append(ackedBefore, len(acked))
		clones = append(clones, mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: rng.IntN(101), RNG: rand.New(rand.NewPCG(rng.Uint64(), 2))}))
		ackMu.Unlock()
	}
	close(stop)
	wg.Wait()
	e.Close()

	for i, clone := range clones {
		o := opts
		o.FS = clone
		e, err := Open(o)
		if err != nil {
			t.Fatalf("crash %d: Open: %v", i, err)
		}
		if e.OldestRevision() <= 1 {
			t.Errorf("crash %d: oldest revision %d: the log was never pruned; the test needs more changes", i, e.OldestRevision())
		}
		n, last := int64(0), e.Revision()
		read := map[int64]bool{}
		lr := newLogReader(e.db)
		for from := e.OldestRevision(); from <= last; {
			evs, next, err := e.readLog(lr, nil, from, last)
			if err != nil {
				t.Fatalf("crash %d: reading the log from %d (oldest %d, last %d): %v", i, from, e.OldestRevision(), last, err)
			}
			for _, ev := range evs {
				if ev.Twin == nil || ev.Twin.Revision != ev.Revision {
					t.Fatalf("crash %d: revision %d rebuilt as %+v", i, ev.Revision, ev.Twin)
				}
				read[ev.Revision] = true
			}
			n += int64(len(evs))
			from = next
		}
		if want := last - e.OldestRevision() + 1; n > want || n < want/2 {
			t.Errorf("crash %d: read %d events from revision %d to %d", i, n, e.OldestRevision(), last)
		}
		for _, rev := range acked[:ackedBefore[i]] {
			if rev >= e.OldestRevision() && !read[rev] {
				t.Errorf("crash %d: revision %d was acknowledged before the crash, and is not in the log", i, rev)
			}
		}
		for j := range twins {
			id := fmt.Sprint("t", j)
			evs, err := e.History(id, 0, 20)
			if err != nil {
				t.Fatalf("crash %d: History(%s): %v", i, id, err)
			}
			// The newest history entry is the twin as it is.
			if tw, err := e.Get(id); err != nil || len(evs) == 0 || evs[0].Twin.Version != tw.Version ||
				!reflect.DeepEqual(eventJSON(t, &Event{Twin: evs[0].Twin}), eventJSON(t, &Event{Twin: withoutSeen(tw, evs[0].Twin)})) {
				t.Fatalf("crash %d: %s is %+v, %v; its newest history entry %d events: %+v", i, id, tw, err, len(evs), evs)
			}
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		if vs, err := Check(o); err != nil || len(vs) > 0 {
			t.Fatalf("crash %d: Check = %v, %v", i, vs, err)
		}
	}
}

// withoutSeen returns tw with the presence of the event's twin: a report
// that moves only last_seen changes the twin but logs no event.
func withoutSeen(tw, ev *Twin) *Twin {
	c := tw.clone()
	c.Presence = ev.Presence
	c.TokenHash = nil
	return c
}

// TestRecentEventsWeighTheirTwin: the events kept decoded in memory for
// watchers are bounded by their twins' size, not by their log entries': a
// small change to a big twin is read from the log, not kept.
func TestRecentEventsWeighTheirTwin(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	big := Document{}
	for i := range 200 {
		big[fmt.Sprintf("leaf-%03d", i)] = "some value of a certain length"
	}
	for _, id := range []string{"small", "big"} {
		doc := Document{"t": 0.0}
		if id == "big" {
			doc = big
		}
		if _, err := e.Create(ctx, CreateRequest{ID: id, Reported: doc}); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"small", "big"} {
		tw, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{"t": 1.0}})
		if err != nil {
			t.Fatal(err)
		}
		kept := e.recent[tw.Revision&(recentEvents-1)].Load() != nil
		if want := id == "small"; kept != want {
			t.Errorf("the report to %s twin kept in memory: %v, want %v", id, kept, want)
		}
	}
}
