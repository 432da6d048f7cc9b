package server

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// listAll pages through ListTwins with filter and returns the ids listed,
// and how many pages it took.
func listAll(t testing.TB, c twinv1.TwinServiceClient, filter string, pageSize int32) ([]string, int) {
	t.Helper()
	var ids []string
	token, pages := "", 0
	for {
		resp, err := c.ListTwins(context.Background(), &twinv1.ListTwinsRequest{Filter: filter, PageSize: pageSize, PageToken: token})
		if err != nil {
			t.Fatalf("ListTwins(%s): %v", filter, err)
		}
		pages++
		for _, tw := range resp.GetTwins() {
			ids = append(ids, tw.GetId())
		}
		if token = resp.GetNextPageToken(); token == "" {
			return ids, pages
		}
		if pages > 100000 {
			t.Fatalf("ListTwins(%s) keeps paging", filter)
		}
	}
}

// startDrainedProbe is startProbe for tests that make many calls and do
// not wait on each handler's return.
func startDrainedProbe(t *testing.T, s *testServer) *probe {
	p := startProbe(t, s, 0)
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-p.returned:
			case <-done:
				return
			}
		}
	}()
	t.Cleanup(func() { close(done); <-stopped })
	return p
}

// unpinned returns a filter equivalent to f that pins nothing, so that the
// server scans the whole fleet for it.
func unpinned(f string) string { return "(" + f + ") == true" }

// indexFilters are filters that pin a type or a label, alone or in a
// conjunction.
var indexFilters = []string{
	`twin.type == "car"`,
	`"fridge" == twin.type`,
	`twin.type in ["car", "planter"]`,
	`twin.labels.site == "berlin"`,
	`twin.labels["site"] == "paris"`,
	`twin.type == "fridge" && twin.labels.site == "berlin"`,
	`twin.type == "car" && twin.reported.fuel < 0.5`,
	`twin.labels.site in ["berlin", "paris"] && twin.labels.fleet == "x" && twin.reported.fuel > 0.2`,
	`twin.type == "car" && twin.type == "fridge"`,
}

