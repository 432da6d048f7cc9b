package twin

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/google/go-cmp/cmp"
)

func openMem(t testing.TB, fs vfs.FS, opts Options) *Engine {
	t.Helper()
	opts.FS = fs
	opts.Dir = "db"
	e, err := Open(opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return e
}

func TestEngineLifecycle(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{})

	tw, err := e.Create(ctx, CreateRequest{ID: "fridge-1", Type: "fridge", Labels: map[string]string{"site": "berlin"},
		Desired: doc(t, `{"target_c":4}`)})
	if err != nil {
		t.Fatal(err)
	}
	if tw.Version != 1 || tw.Revision != 1 {
		t.Errorf("created twin at version %d revision %d; want 1 and 1", tw.Version, tw.Revision)
	}
	if _, err := e.Create(ctx, CreateRequest{ID: "fridge-1"}); !errors.Is(err, ErrAlreadyExists) {
		t.Errorf("second Create = %v; want ErrAlreadyExists", err)
	}
	tw, err = e.Report(ctx, PatchRequest{ID: "fridge-1", Patch: doc(t, `{"temp_c":6.5,"door":"closed","target_c":5}`)})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(doc(t, `{"target_c":4}`), tw.Delta); diff != "" {
		t.Errorf("delta after report (-want +got):\n%s", diff)
	}
	if tw.Presence.LastSeen.IsZero() {
		t.Errorf("a device report did not set last_seen")
	}
	// A no-op patch keeps the version.
	same, err := e.Report(ctx, PatchRequest{ID: "fridge-1", Patch: doc(t, `{"temp_c":6.5}`)})
	if err != nil || same.Version != tw.Version {
		t.Errorf("no-op report: version %d, %v; want version %d", same.Version, err, tw.Version)
	}
	// Optimistic concurrency.
	if _, err := e.UpdateDesired(ctx, PatchRequest{ID: "fridge-1", Patch: doc(t, `{"eco":true}`), ExpectedVersion: 1}); !errors.Is(err, ErrVersionMismatch) {
		t.Errorf("stale expected_version = %v; want ErrVersionMismatch", err)
	}
	tw, err = e.UpdateDesired(ctx, PatchRequest{ID: "fridge-1", Patch: doc(t, `{"eco":true,"target_c":null}`), ExpectedVersion: tw.Version})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(doc(t, `{"eco":true,"target_c":null}`), tw.Delta); diff != "" {
		t.Errorf("delta with tombstone (-want +got):\n%s", diff)
	}
	if _, ok := tw.DesiredMeta["/eco"]; !ok {
		t.Errorf("desired metadata %v lacks /eco", tw.DesiredMeta)
	}
	// The device acknowledges the desired version: the tombstone goes.
	tw, err = e.Report(ctx, PatchRequest{ID: "fridge-1", Patch: doc(t, `{"eco":true,"target_c":null}`), DesiredAckedVersion: tw.Version})
	if err != nil {
		t.Fatal(err)
	}
	if tw.Delta != nil {
		t.Errorf("delta after ack = %v; want none", tw.Delta)
	}
	// Bad input changes nothing.
	for _, p := range []string{`{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":{"l":{"m":{"n":{"o":{"p":{"q":1}}}}}}}}}}}}}}}}}`} {
		if _, err := e.Report(ctx, PatchRequest{ID: "fridge-1", Patch: doc(t, p)}); !errors.Is(err, ErrLimit) {
			t.Errorf("Report(%s) = %v; want ErrLimit", p, err)
		}
	}
	big := map[string]any{"blob": string(make([]byte, 70<<10))}
	if _, err := e.Report(ctx, PatchRequest{ID: "fridge-1", Patch: big}); !errors.Is(err, ErrLimit) {
		t.Errorf("Report(70 KiB) = %v; want ErrLimit", err)
	}
	got, _ := e.Get("fridge-1")
	if got.Version != tw.Version {
		t.Errorf("refused writes moved the version to %d from %d", got.Version, tw.Version)
	}

	hist, err := e.History("fridge-1", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var versions []int64
	for _, ev := range hist {
		versions = append(versions, ev.Twin.Version)
	}
	if diff := cmp.Diff([]int64{4, 3, 2, 1}, versions); diff != "" {
		t.Errorf("history versions (-want +got):\n%s", diff)
	}

	if err := e.Delete(ctx, "fridge-1", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Get("fridge-1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete = %v; want ErrNotFound", err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}

	// The version is never reused, not even after a restart.
	e = openMem(t, fs, Options{})
	defer e.Close()
	tw, err = e.Create(ctx, CreateRequest{ID: "fridge-1"})
	if err != nil {
		t.Fatal(err)
	}
	if tw.Version != 5 {
		t.Errorf("re-created twin at version %d; want 5", tw.Version)
	}
	if tw.Revision != 6 {
		t.Errorf("revision after restart = %d; want 6", tw.Revision)
	}
}

func TestWatch(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := openMem(t, vfs.NewMem(), Options{LogRetention: 2000})
	defer e.Close()
	for i := range 10 {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("t", i)}); err != nil {
			t.Fatal(err)
		}
	}
	got := make(chan *Event, 100)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		err := e.Watch(ctx, 4, func(ev *Event) error { got <- ev; return nil })
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Watch ended with %v; want context.Canceled", err)
		}
	}()
	for want := int64(4); want <= 10; want++ {
		ev := <-got
		if ev.Revision != want || ev.Kind != KindCreated {
			t.Fatalf("replayed event %d %v; want revision %d created", ev.Revision, ev.Kind, want)
		}
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "t3", Patch: doc(t, `{"on":true}`)}); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-got:
		if ev.Revision != 11 || ev.Twin.ID != "t3" || ev.Kind != KindReported {
			t.Errorf("live event %d %s %v; want revision 11 t3 reported", ev.Revision, ev.Twin.ID, ev.Kind)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no live event within 10s")
	}
	cancel()
	wg.Wait()

	// Push the log past its retention: old revisions are compacted.
	for i := range 3100 {
		if _, err := e.Report(context.Background(), PatchRequest{ID: "t1", Patch: Document{"n": float64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	err := e.Watch(context.Background(), 2, func(*Event) error { return nil })
	if !errors.Is(err, ErrCompacted) {
		t.Errorf("Watch from a compacted revision = %v; want ErrCompacted", err)
	}
}

// TestConcurrentWrites checks that concurrent writers to the same and to
// different twins all see their writes, with versions totally ordered.
func TestConcurrentWrites(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	const twins, writers, writes = 8, 16, 50
	for i := range twins {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("t", i)}); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range writes {
				id := fmt.Sprint("t", (w+i)%twins)
				if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{fmt.Sprint("w", w): float64(i)}}); err != nil {
					t.Errorf("Report: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	total := int64(0)
	for i := range twins {
		tw, _ := e.Get(fmt.Sprint("t", i))
		total += tw.Version - 1
	}
	if total != writers*writes {
		t.Errorf("versions add up to %d changes; want %d", total, writers*writes)
	}
	if rev := e.Revision(); rev != twins+writers*writes {
		t.Errorf("revision %d; want %d", rev, twins+writers*writes)
	}
}

func BenchmarkCommit(b *testing.B) {
	ctx := context.Background()
	e, err := Open(Options{Dir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	const twins = 64
	for i := range twins {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("fridge-", i), Type: "fridge"}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.SetParallelism(32) // 32 x GOMAXPROCS: 64 concurrent writers here
	var n atomicCounter
	b.RunParallel(func(pb *testing.PB) {
		id := fmt.Sprint("fridge-", n.next()%twins)
		i := 0
		for pb.Next() {
			i++
			if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{"temp_c": float64(i % 10)}}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

type atomicCounter struct {
	mu sync.Mutex
	n  int
}

func (c *atomicCounter) next() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n++
	return c.n
}

func TestListPages(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	for i := range 700 {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprintf("t%04d", i), Type: []string{"a", "b"}[i%2]}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 700; i += 7 {
		e.Delete(ctx, fmt.Sprintf("t%04d", i), 0)
	}
	var got []string
	after := ""
	for pages := 0; ; pages++ {
		if pages > 100 {
			t.Fatal("paging does not end")
		}
		page, more := listPage(t, e, after, 50, func(tw *Twin) bool { return tw.Type == "b" })
		for _, tw := range page {
			got = append(got, tw.ID)
		}
		if !more {
			break
		}
		after = page[len(page)-1].ID
	}
	var want []string
	for i := 1; i < 700; i += 2 {
		if i%7 != 0 {
			want = append(want, fmt.Sprintf("t%04d", i))
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("paged list has %d ids; want %d\n got %v\nwant %v", len(got), len(want), got, want)
	}
}

// BenchmarkOpen measures start-up: opening a store of 100,000 planters and
// loading them all into their shards.
func BenchmarkOpen(b *testing.B) {
	ctx := context.Background()
	dir := b.TempDir()
	e, err := Open(Options{Dir: dir})
	if err != nil {
		b.Fatal(err)
	}
	const n = 100_000
	var wg sync.WaitGroup
	for w := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 64 {
				id := fmt.Sprint("planter-", i)
				e.Create(ctx, CreateRequest{ID: id, Type: "planter", Labels: map[string]string{"site": "berlin"}})
				e.Report(ctx, PatchRequest{ID: id, Patch: Document{"soil_moisture": 40.0, "co2_ppm": 600.0, "light_lux": 300.0, "humidity": 55.0, "temp_c": 21.0}})
			}
		}()
	}
	wg.Wait()
	e.Close()
	b.ResetTimer()
	for b.Loop() {
		e, err := Open(Options{Dir: dir})
		if err != nil {
			b.Fatal(err)
		}
		if e.Len() != n {
			b.Fatalf("loaded %d twins; want %d", e.Len(), n)
		}
		e.Close()
	}
	b.ReportMetric(float64(n), "twins")
}
