package server

import (
	"context"
	"fmt"
	"sync"
	"testing"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// TestWatchersShareFilters: watchers with the same filter each get exactly
// the events that meet it, while the filter is evaluated about once per
// event for all of them; a watcher that starts far behind, past what the
// memo holds, gets the same answers.
func TestWatchersShareFilters(t *testing.T) {
	s := startServer(t, nil, nil)
	p := startProbe(t, s, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := s.engine.Create(ctx, twin.CreateRequest{ID: "fridge-1", Type: "fridge"}); err != nil {
		t.Fatal(err)
	}
	start := s.engine.Revision() + 1
	filters := []string{`twin.reported.temp_c > 5.0`, `twin.reported.temp_c < 3.0`}
	const watchers, events = 10, filterMemoSlots + 200
	// Each watcher's revisions, as received.
	var mu sync.Mutex
	got := make([][]int64, watchers)
	var wg sync.WaitGroup
	for i := range watchers {
		st, err := p.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{Filter: filters[i%2], StartRevision: start})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				r, err := st.Recv()
				if err != nil {
					return
				}
				mu.Lock()
				got[i] = append(got[i], r.GetEvent().GetRevision())
				mu.Unlock()
			}
		}()
	}
	want := make([][]int64, 2) // by filter
	for i := range events {
		temp := float64(i % 10)
		tw, err := s.engine.Report(ctx, twin.PatchRequest{ID: "fridge-1", Patch: twin.Document{"temp_c": temp}})
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case temp > 5:
			want[0] = append(want[0], tw.Revision)
		case temp < 3:
			want[1] = append(want[1], tw.Revision)
		}
	}
	evals := p.svc.filterEvals.Load()
	// A late watcher starts at the first report, which the memo's slots
	// have long since moved past.
	late, err := p.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{Filter: filters[0], StartRevision: start})
	if err != nil {
		t.Fatal(err)
	}
	var lateGot []int64
	for len(lateGot) < len(want[0]) {
		r, err := late.Recv()
		if err != nil {
			t.Fatal(err)
		}
		lateGot = append(lateGot, r.GetEvent().GetRevision())
	}
	if fmt.Sprint(lateGot) != fmt.Sprint(want[0]) {
		t.Errorf("the late watcher got revisions %v, want %v", lateGot, want[0])
	}
	waitFor(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		for i := range watchers {
			if len(got[i]) < len(want[i%2]) {
				return false
			}
		}
		return true
	})
	cancel()
	wg.Wait()
	for i := range watchers {
		if fmt.Sprint(got[i]) != fmt.Sprint(want[i%2]) {
			t.Errorf("watcher %d (%s) got %d events, want %d: %v", i, filters[i%2], len(got[i]), len(want[i%2]), got[i])
		}
	}
	// Two filters over every event, and a little more where two watchers
	// of a filter raced to the same event's slot (they wait for one
	// another, so none should): far fewer than each watcher on its own.
	if max := int64(2*events) + events/10; evals > max {
		t.Errorf("%d filter evaluations for %d watchers of 2 filters over %d events; want at most %d", evals, watchers, events, max)
	}
}
