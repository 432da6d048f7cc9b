package twin

// Tests from a second review of the log chains (logchain.go): a change
// diffed, encoded, decoded and applied gives back the twin exactly, and
// events rebuilt under concurrent steps, eviction, rules and imports are
// the events published.

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// roundTrip: the twin as a whole log entry would give it back.
func roundTrip(t *testing.T, tw *Twin) *Twin {
	t.Helper()
	ev := &Event{Revision: tw.Revision, Kind: KindUpdated, Twin: tw}
	got, ch, err := decodeLogEntry(appendEvent(nil, ev, appendTwin(nil, tw)))
	if err != nil || ch != nil {
		t.Fatal(err)
	}
	got.Twin.TokenHash = nil
	return got.Twin
}

func viaChange(t *testing.T, prev, next *Twin) (*Twin, bool) {
	t.Helper()
	d, ok := diffTwins(prev, next)
	if !ok {
		return nil, false
	}
	b := appendChangeEvent(nil, &Event{Revision: next.Revision, Kind: KindUpdated}, d, prev.Revision, 1)
	_, ch, err := decodeLogEntry(b)
	if err != nil || ch == nil {
		t.Fatal(err)
	}
	return ch.apply(roundTrip(t, prev)), true
}

func norm(t *testing.T, tw *Twin) string {
	b := appendTwinJSON(nil, tw)
	return string(b)
}

func TestReviewDiffRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 9))
	var l Limits
	l.EnsureDefaults()
	a := applier{limits: l}
	now := time.Unix(1700000000, 0).UTC()
	for iter := range 600 {
		cur, err := a.create(&CreateRequest{ID: "x", Reported: randomPatch(r, 0), Desired: randomPatch(r, 0)}, 0, now)
		if err != nil {
			continue
		}
		cur.Revision = 1
		for step := range 10 {
			now = now.Add(time.Second)
			next, err := a.patch(cur, &PatchRequest{Patch: randomPatch(r, 0), DesiredAckedVersion: int64(r.IntN(3))}, r.IntN(2) == 0, now)
			if err != nil || next == cur {
				continue
			}
			next.Revision = cur.Revision + 1
			got, ok := viaChange(t, cur, next)
			if ok {
				if g, w := norm(t, got), norm(t, roundTrip(t, next)); g != w && !reflect.DeepEqual(jsonAny(g), jsonAny(w)) {
					t.Fatalf("iter %d step %d:\n got %s\nwant %s", iter, step, g, w)
				}
			}
			cur = next
		}
	}
}

var _ = fmt.Sprint

func jsonAny(s string) any {
	var v any
	_ = json.Unmarshal([]byte(s), &v)
	return v
}

func weirdPatch(r *rand.Rand, depth int) Document {
	keys := []string{"b~0", "a/b", "~", "~1", "x", "a"}
	p := Document{}
	for range 1 + r.IntN(3) {
		k := keys[r.IntN(len(keys))]
		switch n := r.IntN(10); {
		case n < 3:
			p[k] = float64(r.IntN(4))
		case n < 4:
			p[k] = nil
		case n < 5:
			p[k] = []any{float64(r.IntN(3))}
		case n < 6:
			p[k] = map[string]any{}
		case n < 8 && depth < 3:
			p[k] = map[string]any(weirdPatch(r, depth+1))
		default:
			p[k] = fmt.Sprint("s", r.IntN(3))
		}
	}
	return p
}

func TestReviewDiffRoundTripWeirdKeys(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	var l Limits
	l.EnsureDefaults()
	a := applier{limits: l}
	now := time.Unix(1700000000, 0).UTC()
	for iter := range 600 {
		cur, err := a.create(&CreateRequest{ID: "x", Reported: weirdPatch(r, 0), Desired: weirdPatch(r, 0)}, 0, now)
		if err != nil {
			t.Fatal(err)
		}
		cur.Revision = 1
		for step := range 10 {
			now = now.Add(time.Second)
			next, err := a.patch(cur, &PatchRequest{Patch: weirdPatch(r, 0)}, r.IntN(2) == 0, now)
			if err != nil || next == cur {
				continue
			}
			next.Revision = cur.Revision + 1
			if got, ok := viaChange(t, cur, next); ok {
				if g, w := norm(t, got), norm(t, roundTrip(t, next)); !reflect.DeepEqual(jsonAny(g), jsonAny(w)) {
					t.Fatalf("iter %d step %d:\n got %s\nwant %s", iter, step, g, w)
				}
			}
			cur = next
		}
	}
}

