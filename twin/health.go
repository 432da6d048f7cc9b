package twin

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/cockroachdb/pebble/v2"
)

// Health is the health of the engine's store.
type Health struct {
	// Fatal is the error that stopped the engine: a failed write or sync of
	// the WAL or the MANIFEST, which cannot be retried safely. The engine
	// refuses every change from then on; only a restart recovers, from
	// what was durable.
	Fatal error
	// Background is the last error of the store's background work (a flush
	// or compaction that failed, for example on a full disk), while it
	// lasts: it clears when a later flush or compaction succeeds. Writes
	// may stall meanwhile, but none is lost.
	Background error
	// BackgroundErrors counts the background errors since Open.
	BackgroundErrors int64
}

// Err returns the error that makes the store unhealthy, or nil.
func (h Health) Err() error {
	if h.Fatal != nil {
		return h.Fatal
	}
	return h.Background
}

// Health returns the health of the engine's store. It is safe for
// concurrent use.
func (e *Engine) Health() Health {
	h := e.health.snapshot()
	if p := e.failed.Load(); p != nil && h.Fatal == nil {
		h.Fatal = *p
	}
	return h
}

// HealthChanged returns a channel that is closed when the store's health
// next changes; call Health for the new state.
func (e *Engine) HealthChanged() <-chan struct{} { return e.health.changed() }

// storeHealth tracks the store's health from Pebble's events and the
// engine's commit errors.
type storeHealth struct {
	logger *slog.Logger

	// mu protects the fields below.
	mu         sync.Mutex
	fatal      error
	background error
	count      int64
	change     chan struct{} // closed and replaced on every change
}

func newStoreHealth(logger *slog.Logger) *storeHealth {
	return &storeHealth{logger: logger, change: make(chan struct{})}
}

func (h *storeHealth) snapshot() Health {
	h.mu.Lock()
	defer h.mu.Unlock()
	return Health{Fatal: h.fatal, Background: h.background, BackgroundErrors: h.count}
}

func (h *storeHealth) changed() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.change
}

// notify wakes the waiters of a change. h.mu is held.
func (h *storeHealth) notify() {
	close(h.change)
	h.change = make(chan struct{})
}

// setFatal records the error that stopped the store, once.
func (h *storeHealth) setFatal(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fatal == nil {
		h.fatal = fmt.Errorf("twin: the store failed: %w", err)
		h.notify()
	}
}

// backgroundError records a failed background job.
func (h *storeHealth) backgroundError(err error) {
	if errors.Is(err, pebble.ErrCancelledCompaction) {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.count++
	if h.background == nil {
		h.logger.Error("the store's background work failed; writes may stall until it succeeds again", "err", err.Error())
		h.background = err
		h.notify()
	}
}

// succeeded records a background job that wrote to the store: the store
// can write again.
func (h *storeHealth) succeeded() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.background != nil {
		h.logger.Info("the store's background work succeeds again", "after", h.background.Error())
		h.background = nil
		h.notify()
	}
}

// listener returns the Pebble event listener that keeps h up to date. Its
// functions neither block on I/O nor call into the store.
func (h *storeHealth) listener() *pebble.EventListener {
	return &pebble.EventListener{
		BackgroundError: h.backgroundError,
		FlushEnd: func(i pebble.FlushInfo) {
			if i.Err == nil {
				h.succeeded()
			}
		},
		CompactionEnd: func(i pebble.CompactionInfo) {
			if i.Err == nil {
				h.succeeded()
			}
		},
	}
}

// healthLogger is the Pebble logger that marks the store failed before
// Pebble gives up on a fatal error (a failed WAL or MANIFEST write), so that
// health reports it; Fatalf then panics, as Pebble requires.
type healthLogger struct {
	pebbleLogger
	h *storeHealth
}

func (l healthLogger) Fatalf(format string, args ...any) {
	err := fmt.Errorf(format, args...)
	l.h.setFatal(err)
	l.l.Error("the store failed and cannot go on; stopping the process: a restart recovers from what is durable", "err", err.Error())
	l.pebbleLogger.Fatalf(format, args...)
}
