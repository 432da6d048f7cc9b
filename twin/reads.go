package twin

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
)

// Get returns the committed state of a twin.
func (e *Engine) Get(id string) (*Twin, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	w := e.workerFor(id)
	w.mu.RLock()
	t, ok := w.view[id]
	w.mu.RUnlock()
	if !ok {
		return nil, notFound(id)
	}
	return t, nil
}

// List calls fn with the committed twins whose ids sort after `after`, in
// id order, until fn returns false, ctx is done or the engine closes. It
// returns the revision up to which every change is reflected in the twins
// it passed to fn, and ctx's error if ctx ended the scan, ErrClosed if Close
// did, and otherwise nil. fn runs on the caller's goroutine with no lock
// held; it must not modify the twin. A twin deleted during the scan may be
// skipped.
func (e *Engine) List(ctx context.Context, after string, fn func(*Twin) bool) (rev int64, err error) {
	rev = e.Revision()
	const batch = 256
	ids := make([]string, 0, batch)
	for {
		if err := e.readStopped(ctx); err != nil {
			return rev, err
		}
		// Take the next ids in order, then look them up without the lock.
		ids = ids[:0]
		e.idxMu.RLock()
		e.ids.AscendGreaterOrEqual(after+"\x00", func(id string) bool {
			ids = append(ids, id)
			return len(ids) < batch
		})
		e.idxMu.RUnlock()
		for _, id := range ids {
			t, err := e.Get(id)
			if err != nil {
				continue // deleted meanwhile
			}
			if err := e.readStopped(ctx); err != nil {
				return rev, err
			}
			if !fn(t) {
				return rev, nil
			}
		}
		if len(ids) < batch {
			return rev, nil
		}
		after = ids[len(ids)-1]
	}
}

// History returns up to limit of a twin's retained events with versions
// below `before` (0 for no bound), newest first. Events of a deleted twin
// are gone with it.
func (e *Engine) History(id string, before int64, limit int) ([]*Event, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if !e.startReader() {
		return nil, ErrClosed
	}
	defer e.readerWG.Done()
	// The twin and its worker's snapshot as of the same durable step: the
	// store itself may already hold later steps of the worker that are
	// not durable yet, among them deletions of durable history.
	snap, ok := e.workerFor(id).durableSnapshot(id)
	defer snap.release()
	if !ok {
		return nil, notFound(id)
	}
	vs := e.VShard(id)
	lower := historyPrefix(vs, id)
	upper := prefixEnd(lower)
	if before > 0 {
		upper = historyKey(vs, id, before)
	}
	it, err := snap.s.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var evs []*Event
	for it.Last(); it.Valid() && len(evs) < limit; it.Prev() {
		if len(it.Value()) != 8 {
			return nil, fmt.Errorf("twin: corrupt history entry %q", it.Key())
		}
		// Every entry the twin's history points to in the snapshot was
		// written by a durable step of its worker.
		rev := int64(binary.BigEndian.Uint64(it.Value()))
		v, closer, err := snap.s.Get(logKey(rev))
		if errors.Is(err, pebble.ErrNotFound) {
			break // older entries have left the watch log
		}
		if err != nil {
			return nil, err
		}
		ev, err := decodeEvent(v)
		closer.Close()
		if err != nil {
			return nil, err
		}
		evs = append(evs, ev)
	}
	return evs, it.Error()
}

// Len returns the number of twins.
func (e *Engine) Len() int {
	n := 0
	for _, w := range e.workers {
		w.mu.RLock()
		n += len(w.view)
		w.mu.RUnlock()
	}
	return n
}

// Revision returns the store's current revision: every change up to it is
// durable and visible to readers.
func (e *Engine) Revision() int64 {
	e.revMu.Lock()
	defer e.revMu.Unlock()
	return e.rev
}
