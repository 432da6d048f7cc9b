package twin

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/cockroachdb/pebble/v2"
)

// Get returns the committed state of a twin.
func (e *Engine) Get(id string) (*Twin, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	t, err := readDurable(e, id, durableTwin, readTwin)
	if err != nil {
		return nil, err
	}
	if t == nil {
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
//
// The twins are read from the store, merging the virtual shards' ranges in
// id order; those cached are not decoded again.
func (e *Engine) List(ctx context.Context, after string, fn func(*Twin) bool) (rev int64, err error) {
	if !e.startReader() {
		return 0, ErrClosed
	}
	defer e.readerWG.Done()
	rev = e.Revision()
	m, err := e.mergeShards('t', after)
	if err != nil {
		return rev, err
	}
	defer m.close()
	// A twin read from the store is passed to fn once the key after its
	// record is known: it may be the twin's seen key.
	var pending *Twin
	for {
		if err := e.readStopped(ctx); err != nil {
			return rev, err
		}
		key, value, vs, ok := m.next()
		if ok && pending != nil && isSubKey(key) && bytes.HasPrefix(key, append([]byte(pending.ID), 0)) {
			if pending, err = withSeen(pending, value); err != nil {
				return rev, err
			}
			continue
		}
		if pending != nil && !fn(pending) {
			return rev, nil
		}
		pending = nil
		if !ok {
			return rev, m.err
		}
		if isSubKey(key) {
			continue // of a cached or deleted twin
		}
		id := string(key)
		w := e.workers[int(vs)%len(e.workers)]
		w.mu.RLock()
		ent := w.cache.m[id]
		var t *Twin
		if ent != nil {
			t = ent.durable
		}
		w.mu.RUnlock()
		if ent != nil {
			if t != nil && !fn(t) {
				return rev, nil
			}
			continue
		}
		rec, err := decodeRecord(value)
		if err != nil {
			return rev, fmt.Errorf("%w (twin %q)", err, id)
		}
		pending = rec.Twin // nil if deleted
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
	snap := e.workerFor(id).durableSnapshot()
	defer snap.release()
	vs := e.VShard(id)
	if t, err := readTwin(snap.s, vs, id); err != nil || t == nil {
		return nil, cmp.Or(err, notFound(id))
	}
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
	// The revisions of the page's versions, newest first, up to the first
	// that has left the watch log (or, for an imported version, was never
	// in it).
	var revs []int64
	for it.Last(); it.Valid() && len(revs) < limit; it.Prev() {
		if len(it.Value()) != 8 {
			return nil, fmt.Errorf("twin: corrupt history entry %q", it.Key())
		}
		rev := int64(binary.BigEndian.Uint64(it.Value()))
		if rev < e.oldest.Load() {
			break
		}
		revs = append(revs, rev)
	}
	if err := it.Error(); err != nil {
		return nil, err
	}
	// Read oldest first, so that each event's twin is rebuilt from the
	// one before it (logReader). Every entry the twin's history points to
	// in the snapshot was written by a durable step of its worker.
	lr := newLogReader(snap.s)
	evs := make([]*Event, 0, len(revs))
	for _, rev := range slices.Backward(revs) {
		v, closer, err := snap.s.Get(logKey(rev))
		if errors.Is(err, pebble.ErrNotFound) {
			evs = evs[:0] // it and older ones have left the watch log
			continue
		}
		if err != nil {
			return nil, err
		}
		ev, _, err := lr.event(v)
		closer.Close()
		if errors.Is(err, errBrokenChain) {
			evs = evs[:0] // its chain has left the watch log
			continue
		}
		if err != nil {
			return nil, err
		}
		evs = append(evs, ev)
	}
	slices.Reverse(evs)
	return evs, nil
}

// Len returns the number of twins.
func (e *Engine) Len() int { return int(e.twins.Load()) }

// Revision returns the store's current revision: every change up to it is
// durable and visible to readers.
func (e *Engine) Revision() int64 {
	e.revMu.Lock()
	defer e.revMu.Unlock()
	return e.rev
}