// TestListTwinsIndexedEqualsScan runs random creations, type and label
// changes, reports and deletions through the API and checks, after each
// round, that every filter that pins a type or a label lists, page by
// page, exactly what the same filter unpinned lists by scanning the fleet,
// and what a model of the fleet says; and that the pinned filter is
// evaluated only on the twins whose type or label can match.
func TestListTwinsIndexedEqualsScan(t *testing.T) {
	seed := rand.Uint64()
	if s := os.Getenv("TWIND_INDEX_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (replay with TWIND_INDEX_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	s := startServer(t, nil, func(o *Options) { o.Engine.VShards = 16 })
	p := startDrainedProbe(t, s)
	ctx := context.Background()
	type modelTwin struct {
		typ    string
		labels map[string]string
		fuel   float64
	}
	model := map[string]*modelTwin{}
	types := []string{"car", "fridge", "planter", ""}
	sites := []string{"berlin", "paris", "rome"}
	randomLabels := func() map[string]string {
		l := map[string]string{}
		if rng.IntN(4) > 0 {
			l["site"] = sites[rng.IntN(len(sites))]
		}
		if rng.IntN(2) == 0 {
			l["fleet"] = []string{"x", "y"}[rng.IntN(2)]
		}
		return l
	}
	for round := range 5 {
		for range 120 {
			id := "t-" + strconv.Itoa(rng.IntN(80))
			m := model[id]
			var err error
			switch op := rng.IntN(6); {
			case m == nil:
				m = &modelTwin{typ: types[rng.IntN(len(types))], labels: randomLabels(), fuel: float64(rng.IntN(10)) / 10}
				_, err = s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{
					Id: id, Type: m.typ, Labels: m.labels, Reported: mustStruct(t, map[string]any{"fuel": m.fuel})}})
				model[id] = m
			case op == 0:
				_, err = s.twins.DeleteTwin(ctx, &twinv1.DeleteTwinRequest{Id: id})
				delete(model, id)
			case op == 1:
				m.typ = types[rng.IntN(len(types))]
				_, err = s.twins.UpdateTwin(ctx, &twinv1.UpdateTwinRequest{Id: id, Type: m.typ, UpdateType: true})
			case op == 2:
				site := sites[rng.IntN(len(sites))]
				m.labels["site"] = site
				_, err = s.twins.UpdateTwin(ctx, &twinv1.UpdateTwinRequest{Id: id, Labels: map[string]string{"site": site}})
			case op == 3:
				delete(m.labels, "site")
				_, err = s.twins.UpdateTwin(ctx, &twinv1.UpdateTwinRequest{Id: id, RemoveLabels: []string{"site"}})
			default:
				fuel := float64(rng.IntN(10)) / 10
				m.fuel = fuel
				_, err = s.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: id, Patch: mustStruct(t, map[string]any{"fuel": fuel})})
			}
			if err != nil {
				t.Fatalf("round %d, twin %s: %v", round, id, err)
			}
		}
		for _, f := range indexFilters {
			size := int32(1 + rng.IntN(7))
			got, _ := listAll(t, p.twins, f, size)
			scanned, _ := listAll(t, p.twins, unpinned(f), size)
			if diff := cmp.Diff(scanned, got); diff != "" {
				t.Fatalf("round %d: ListTwins(%s) (indexed) differs from the scan of %s (-scan +indexed):\n%s", round, f, unpinned(f), diff)
			}
			// The model: which twins match, and how many the index
			// offers the filter (those of the pinned type or label).
			var want []string
			candidates := 0
			for id, m := range model {
				tw := &twin.Twin{ID: id, Type: m.typ, Labels: m.labels,
					Reported: twin.Document{"fuel": m.fuel}, Desired: twin.Document{}}
				filt, err := compileFilter(f)
				if err != nil {
					t.Fatal(err)
				}
				if filt.pin.Matches(tw) {
					candidates++
				}
				if ok, err := (&twinService{}).match(ctx, filt, tw, time.Now()); err != nil {
					t.Fatal(err)
				} else if ok {
					want = append(want, id)
				}
			}
			slices.Sort(want)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Fatalf("round %d: ListTwins(%s) differs from the model (-model +got):\n%s", round, f, diff)
			}
			evals, visits := p.svc.filterEvals.Load(), p.svc.listVisits.Load()
			listAll(t, p.twins, f, 1000)
			evals, visits = p.svc.filterEvals.Load()-evals, p.svc.listVisits.Load()-visits
			if evals != int64(candidates) || visits != int64(candidates) {
				t.Errorf("round %d: ListTwins(%s) looked at %d twins and evaluated its filter %d times; want each once for each of the %d twins of its type or label",
					round, f, visits, evals, candidates)
			}
		}
	}
}

