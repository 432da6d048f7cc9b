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
// durable; other workers' keys in it are not read through it.

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
