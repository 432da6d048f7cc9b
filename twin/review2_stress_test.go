package twin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestWatchRingStress: several workers commit out of revision order while
// watchers, live and replaying, read through the ring of recent events and
// the log, and History readers take snapshots. Every watcher sees every
// revision once, in order, each equal to the log's; Close leaks no
// snapshot.
func TestWatchRingStress(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := openMem(t, vfs.NewMem(), Options{Workers: 4, LogRetention: 1 << 20})
	const writers, perWriter = 8, 700
	var wwg sync.WaitGroup
	type seen struct {
		mu   sync.Mutex
		revs []int64
		evs  map[int64]*Event
	}
	watchers := make([]*seen, 6)
	for i := range watchers {
		watchers[i] = &seen{evs: map[int64]*Event{}}
		from := int64(1)
		if i%2 == 1 {
			from = 0
		}
		wwg.Add(1)
		go func(s *seen, slow bool) {
			defer wwg.Done()
			e.Watch(ctx, from, func(ev *Event) error {
				s.mu.Lock()
				s.revs = append(s.revs, ev.Revision)
				s.evs[ev.Revision] = ev
				n := len(s.revs)
				s.mu.Unlock()
				if slow && n%500 == 0 {
					time.Sleep(20 * time.Millisecond) // fall out of the ring, then catch up
				}
				return nil
			})
		}(watchers[i], i%3 == 0)
	}
	var hwg sync.WaitGroup
	stopHist := make(chan struct{})
	for h := range 2 {
		hwg.Add(1)
		go func() {
			defer hwg.Done()
			for i := 0; ; i++ {
				select {
				case <-stopHist:
					return
				default:
				}
				if _, err := e.History(fmt.Sprint("t", (i+h)%20), 0, 10); err != nil && !errors.Is(err, ErrNotFound) {
					t.Errorf("History: %v", err)
					return
				}
			}
		}()
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perWriter {
				id := fmt.Sprint("t", (w*7+i)%20)
				switch i % 9 {
				case 0:
					e.Create(ctx, CreateRequest{ID: id, Type: "fridge"})
				case 8:
					e.Delete(ctx, id, 0)
				default:
					e.Report(ctx, PatchRequest{ID: id, Patch: Document{"n": float64(i), "w": float64(w)}})
				}
			}
		}()
	}
	wg.Wait()
	close(stopHist)
	hwg.Wait()
	last := e.Revision()
	// Let the watchers catch up (the slow ones sleep 20ms per 500 events),
	// then stop them.
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		caughtUp := true
		for _, s := range watchers {
			s.mu.Lock()
			if len(s.revs) == 0 || s.revs[len(s.revs)-1] < last {
				caughtUp = false
			}
			s.mu.Unlock()
		}
		if caughtUp {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	wwg.Wait()
	stored, _, err := e.readLog(newLogReader(e.db), nil, 1, last)
	if err != nil {
		t.Fatal(err)
	}
	for len(stored) < int(last) {
		more, _, err := e.readLog(newLogReader(e.db), nil, int64(len(stored))+1, last)
		if err != nil {
			t.Fatal(err)
		}
		stored = append(stored, more...)
	}
	for wi, s := range watchers {
		if len(s.revs) == 0 {
			t.Errorf("watcher %d saw nothing", wi)
			continue
		}
		first := s.revs[0]
		for i, r := range s.revs {
			if r != first+int64(i) {
				t.Errorf("watcher %d: event %d has revision %d; want %d", wi, i, r, first+int64(i))
				break
			}
		}
		if got := s.revs[len(s.revs)-1]; got < last {
			t.Errorf("watcher %d stopped at revision %d of %d", wi, got, last)
		}
		for _, want := range stored {
			got, ok := s.evs[want.Revision]
			if !ok {
				continue
			}
			wb, _ := json.Marshal(want)
			gb, _ := json.Marshal(got)
			var wv, gv any
			json.Unmarshal(wb, &wv)
			json.Unmarshal(gb, &gv)
			if !reflect.DeepEqual(wv, gv) {
				t.Errorf("watcher %d, revision %d:\n%s\nlog:\n%s", wi, want.Revision, gb, wb)
				break
			}
		}
	}
	if err := e.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}