// TestListTwinsCostBudget checks that a page that has spent its CEL budget
// ends early with a next_page_token, even with nothing matched, and that
// paging on lists each match once.
func TestListTwinsCostBudget(t *testing.T) {
	// About four twins' evaluations per page.
	s := startServer(t, nil, func(o *Options) { o.ListCostBudget = 4 * (twinEvalCost + 5) })
	const n = 40
	createFleet(t, s, "fridge", n, map[string]any{"temp_c": 3.0})
	for _, id := range []string{"fridge-0007", "fridge-0031"} {
		if _, err := s.Engine().Report(context.Background(), twin.PatchRequest{ID: id, Patch: twin.Document{"temp_c": 9.0}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{`twin.reported.temp_c > 8.0`, `twin.type == "fridge" && twin.reported.temp_c > 8.0`} {
		resp, err := s.twins.ListTwins(context.Background(), &twinv1.ListTwinsRequest{Filter: f})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.GetTwins()) != 0 || resp.GetNextPageToken() == "" {
			t.Errorf("ListTwins(%s) first page = %d twins, token %q; want none (the budget ends it before fridge-0007) and a token",
				f, len(resp.GetTwins()), resp.GetNextPageToken())
		}
		got, pages := listAll(t, s.twins, f, 0)
		if want := []string{"fridge-0007", "fridge-0031"}; !slices.Equal(got, want) || pages < n/5 {
			t.Errorf("ListTwins(%s) paged = %v in %d pages; want %v in at least %d pages", f, got, pages, want, n/5)
		}
	}
	// A filter without CEL spends nothing: one page.
	if got, pages := listAll(t, s.twins, "", 0); len(got) != n || pages != 1 {
		t.Errorf("ListTwins(no filter) = %d twins in %d pages; want %d in 1", len(got), pages, n)
	}
}

// TestWatchTwinsPrefiltersPins checks that a watch whose filter pins a type
// sees only that type's events, and evaluates its filter only on them.
func TestWatchTwinsPrefiltersPins(t *testing.T) {
	s := startServer(t, nil, nil)
	p := startProbe(t, s, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := p.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{Filter: `twin.type == "car" && twin.labels.site == "berlin"`, StartRevision: 1})
	if err != nil {
		t.Fatal(err)
	}
	for i, tw := range []struct{ id, typ, site string }{
		{"f1", "fridge", "berlin"}, {"c1", "car", "paris"}, {"c2", "car", "berlin"}, {"f2", "fridge", "paris"}, {"c3", "car", "berlin"},
	} {
		if _, err := s.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{
			Id: tw.id, Type: tw.typ, Labels: map[string]string{"site": tw.site}}}); err != nil {
			t.Fatalf("create %d: %v", i, err)
		}
	}
	var got []string
	for len(got) < 2 {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, resp.GetEvent().GetTwin().GetId())
	}
	if want := []string{"c2", "c3"}; !slices.Equal(got, want) {
		t.Errorf("watched %v; want %v", got, want)
	}
	if evals := p.svc.filterEvals.Load(); evals != 2 {
		t.Errorf("the watch evaluated its filter %d times; want 2, only for the cars in berlin", evals)
	}
	cancel()
	if _, err := stream.Recv(); status.Code(err) != codes.Canceled {
		t.Errorf("Recv after cancel = %v; want Canceled", err)
	}
}

// BenchmarkListTwinsIndexed lists the cars of a fleet in which 1 % of the
// twins are cars: through the engine's index alone, and page by page through
// ListTwins with a filter that pins the type (the index) and with the same
// filter unpinned (a scan of the fleet). TWIND_BENCH_FLEET sets
// the fleet's size (default 200,000).
func BenchmarkListTwinsIndexed(b *testing.B) {
	n := 200_000
	if v := os.Getenv("TWIND_BENCH_FLEET"); v != "" {
		n, _ = strconv.Atoi(v)
	}
	s := startServer(b, nil, func(o *Options) {
		o.DataDir = b.TempDir()
		o.Engine.FS = nil // a real directory
	})
	ctx := context.Background()
	const writers = 64
	errs := make(chan error, writers)
	for w := range writers {
		go func() {
			for i := w; i < n; i += writers {
				typ := "fridge"
				if i%100 == 0 {
					typ = "car"
				}
				_, err := s.Engine().Create(ctx, twin.CreateRequest{ID: fmt.Sprintf("%s-%07d", typ, i), Type: typ,
					Labels: map[string]string{"site": "berlin"}, Reported: twin.Document{"temp_c": 2.3, "door": "closed"}})
				if err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range writers {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
	b.Run("engine", func(b *testing.B) {
		pin := twin.Pin{Types: []string{"car"}}
		for b.Loop() {
			cars := 0
			if _, err := s.Engine().ListIndexed(ctx, pin, "", func(*twin.Twin) bool { cars++; return true }); err != nil {
				b.Fatal(err)
			}
			if cars != n/100 {
				b.Fatalf("listed %d cars; want %d", cars, n/100)
			}
		}
	})
	for _, bb := range []struct{ name, filter string }{
		{"indexed", `twin.type == "car"`},
		{"scan", unpinned(`twin.type == "car"`)},
	} {
		b.Run(bb.name, func(b *testing.B) {
			for b.Loop() {
				ids, _ := listAll(b, s.twins, bb.filter, 1000)
				if len(ids) != n/100 {
					b.Fatalf("listed %d cars; want %d", len(ids), n/100)
				}
			}
		})
	}
}
