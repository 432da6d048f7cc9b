package twin

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestReview3HistoryWhileIdleToggles: History readers while the worker
// goes busy and idle over and over: every History sees at least what was
// acknowledged before it began, and once all is quiet no snapshot is open
// and Close succeeds.
func TestReview3HistoryWhileIdleToggles(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{Workers: 2})
	ids := []string{"a", "b", "c", "d"}
	for _, id := range ids {
		if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "t"}); err != nil {
			t.Fatal(err)
		}
	}
	var acked [4]atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				tw, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{"n": float64(n)}})
				if err != nil {
					t.Error(err)
					return
				}
				acked[i].Store(tw.Version)
				if n%3 == 0 {
					time.Sleep(time.Millisecond) // let the worker go idle
				}
			}
		}()
	}
	for r := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				i := r % len(ids)
				want := acked[i].Load()
				evs, err := e.History(ids[i], 0, 1)
				if err != nil {
					t.Error(err)
					return
				}
				if want > 0 && (len(evs) == 0 || evs[0].Twin.Version < want) {
					t.Errorf("History(%s) newest = %v; want at least version %d, acknowledged before", ids[i], evs, want)
					return
				}
			}
		}()
	}
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	if n := e.db.Metrics().Snapshots.Count; n != 0 {
		t.Errorf("%d snapshots open with nothing in flight", n)
	}
	if err := e.Close(); err != nil {
		t.Errorf("Close = %v", err)
	}
	_ = fmt.Sprint
}
