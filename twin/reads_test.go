package twin

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// listPage returns up to limit twins after `after` for which match (if not
// nil) holds, and whether more follow.
func listPage(t testing.TB, e *Engine, after string, limit int, match func(*Twin) bool) (twins []*Twin, more bool) {
	t.Helper()
	_, err := e.List(context.Background(), after, func(tw *Twin) bool {
		if match != nil && !match(tw) {
			return true
		}
		if len(twins) == limit {
			more = true
			return false
		}
		twins = append(twins, tw)
		return true
	})
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	return twins, more
}

// createN creates twins t0000... with n events in the log.
func createN(t testing.TB, e *Engine, n int, reported Document) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				if _, err := e.Create(context.Background(), CreateRequest{ID: fmt.Sprintf("t%04d", i), Reported: reported}); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// waitClosed waits for ch to close, failing the test after 10s.
func waitClosed(t *testing.T, what string, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not happen within 10s", what)
	}
}

func TestListStops(t *testing.T) {
	e := openMem(t, vfs.NewMem(), Options{})
	createN(t, e, 600, nil)

	ctx, cancel := context.WithCancel(context.Background())
	visited := 0
	_, err := e.List(ctx, "", func(*Twin) bool {
		visited++
		if visited == 10 {
			cancel()
		}
		return true
	})
	if !errors.Is(err, context.Canceled) || visited != 10 {
		t.Errorf("List cancelled at the 10th twin = %v after %d twins; want context.Canceled after 10", err, visited)
	}

	visited = 0
	if _, err := e.List(context.Background(), "t0299", func(tw *Twin) bool { visited++; return visited < 5 }); err != nil || visited != 5 {
		t.Errorf("List stopped by fn = %v after %d twins; want nil after 5", err, visited)
	}

	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.List(context.Background(), "", func(*Twin) bool { return true }); !errors.Is(err, ErrClosed) {
		t.Errorf("List after Close = %v; want ErrClosed", err)
	}
}

// TestWatchReplayOrder replays a log longer than a batch, in events and in
// bytes, and checks that every revision arrives once, in order.
func TestWatchReplayOrder(t *testing.T) {
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	createN(t, e, 3*watchBatchEvents+7, nil)
	big := Document{"blob": strings.Repeat("x", 40<<10)}
	for i := range 60 { // 60 events of 40 KB: more than one batch of bytes
		if _, err := e.Report(context.Background(), PatchRequest{ID: "t0001", Patch: Document{"blob": big["blob"], "n": float64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	last := e.Revision()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	want := int64(2)
	err := e.Watch(ctx, want, func(ev *Event) error {
		if ev.Revision != want {
			return fmt.Errorf("event at revision %d; want %d", ev.Revision, want)
		}
		if want == last {
			cancel()
		}
		want++
		return nil
	})
	if !errors.Is(err, context.Canceled) || want != last+1 {
		t.Errorf("Watch from 2 = %v, up to revision %d; want context.Canceled after revision %d", err, want-1, last)
	}
}

// TestWatchReplayStops checks that a replay whose events fn skips notices
// its caller leaving and the engine closing at once, not at its end.
func TestWatchReplayStops(t *testing.T) {
	const n = 1000
	e := openMem(t, vfs.NewMem(), Options{})
	createN(t, e, n, nil)

	ctx, cancel := context.WithCancel(context.Background())
	seen := 0
	err := e.Watch(ctx, 1, func(*Event) error {
		seen++
		cancel() // the client leaves while the replay skips the events
		return nil
	})
	if !errors.Is(err, context.Canceled) || seen != 1 {
		t.Errorf("Watch cancelled during a replay = %v after %d events; want context.Canceled after 1", err, seen)
	}

	// Close while fn holds the first event: Close returns although fn
	// has not, and the watch ends at the next event.
	tick := make(chan struct{})
	first := make(chan struct{})
	watchDone := make(chan error, 1)
	seen = 0
	go func() {
		watchDone <- e.Watch(context.Background(), 1, func(*Event) error {
			seen++
			if seen == 1 {
				close(first)
			}
			<-tick
			return nil
		})
	}()
	waitClosed(t, "the first event", first)
	closed := make(chan struct{})
	go func() {
		if err := e.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		close(closed)
	}()
	waitClosed(t, "the engine's close signal", e.done)
	// Keep the watcher going until it ends; it must not replay the rest.
	for {
		select {
		case tick <- struct{}{}:
			continue
		case err = <-watchDone:
		case <-time.After(10 * time.Second):
			t.Fatal("Watch did not end within 10s of Close")
		}
		break
	}
	if !errors.Is(err, ErrClosed) || seen != 1 {
		t.Errorf("Watch during Close = %v after %d of %d events; want ErrClosed after 1", err, seen, n)
	}
	waitClosed(t, "Close", closed)
}

// TestWatchStuckDoesNotPinClose checks that a watcher blocked in fn holds no
// iterator and does not hold up Close.
func TestWatchStuckDoesNotPinClose(t *testing.T) {
	e := openMem(t, vfs.NewMem(), Options{})
	createN(t, e, 10, nil)
	release := make(chan struct{})
	blocked := make(chan struct{})
	watchDone := make(chan error, 1)
	var once sync.Once
	go func() {
		watchDone <- e.Watch(context.Background(), 1, func(*Event) error {
			once.Do(func() { close(blocked) })
			<-release
			return nil
		})
	}()
	waitClosed(t, "the first event", blocked)
	closed := make(chan struct{})
	go func() {
		if err := e.Close(); err != nil {
			t.Errorf("Close with a watcher blocked in fn: %v", err)
		}
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		close(release)
		<-watchDone
		t.Fatal("Close waited for a watcher blocked in fn")
	}
	close(release)
	if err := <-watchDone; !errors.Is(err, ErrClosed) {
		t.Errorf("Watch after Close = %v; want ErrClosed", err)
	}
}

// BenchmarkWatchReplay replays 10,000 logged events through Watch.
func BenchmarkWatchReplay(b *testing.B) {
	const n = 10_000
	e := openMem(b, vfs.NewMem(), Options{})
	defer e.Close()
	createN(b, e, n, Document{"temp_c": 4.5, "door": "closed"})
	last := e.Revision()
	b.ResetTimer()
	for range b.N {
		ctx, cancel := context.WithCancel(context.Background())
		e.Watch(ctx, 1, func(ev *Event) error {
			if ev.Revision == last {
				cancel()
			}
			return nil
		})
		cancel()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/event")
}

// BenchmarkWatchLive measures a watcher that keeps up: it reads the newest
// events, which it shares, decoded, with every other such watcher.
func BenchmarkWatchLive(b *testing.B) {
	const n = 4000 // within the recent events kept in memory
	e := openMem(b, vfs.NewMem(), Options{})
	defer e.Close()
	createN(b, e, n, Document{"temp_c": 4.5, "door": "closed"})
	last := e.Revision()
	from := last - n + 1
	b.ResetTimer()
	for range b.N {
		ctx, cancel := context.WithCancel(context.Background())
		e.Watch(ctx, from, func(ev *Event) error {
			if ev.Revision == last {
				cancel()
			}
			return nil
		})
		cancel()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/event")
}
