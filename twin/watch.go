package twin

import (
	"context"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
)

// Watch calls fn, in revision order, with every committed event from
// revision from (inclusive) on, then with every later event as it commits,
// until ctx is done, the engine closes, or fn returns an error. from 0 means
// "from the next revision". Watch returns ErrCompacted if from is older than
// the watch log retains, ErrClosed when the engine closes, and otherwise the
// error of ctx or fn.
//
// A watcher reads the durable watch log, so a slow watcher slows only
// itself; it fails with ErrCompacted if it falls behind by more than the
// log's retention.
func (e *Engine) Watch(ctx context.Context, from int64, fn func(*Event) error) error {
	if !e.startReader() {
		return ErrClosed
	}
	defer e.readerWG.Done()
	e.revMu.Lock()
	if from <= 0 {
		from = e.rev + 1
	}
	e.revMu.Unlock()
	next := from
	for {
		e.revMu.Lock()
		upto, wait := e.rev, e.revWait
		e.revMu.Unlock()
		if next <= upto {
			n, err := e.readLog(next, upto, fn)
			if err != nil {
				return err
			}
			next = n
		}
		select {
		case <-wait:
		case <-ctx.Done():
			return ctx.Err()
		case <-e.done:
			return ErrClosed
		}
	}
}

// readLog calls fn with the logged events in [from, upto] and returns the
// revision to read next.
func (e *Engine) readLog(from, upto int64, fn func(*Event) error) (int64, error) {
	if oldest := e.oldest.Load(); from < oldest {
		return 0, fmt.Errorf("%w: revision %d is no longer retained; the oldest retained revision is %d",
			ErrCompacted, from, oldest)
	}
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: logKey(from), UpperBound: logKey(upto + 1)})
	if err != nil {
		return 0, err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		ev, err := decodeEvent(it.Value())
		if err != nil {
			return 0, err
		}
		if err := fn(ev); err != nil {
			return 0, err
		}
	}
	if err := it.Error(); err != nil {
		return 0, err
	}
	// The log may have been pruned under the iterator.
	if oldest := e.oldest.Load(); from < oldest {
		return 0, fmt.Errorf("%w: the watcher fell behind past revision %d, the oldest retained",
			ErrCompacted, oldest)
	}
	return upto + 1, nil
}

// OldestRevision returns the oldest revision the watch log still holds.
func (e *Engine) OldestRevision() int64 { return e.oldest.Load() }
