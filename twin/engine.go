package twin

import (
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2"
)

// Engine keeps every twin in Pebble, partitioned into virtual shards served
// by worker goroutines, each with a bounded cache of the twins it used
// lately (cache.go).
//
// Every mutation of a twin is applied by the one worker that owns the twin,
// so a twin's changes are totally ordered and need no lock. Each worker
// step writes the changes of all the requests it took into one Pebble batch
// and applies it with a synced WAL without waiting (Pebble's commit
// pipeline groups the syncs of concurrent workers); the worker's syncer
// waits for the sync, then publishes the step and answers its requests, in
// order, while the worker goes on with its next step. A request is answered,
// and readers and watchers see its change, only once it is durable.
//
// An Engine is safe for concurrent use.
type Engine struct {
	opts    Options
	db      *pebble.DB
	vshards int
	workers []*worker
	apply   applier

	// closeMu guards closed and the sends on worker inboxes, so that Close
	// can close the inboxes with no sender left.
	closeMu sync.RWMutex
	closed  bool

	workerWG sync.WaitGroup // the workers
	syncWG   sync.WaitGroup // the workers' syncers
	readerWG sync.WaitGroup // watchers and other long readers of db
	done     chan struct{}  // closed by Close, for watchers

	// committer appends to the replicated log, when the engine is
	// clustered (Options.Log).
	committer *committer
	// applied is the position of the last log entry the store holds.
	applied atomic.Uint64

	// nextRev is the last revision handed out.
	nextRev atomic.Int64
	// failed holds the error that stopped the engine, if any.
	failed atomic.Pointer[error]
	// health tracks the store's failures (see Health).
	health *storeHealth

	// revMu protects the durable revision watermark and its broadcast.
	revMu   sync.Mutex
	rev     int64              // every revision <= rev is durable or never will be
	revWait chan struct{}      // closed and replaced when rev advances
	revDone map[int64]struct{} // durable revisions above rev
	// trimHistory says that the history limit was lowered since the store
	// was created: every new history entry also trims what is beyond it.
	trimHistory bool
	// recent holds the newest durable events, by revision modulo its size,
	// for watchers (watch.go).
	recent [recentEvents]atomic.Pointer[Event]
	// oldest is the oldest revision watchers may resume from.
	oldest atomic.Int64
	// logFloor is the oldest revision the watch log still holds: pruning
	// keeps logChainSpan more below oldest, for chains. revMu guards it.
	logFloor int64

	counters counters

	// twins is the number of twins, as published.
	twins atomic.Int64

	// evaluator holds the rules in force.
	evaluator atomic.Pointer[evaluatorBox]

	// waitMu protects waiters: the channels of WaitCommand calls, by
	// command id.
	waitMu  sync.Mutex
	waiters map[string][]chan *Command
}

// VShard returns the virtual shard of a twin id.
func (e *Engine) VShard(id string) uint16 {
	return uint16(vshardOf(id, e.vshards))
}

func (e *Engine) workerFor(id string) *worker {
	return e.workers[int(e.VShard(id))%len(e.workers)]
}

// Close stops accepting requests, finishes the ones accepted, ends watches
// and closes the store. It returns when nothing of the engine is running.
func (e *Engine) Close() error {
	e.closeMu.Lock()
	if e.closed {
		e.closeMu.Unlock()
		return ErrClosed
	}
	e.closed = true
	for _, w := range e.workers {
		close(w.inbox)
	}
	e.closeMu.Unlock()

	e.workerWG.Wait()
	e.syncWG.Wait()
	if e.committer != nil {
		e.committer.stop()
	}
	close(e.done)
	e.readerWG.Wait() // so no reader holds a snapshot any more
	for _, w := range e.workers {
		// Nothing is in flight any more, so snap is nil and after empty;
		// release whatever a failure may have left.
		if w.snap != nil {
			w.snap.release()
		}
		for _, s := range w.after {
			s.release()
		}
	}
	return e.db.Close()
}

func (e *Engine) err() error {
	if p := e.failed.Load(); p != nil {
		return fmt.Errorf("%w: the store failed (the server log says why); restart twind", ErrClosed)
	}
	return nil
}

// fail stops the engine from accepting more changes after a store error it
// cannot recover from: the in-memory state may then be ahead of the store.
func (e *Engine) fail(err error) {
	if e.failed.CompareAndSwap(nil, &err) {
		e.opts.Logger.Error("store commit failed; refusing all further changes", "err", err)
		e.health.setFatal(err)
	}
}

// startReader registers a reader of the store that Close waits for. It
// reports false once the engine is closing.
func (e *Engine) startReader() bool {
	e.closeMu.RLock()
	defer e.closeMu.RUnlock()
	if e.closed {
		return false
	}
	e.readerWG.Add(1)
	return true
}

// pebbleLogger sends Pebble's logs to slog.
type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any) {
	p.l.Debug(fmt.Sprintf(format, args...), "component", "pebble")
}

func (p pebbleLogger) Errorf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...), "component", "pebble")
}

func (p pebbleLogger) Fatalf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...), "component", "pebble")
	panic(fmt.Sprintf(format, args...))
}
