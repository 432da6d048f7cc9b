package twin

import (
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2"
)

// A worker's published snapshot lets readers of the store see exactly the
// worker's durable state. Pebble makes a batch visible as soon as it is
// applied, before its WAL sync, so a read of the store itself may see a
// worker step that a crash would still erase: a history entry, or a
// deletion or trim of entries that are durable. The keys of a worker's
// twins are written by that worker alone, so a snapshot of the store taken
// between two of its steps shows them as they are after the first; other
// workers' keys in it are not read through it.
//
// A worker with nothing in flight holds no snapshot (it would keep what
// later changes overwrite from being reclaimed): the store is then its
// durable state, and a reader takes a snapshot of its own. Just before it
// applies a step, a worker snapshots the store once: when it was idle,
// that is the durable state readers need until the step is published; when
// steps are in flight, it is the state after the last of them, which
// readers need once that one is published.

// sharedSnapshot is a Pebble snapshot with a reference count: the worker's
// current published snapshot holds one reference, each reader one more,
// and the last to let go closes it.
type sharedSnapshot struct {
	s    *pebble.Snapshot
	refs atomic.Int32
}

func newSharedSnapshot(db *pebble.DB) *sharedSnapshot {
	s := &sharedSnapshot{s: db.NewSnapshot()}
	s.refs.Store(1)
	return s
}

func (s *sharedSnapshot) acquire() *sharedSnapshot {
	s.refs.Add(1)
	return s
}

func (s *sharedSnapshot) release() {
	if s.refs.Add(-1) == 0 {
		s.s.Close()
	}
}

// durableSnapshot returns a snapshot in which the keys of the worker's
// twins are exactly as durable. The caller releases the snapshot.
func (w *worker) durableSnapshot() *sharedSnapshot {
	for {
		w.mu.RLock()
		if w.snap != nil {
			s := w.snap.acquire()
			w.mu.RUnlock()
			return s
		}
		applied := w.applied
		w.mu.RUnlock()
		// Idle: the store is durable for the worker's keys, unless a
		// step is applied meanwhile. A worker installs a snapshot before
		// it applies a step, so finding none, and the same count, after
		// taking ours means ours holds no step in flight.
		s := newSharedSnapshot(w.e.db)
		w.mu.RLock()
		same := w.snap == nil && w.applied == applied
		w.mu.RUnlock()
		if same {
			return s
		}
		s.release()
	}
}

// beforeApply snapshots the store for readers, just before the worker
// applies its next step, and returns that step's sequence. w.mu is held.
func (w *worker) beforeApply() int64 {
	if w.applied == w.published {
		w.snap = newSharedSnapshot(w.e.db) // the durable state, until this step is published
	} else {
		if w.after == nil {
			w.after = map[int64]*sharedSnapshot{}
		}
		w.after[w.applied] = newSharedSnapshot(w.e.db) // the state once the last step in flight is published
	}
	w.applied++
	return w.applied
}

// afterPublish moves readers on to the durable state once step seq is
// published (or has failed). w.mu is held.
func (w *worker) afterPublish(seq int64) {
	w.published = seq
	old := w.snap
	if w.published == w.applied {
		w.snap = nil // nothing in flight: readers read the store
	} else {
		w.snap = w.after[seq]
		delete(w.after, seq)
	}
	if old != nil {
		old.release()
	}
}
