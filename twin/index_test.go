package twin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/google/go-cmp/cmp"

	"github.com/twind-io/twind/twin/vfstest"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

type quietLogger struct{}

func (quietLogger) Infof(string, ...any)           {}
func (quietLogger) Errorf(string, ...any)          {}
func (quietLogger) Fatalf(format string, a ...any) { panic(fmt.Sprintf(format, a...)) }

// indexPins are the pins the index tests query with.
var indexPins = []Pin{
	{Types: []string{"car"}},
	{Types: []string{""}},
	{Types: []string{"car", "fridge"}},
	{Labels: map[string][]string{"site": {"berlin"}}},
	{Labels: map[string][]string{"site": {"a"}}},
	{Labels: map[string][]string{"site": {"a\x00b"}}},
	{Labels: map[string][]string{"site": {""}}},
	{Types: []string{"fridge"}, Labels: map[string][]string{"site": {"berlin", "paris"}}},
	{Types: []string{"fridge"}, Labels: map[string][]string{"site": {"berlin"}, "fleet": {"x"}}},
	{None: true},
}

// listIDs returns the ids ListIndexed passes for pin after `after`, and
// checks that each twin meets pin and that they come in strictly rising
// order.
func listIDs(t *testing.T, e *Engine, pin Pin, after string) []string {
	t.Helper()
	var ids []string
	_, err := e.ListIndexed(context.Background(), pin, after, func(tw *Twin) bool {
		if !pin.Matches(tw) {
			t.Errorf("ListIndexed(%v) passed %s (type %q, labels %v), which does not meet it", pin, tw.ID, tw.Type, tw.Labels)
		}
		if len(ids) > 0 && ids[len(ids)-1] >= tw.ID {
			t.Errorf("ListIndexed(%v) passed %s after %s", pin, tw.ID, ids[len(ids)-1])
		}
		ids = append(ids, tw.ID)
		return true
	})
	if err != nil {
		t.Fatalf("ListIndexed(%v): %v", pin, err)
	}
	return ids
}

