package twin

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestCacheBounded: a fleet many times the twin cache is served from the
// store: every twin reads back as written, the cache stays within its
// budget, and a restart knows the fleet's size and lists it in order
// without reading it into memory.
func TestCacheBounded(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	opts := Options{Workers: 2, VShards: 16, CacheBytes: 256 << 10}
	e := openMem(t, fs, opts)
	const n = 2000
	ids := make([]string, n)
	for i := range n {
		ids[i] = fmt.Sprintf("fridge-%04d", i)
		if _, err := e.Create(ctx, CreateRequest{ID: ids[i], Type: "fridge",
			Reported: Document{"temp_c": float64(i), "door": "closed", "fw": "1.2.3"}}); err != nil {
			t.Fatal(err)
		}
	}
	// Change every twin again, in another order: most are not cached.
	for i := n - 1; i >= 0; i-- {
		if _, err := e.Report(ctx, PatchRequest{ID: ids[i], Patch: Document{"temp_c": float64(-i - 1)}}); err != nil {
			t.Fatal(err)
		}
	}
	check := func(e *Engine, when string) {
		t.Helper()
		for i, id := range ids {
			tw, err := e.Get(id)
			if err != nil {
				t.Fatalf("%s: Get(%s): %v", when, id, err)
			}
			if tw.Version != 2 || tw.Reported["temp_c"] != float64(-i-1) || tw.Reported["door"] != "closed" {
				t.Fatalf("%s: %s = version %d, reported %v; want version 2, temp_c %d, door closed", when, id, tw.Version, tw.Reported, -i-1)
			}
		}
		if got := e.Len(); got != n {
			t.Errorf("%s: Len = %d; want %d", when, got, n)
		}
		var listed []string
		if _, err := e.List(ctx, "", func(tw *Twin) bool { listed = append(listed, tw.ID); return true }); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(listed, ids) {
			t.Errorf("%s: List returned %d twins (first %q); want all %d in id order", when, len(listed), listed[:min(3, len(listed))], n)
		}
		for _, w := range e.workers {
			if b, limit := w.cacheBytes(), w.cache.limit; b > limit {
				t.Errorf("%s: a worker's cache holds %d bytes; want at most its budget, %d", when, b, limit)
			}
		}
	}
	check(e, "before restart")
	st := e.Stats()
	if st.CacheMisses < n || st.CachedTwins >= n {
		t.Errorf("stats: %d misses, %d twins cached; want at least %d misses and fewer than %d cached", st.CacheMisses, st.CachedTwins, n, n)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openMem(t, fs, opts)
	defer e.Close()
	if st := e.Stats(); st.CachedTwins != 0 {
		t.Errorf("after restart, %d twins cached before any request; want 0 (start-up reads no twin)", st.CachedTwins)
	}
	check(e, "after restart")
	// Deleting and listing agree, whether the twin is cached or not.
	for _, id := range ids[:n/2] {
		if err := e.Delete(ctx, id, 0); err != nil {
			t.Fatal(err)
		}
	}
	var listed int
	if _, err := e.List(ctx, ids[n/2-1], func(*Twin) bool { listed++; return true }); err != nil {
		t.Fatal(err)
	}
	if listed != n/2 || e.Len() != n/2 {
		t.Errorf("after deleting half: listed %d after %s, Len %d; want %d", listed, ids[n/2-1], e.Len(), n/2)
	}
}