// Many concurrent changes to few twins, with rules: steps hold several
// changes of one twin, deletes and re-creates, rule patches and commands.
func TestReviewConcurrentStepsRebuild(t *testing.T) {
	fs := vfs.NewMem()
	opts := Options{FS: fs, Dir: "db", Workers: 1, CacheBytes: 1}
	e := openMem(t, fs, opts)
	e.SetEvaluator(modelRules{})
	ctx := context.Background()
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
	ids := []string{"a", "b"}
	var gw sync.WaitGroup
	for g := range 6 {
		gw.Add(1)
		go func() {
			defer gw.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			sinks := map[string]Sink{}
			imported := map[string]int64{}
			for i := range 800 {
				id := ids[r.IntN(len(ids))]
				switch r.IntN(10) {
				case 0:
					_, _ = e.Report(ctx, PatchRequest{ID: id, Patch: Document{"x": float64(r.IntN(10))}})
				case 1:
					_, _ = e.Import(ctx, []ImportItem{{Twin: &Twin{ID: id, Type: "fridge", Version: int64(1000 + i), Reported: Document{"imported": float64(i)}}}}, ImportOptions{Upsert: true, KeepVersions: r.IntN(2) == 0})
				default:
					func() {
						defer func() { recover() }()
						randomChange(t, e, r, ids, sinks, imported, i)
					}()
				}
			}
		}()
	}
	gw.Wait()
	last := e.Revision()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		_, ok := published[last]
		mu.Unlock()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("watcher behind")
		}
	}
	stop()
	wg.Wait()
	lr := newLogReader(e.db)
	n := 0
	for from := int64(1); from <= last; {
		evs, next, err := e.readLog(lr, nil, from, last)
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range evs {
			n++
			if got, want := eventJSON(t, ev), eventJSON(t, published[ev.Revision]); !reflect.DeepEqual(got, want) {
				t.Fatalf("revision %d rebuilt from the log:\n%v\npublished:\n%v", ev.Revision, got, want)
			}
		}
		from = next
	}
	t.Logf("%d events compared", n)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if vs, err := Check(opts); err != nil || len(vs) > 0 {
		t.Fatalf("Check = %v, %v", vs, err)
	}
}

func bigPair(b testing.TB) (*Twin, *Twin) {
	var l Limits
	l.EnsureDefaults()
	a := applier{limits: l}
	now := time.Unix(1700000000, 0).UTC()
	rep := Document{}
	for i := range 60 {
		sub := map[string]any{}
		for j := range 20 {
			sub[fmt.Sprint("f", j)] = float64(i * j)
		}
		rep[fmt.Sprint("sensor", i)] = sub
	}
	cur, err := a.create(&CreateRequest{ID: "x", Reported: rep}, 0, now)
	if err != nil {
		b.Fatal(err)
	}
	cur.Revision = 1
	next, err := a.patch(cur, &PatchRequest{Patch: Document{"sensor3": map[string]any{"f1": 99.0}}}, false, now.Add(time.Second))
	if err != nil {
		b.Fatal(err)
	}
	next.Revision = 2
	return cur, next
}

func BenchmarkReviewDiffBig(b *testing.B) {
	cur, next := bigPair(b)
	b.ReportAllocs()
	for b.Loop() {
		diffTwins(cur, next)
	}
}

func BenchmarkReviewEncodeRecordBig(b *testing.B) {
	_, next := bigPair(b)
	b.ReportAllocs()
	for b.Loop() {
		encodeRecord(record{Twin: next})
	}
}
