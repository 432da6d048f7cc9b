package twin

import (
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2"
)

// A worker's published snapshot lets readers of the store see exactly the
// worker's durable state. Pebble makes a batch visible as soon as it is
// applied, before its WAL sync, so a read of the store itself may see a
// worker step that a crash would still erase: a history entry, or a
// deletion or trim of entries that are durable. Each worker therefore takes
// a snapshot right after applying a step's batch, when the store holds
// every step of the worker up to that one and none after it, and its syncer
// installs that snapshot once the step is durable. The keys of a worker's
// twins are written by that worker alone, so the snapshot shows them as
// durable; other workers' keys in it are not read through it. A worker with
// nothing in flight holds no snapshot (it would keep what later changes
// overwrite from being reclaimed): the store then is its durable state, and
// a reader takes a snapshot of its own.

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
// twins are exactly as durable, and whether the twin id then existed. The
// caller releases the snapshot.
func (w *worker) durableSnapshot(id string) (*sharedSnapshot, bool) {
	for {
		w.mu.RLock()
		_, ok := w.view[id]
		if w.snap != nil {
			s := w.snap.acquire()
			w.mu.RUnlock()
			return s, ok
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
			return s, ok
		}
		s.release()
	}
}