// scanIDs returns the ids of the twins that meet pin, by a full List.
func scanIDs(t *testing.T, e *Engine, pin Pin, after string) []string {
	t.Helper()
	var ids []string
	if _, err := e.List(context.Background(), after, func(tw *Twin) bool {
		if pin.Matches(tw) {
			ids = append(ids, tw.ID)
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	return ids
}

// compareIndexed checks that ListIndexed finds what a full scan finds, for
// every pin, from the start and from a page token.
func compareIndexed(t *testing.T, e *Engine, rng *rand.Rand, when string) {
	t.Helper()
	for _, pin := range indexPins {
		for _, after := range []string{"", "t-" + strconv.Itoa(rng.IntN(60))} {
			want, got := scanIDs(t, e, pin, after), listIDs(t, e, pin, after)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Fatalf("%s: ListIndexed(%v, after %q) differs from the full scan (-want +got):\n%s", when, pin, after, diff)
			}
		}
	}
}

// randomIndexOp changes the type or labels of a random twin, or creates or
// deletes one.
func randomIndexOp(ctx context.Context, e *Engine, rng *rand.Rand) error {
	id := "t-" + strconv.Itoa(rng.IntN(60))
	types := []string{"car", "fridge", "planter", ""}
	sites := []string{"berlin", "paris", "a", "a\x00b", ""}
	var err error
	switch rng.IntN(5) {
	case 0, 1:
		labels := map[string]string{}
		if rng.IntN(3) > 0 {
			labels["site"] = sites[rng.IntN(len(sites))]
		}
		if rng.IntN(2) == 0 {
			labels["fleet"] = []string{"x", "y"}[rng.IntN(2)]
		}
		_, err = e.Create(ctx, CreateRequest{ID: id, Type: types[rng.IntN(len(types))], Labels: labels})
	case 2:
		typ := types[rng.IntN(len(types))]
		_, err = e.Update(ctx, UpdateRequest{ID: id, Type: &typ})
	case 3:
		u := UpdateRequest{ID: id}
		if rng.IntN(2) == 0 {
			u.Labels = map[string]string{"site": sites[rng.IntN(len(sites))]}
		} else {
			u.RemoveLabels = []string{[]string{"site", "fleet"}[rng.IntN(2)]}
		}
		_, err = e.Update(ctx, u)
	case 4:
		err = e.Delete(ctx, id, 0)
	}
	if errors.Is(err, ErrNotFound) || errors.Is(err, ErrAlreadyExists) {
		return nil
	}
	return err
}

// TestListIndexedMatchesFullScan runs random creations, type and label
// changes and deletions, many in flight at once, and checks that the
// indexed listing finds exactly what a full scan finds: while changes are
// in flight every twin it passes meets the pin, in id order; between rounds,
// and after a restart, its results equal the scan's; and Check finds the
// store's index right.
func TestListIndexedMatchesFullScan(t *testing.T) {
	seed := rand.Uint64()
	if s := os.Getenv("TWIND_INDEX_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (replay with TWIND_INDEX_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	fs := vfs.NewMem()
	opts := Options{Dir: "db", FS: fs, VShards: 16, Workers: 3, Logger: quiet}
	e, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { e.Close() }()
	ctx := context.Background()
	for round := range 8 {
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for g := range 8 {
			r := rand.New(rand.NewPCG(seed, uint64(round*8+g+1)))
			wg.Go(func() {
				for range 25 {
					if err := randomIndexOp(ctx, e, r); err != nil {
						errs <- err
						return
					}
				}
			})
		}
		// Read while the changes are in flight: listIDs checks what it can.
		for _, pin := range indexPins {
			listIDs(t, e, pin, "")
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		compareIndexed(t, e, rng, fmt.Sprintf("round %d", round))
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	vs, err := Check(opts)
	if err != nil || len(vs) > 0 {
		t.Fatalf("Check = %v, %v; want no violations", vs, err)
	}
	if e, err = Open(opts); err != nil {
		t.Fatal(err)
	}
	compareIndexed(t, e, rng, "after a restart")
}

// TestListIndexedEnds checks that a listing stops when fn says so, when its
// context ends and when the engine closes.
func TestListIndexedEnds(t *testing.T) {
	e, err := Open(Options{Dir: "db", FS: vfs.NewMem(), VShards: 8, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range 300 {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprintf("car-%03d", i), Type: "car"}); err != nil {
			t.Fatal(err)
		}
	}
	pin := Pin{Types: []string{"car"}}
	n := 0
	if _, err := e.ListIndexed(ctx, pin, "", func(*Twin) bool { n++; return n < 5 }); err != nil || n != 5 {
		t.Errorf("ListIndexed with fn stopping at 5 = %d twins, %v; want 5, nil", n, err)
	}
	cctx, cancel := context.WithCancel(ctx)
	n = 0
	_, err = e.ListIndexed(cctx, pin, "", func(*Twin) bool {
		if n++; n == 10 {
			cancel()
		}
		return true
	})
	if !errors.Is(err, context.Canceled) || n != 10 {
		t.Errorf("ListIndexed cancelled at the 10th twin = %d twins, %v; want 10, context.Canceled", n, err)
	}
	if _, err := e.ListIndexed(ctx, Pin{}, "", func(*Twin) bool { return true }); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("ListIndexed(no pin) = %v; want ErrInvalidArgument", err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.ListIndexed(ctx, pin, "", func(*Twin) bool { return true }); !errors.Is(err, ErrClosed) {
		t.Errorf("ListIndexed after Close = %v; want ErrClosed", err)
	}
}

// TestListIndexedReadsTheDurableIndex changes a car's type to fridge in a
// step that is applied to the store but not yet durable: the store's index
// then says fridge, but the durable twin is still a car, and ListIndexed
// must list it as one (reading the store itself, it would list no car).
func TestListIndexedReadsTheDurableIndex(t *testing.T) {
	gate := vfstest.NewGate(vfs.NewMem())
	e := openMem(t, gate, Options{VShards: 4, Workers: 1, Logger: quiet})
	defer e.Close()
	ctx := context.Background()
	if _, err := e.Create(ctx, CreateRequest{ID: "c1", Type: "car"}); err != nil {
		t.Fatal(err)
	}
	gate.Hold()
	defer gate.Release() // before Close, should the test fail while held
	fridge := "fridge"
	done := make(chan error, 1)
	go func() {
		_, err := e.Update(ctx, UpdateRequest{ID: "c1", Type: &fridge})
		done <- err
	}()
	gate.AwaitHeld(t)
	// The sync may start before the batch is visible: wait for it to be.
	awaitApplied(t, e, append(typeIndexPrefix(e.VShard("c1"), "fridge"), "c1"...))
	if got := listIDs(t, e, Pin{Types: []string{"car"}}, ""); !slices.Equal(got, []string{"c1"}) {
		t.Errorf("ListIndexed(cars) with c1's change to fridge not durable = %v; want [c1]", got)
	}
	if got := listIDs(t, e, Pin{Types: []string{"fridge"}}, ""); len(got) != 0 {
		t.Errorf("ListIndexed(fridges) with c1's change to fridge not durable = %v; want none", got)
	}
	gate.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := listIDs(t, e, Pin{Types: []string{"fridge"}}, ""); !slices.Equal(got, []string{"c1"}) {
		t.Errorf("ListIndexed(fridges) once c1's change is durable = %v; want [c1]", got)
	}
}

func TestWriteIndexKeepsOnlyWhatChanged(t *testing.T) {
	a := &Twin{ID: "x", Type: "car", Labels: map[string]string{"site": "berlin", "fleet": "f"}}
	b := &Twin{ID: "x", Type: "fridge", Labels: map[string]string{"site": "paris", "fleet": "f", "new": "1"}}
	var rec recordingWriter
	if err := writeIndex(&rec, 3, a, b); err != nil {
		t.Fatal(err)
	}
	want := []string{
		`del s/3/y/"car"/x`, `set s/3/y/"fridge"/x`,
		`del s/3/b/"site"="berlin"/x`,
		`set s/3/b/"new"="1"/x`, `set s/3/b/"site"="paris"/x`,
	}
	slices.Sort(want)
	slices.Sort(rec.ops)
	if diff := cmp.Diff(want, rec.ops); diff != "" {
		t.Errorf("writeIndex(car in berlin -> fridge in paris) (-want +got):\n%s", diff)
	}
	rec.ops = nil
	if err := writeIndex(&rec, 3, b, b.clone()); err != nil || len(rec.ops) != 0 {
		t.Errorf("writeIndex(unchanged type and labels) wrote %v, %v; want nothing", rec.ops, err)
	}
}

type recordingWriter struct{ ops []string }

func (r *recordingWriter) Set(k, _ []byte, _ *pebble.WriteOptions) error {
	r.ops = append(r.ops, "set "+keyString(k))
	return nil
}

func (r *recordingWriter) Delete(k []byte, _ *pebble.WriteOptions) error {
	r.ops = append(r.ops, "del "+keyString(k))
	return nil
}

func (r *recordingWriter) DeleteRange(a, b []byte, _ *pebble.WriteOptions) error {
	r.ops = append(r.ops, "delrange "+keyString(a)+" "+keyString(b))
	return nil
}

// copyFixture copies the store that server/testdata/store-fe533d2 holds,
// written before the index existed, to a temporary directory.
func copyFixture(t *testing.T) string {
	t.Helper()
	src := filepath.Join("..", "server", "testdata", "store-fe533d2", "data")
	dst := t.TempDir()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, en := range entries {
		b, err := os.ReadFile(filepath.Join(src, en.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, en.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// TestBuildIndexOnFixture builds the index of a store written before it
// existed: Check finds it complete and right, and ListIndexed over it finds
// what a full scan finds.
func TestBuildIndexOnFixture(t *testing.T) {
	dir := copyFixture(t)
	opts := Options{Dir: dir, Logger: quiet}
	// Before: no index and none expected.
	if vs, err := Check(opts); err != nil || len(vs) > 0 {
		t.Fatalf("Check(the fixture as it is) = %v, %v; want no violations", vs, err)
	}
	db, err := pebble.Open(dir, &pebble.Options{Logger: quietLogger{}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := db.Get(keyIndex); !errors.Is(err, pebble.ErrNotFound) {
		t.Fatalf("the fixture has %s (%v); it was written before the index", keyIndex, err)
	}
	v, closer, err := db.Get(keyFormat)
	if err != nil {
		t.Fatal(err)
	}
	var f storeFormat
	err = json.Unmarshal(v, &f)
	closer.Close()
	if err != nil {
		t.Fatal(err)
	}
	// A stale entry, as a build cut short might leave: the build replaces it.
	stale := append(typeIndexPrefix(uint16(vshardOf("car-1", f.VShards)), "boat"), "car-1"...)
	if err := db.Set(stale, nil, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := buildIndex(db, f.VShards); err != nil {
		t.Fatalf("buildIndex: %v", err)
	}
	n := 0
	it, _ := db.NewIter(&pebble.IterOptions{LowerBound: prefixShards, UpperBound: prefixEnd(prefixShards)})
	for it.First(); it.Valid(); it.Next() {
		if s := it.Key()[5]; s == sectionTypeIndex || s == sectionLabelIndex {
			n++
		}
	}
	it.Close()
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if n < 6 {
		t.Errorf("buildIndex wrote %d index entries; the fixture has 6 live twins, each with a type entry", n)
	}
	if vs, err := Check(opts); err != nil || len(vs) > 0 {
		t.Fatalf("Check(the fixture with its index built) = %v, %v; want no violations", vs, err)
	}
	e, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for _, pin := range []Pin{
		{Types: []string{"fridge"}}, {Types: []string{"car"}}, {Types: []string{"planter", "car"}},
		{Types: []string{"boat"}}, {Labels: map[string][]string{"site": {"berlin"}}},
	} {
		want, got := scanIDs(t, e, pin, ""), listIDs(t, e, pin, "")
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("ListIndexed(%v) on the fixture (-scan +indexed):\n%s", pin, diff)
		}
	}
	if got := listIDs(t, e, Pin{Types: []string{"fridge"}}, ""); len(got) != 3 {
		t.Errorf("ListIndexed(fridges) on the fixture = %v; want its three fridges", got)
	}
}

// TestOpenBuildsMissingIndex opens a store written before the index
// existed: Open builds it.
func TestOpenBuildsMissingIndex(t *testing.T) {
	dir := copyFixture(t)
	opts := Options{Dir: dir, Logger: quiet}
	e, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	got := listIDs(t, e, Pin{Types: []string{"fridge"}}, "")
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if want := []string{"fridge-0", "fridge-1", "fridge-2"}; !slices.Equal(got, want) {
		t.Errorf("ListIndexed(fridges) on the fixture opened = %v; want %v", got, want)
	}
	if vs, err := Check(opts); err != nil || len(vs) > 0 {
		t.Fatalf("Check after Open = %v, %v; want no violations", vs, err)
	}
}
