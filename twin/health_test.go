package twin

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
	"github.com/twind-io/twind/twin/vfstest"
)

// waitHealth waits until the engine's health satisfies ok.
func waitHealth(t *testing.T, e *Engine, what string, ok func(Health) bool) Health {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		ch := e.HealthChanged()
		if h := e.Health(); ok(h) {
			return h
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("health is %+v after 30s; want %s", e.Health(), what)
		}
	}
}

// TestHealthBackgroundError makes every flush and compaction fail, as on a
// full disk: health reports the error while it lasts and recovers by itself
// when writing works again, and no acknowledged write is lost.
func TestHealthBackgroundError(t *testing.T) {
	ctx := context.Background()
	var on atomic.Bool
	mem := vfs.NewMem()
	e := openMem(t, vfstest.FailWrites(mem, ".sst", &on), Options{MemTableBytes: 64 << 10})
	if err := e.Health().Err(); err != nil {
		t.Fatalf("Health().Err() of a new store = %v; want nil", err)
	}
	if _, err := e.Create(ctx, CreateRequest{ID: "fridge-1", Type: "fridge"}); err != nil {
		t.Fatal(err)
	}
	on.Store(true)
	// Writes fill memtables until a flush fails; the writer then stalls
	// until flushes work again.
	stop := make(chan struct{})
	acked := make(chan int64, 1)
	go func() {
		defer close(acked)
		blob := strings.Repeat("x", 1<<10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			tw, err := e.Report(ctx, PatchRequest{ID: "fridge-1", Patch: Document{"i": float64(i), "blob": blob}})
			if err != nil {
				t.Errorf("Report %d: %v", i, err)
				return
			}
			select {
			case <-acked:
			default:
			}
			acked <- tw.Version
		}
	}()
	h := waitHealth(t, e, "a background error", func(h Health) bool { return h.Background != nil })
	if !errors.Is(h.Background, errorfs.ErrInjected) || h.Fatal != nil || h.BackgroundErrors == 0 {
		t.Errorf("Health() while flushes fail = %+v; want the injected background error, not fatal", h)
	}
	on.Store(false)
	waitHealth(t, e, "healthy again", func(h Health) bool { return h.Err() == nil })
	close(stop)
	var last int64
	for v := range acked {
		last = v
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openMem(t, mem, Options{})
	defer e.Close()
	if tw, err := e.Get("fridge-1"); err != nil || tw.Version < last {
		t.Errorf("after reopening, fridge-1 = %v, %v; version %d was acknowledged", tw, err, last)
	}
}

// TestHealthFatalWALError makes a WAL write fail: the engine reports a fatal
// error, refuses further changes, and a restart recovers everything that
// was acknowledged.
func TestHealthFatalWALError(t *testing.T) {
	ctx := context.Background()
	var on atomic.Bool
	mem := vfs.NewMem()
	e := openMem(t, vfstest.FailOneWrite(mem, ".log", &on), Options{})
	for i := range 10 {
		if _, err := e.Create(ctx, CreateRequest{ID: fmt.Sprint("car-", i), Type: "car"}); err != nil {
			t.Fatal(err)
		}
	}
	on.Store(true)
	if _, err := e.Report(ctx, PatchRequest{ID: "car-1", Patch: Document{"speed_kmh": 50.0}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Report with a failing WAL = %v; want ErrClosed", err)
	}
	h := waitHealth(t, e, "fatal", func(h Health) bool { return h.Fatal != nil })
	if !errors.Is(h.Fatal, errorfs.ErrInjected) {
		t.Errorf("Health().Fatal = %v; want the injected error", h.Fatal)
	}
	on.Store(false) // the disk is fine again: the engine still refuses
	if _, err := e.Report(ctx, PatchRequest{ID: "car-2", Patch: Document{"speed_kmh": 50.0}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Report after a fatal store error = %v; want ErrClosed", err)
	}
	e.Close() // may report the store's error

	e = openMem(t, mem, Options{})
	defer e.Close()
	if err := e.Health().Err(); err != nil {
		t.Errorf("Health().Err() after a restart = %v; want nil", err)
	}
	for i := range 10 {
		if _, err := e.Get(fmt.Sprint("car-", i)); err != nil {
			t.Errorf("after the restart: %v", err)
		}
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "car-1", Patch: Document{"speed_kmh": 60.0}}); err != nil {
		t.Errorf("Report after the restart = %v; want success", err)
	}
}
