package twin

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
)

// A watcher reads the log in batches of at most this many events or bytes
// (at least one event), with an iterator it closes before it delivers them,
// so that no iterator stays open while fn blocks.
const (
	watchBatchEvents = 256
	watchBatchBytes  = 1 << 20
)

// Watch calls fn, in revision order, with every committed event from
// revision from (inclusive) on, then with every later event as it commits,
// until ctx is done, the engine closes, or fn returns an error. from 0 means
// "from the next revision"; a from beyond the current revision + 1 waits
// for that revision. Watch returns ErrCompacted if from is older than the
// watch log retains, ErrClosed when the engine closes, and otherwise the
// error of ctx or fn.
//
// A watcher reads the durable watch log in bounded batches and holds no
// iterator while fn runs, so a slow watcher slows only itself: it pins
// neither the store nor Close, and fails with ErrCompacted if it falls behind
// by more than the log's retention. Watch checks ctx and Close before every
// event it delivers and between batches, also while it replays events that
// fn skips, so a replay stops as soon as its caller gives up.
func (e *Engine) Watch(ctx context.Context, from int64, fn func(*Event) error) error {
	e.revMu.Lock()
	if from <= 0 {
		from = e.rev + 1
	}
	e.revMu.Unlock()
	next := from
	var evs []*Event
	lr := newLogReader(e.db)
	for {
		e.revMu.Lock()
		upto, wait := e.rev, e.revWait
		e.revMu.Unlock()
		for next <= upto {
			if err := e.readStopped(ctx); err != nil {
				return err
			}
			var err error
			if evs, next = e.readRecent(evs[:0], next, upto); len(evs) == 0 {
				evs, next, err = e.readLog(lr, evs, next, upto)
			} else {
				lr.reset() // caught up: the twins it rebuilt are not needed
			}
			if err != nil {
				return err
			}
			for i, ev := range evs {
				if err := e.readStopped(ctx); err != nil {
					return err
				}
				evs[i] = nil // let the event go once delivered
				if err := fn(ev); err != nil {
					return err
				}
			}
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

// readStopped returns the error that ends a long read (a watch or a list):
// ctx's error, or ErrClosed once the engine closes.
func (e *Engine) readStopped(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-e.done:
		return ErrClosed
	default:
		return nil
	}
}

// recentEvents is how many of the newest events the engine keeps decoded
// in memory, shared by every watcher that keeps up: only a watcher further
// behind, or an event larger than recentEventMaxBytes, is read and decoded
// from the log. A power of two.
const recentEvents = 1 << 12

// recentEventMaxBytes bounds the encoded size of an event kept in memory,
// so that the recent events take tens of MiB at most (a decoded twin
// takes a few times its encoding): larger ones, rare for devices, are read
// from the log.
const recentEventMaxBytes = 4 << 10

// remember keeps a durable event for watchers, before its revision is
// published; size is its encoded size.
func (e *Engine) remember(ev *Event, size int) {
	slot := &e.recent[ev.Revision&(recentEvents-1)]
	if size > recentEventMaxBytes {
		slot.Store(nil) // a watcher reads it from the log
		return
	}
	slot.Store(ev)
}

// readRecent appends to evs the events from revision from on, up to upto
// and at most one batch of them, that are still among the recent events in
// memory, and returns the revision to read next. It stops at the first
// revision it does not hold.
func (e *Engine) readRecent(evs []*Event, from, upto int64) (_ []*Event, next int64) {
	if from < e.oldest.Load() {
		return evs, from // readLog says it is compacted
	}
	for next = from; next <= upto && len(evs) < watchBatchEvents; next++ {
		ev := e.recent[next&(recentEvents-1)].Load()
		if ev == nil || ev.Revision != next {
			break // overwritten by a newer one: the watcher is far behind
		}
		evs = append(evs, ev)
	}
	return evs, next
}

// readLog appends to evs the logged events from revision from on, up to
// upto and at most one batch of them, and returns the revision to read
// next. lr rebuilds their twins (and may be kept for the next batch). It
// closes its iterator before it returns.
func (e *Engine) readLog(lr *logReader, evs []*Event, from, upto int64) (_ []*Event, next int64, err error) {
	if !e.startReader() {
		return evs, 0, ErrClosed
	}
	defer e.readerWG.Done()
	if oldest := e.oldest.Load(); from < oldest {
		return evs, 0, fmt.Errorf("%w: revision %d is no longer retained; the oldest retained revision is %d",
			ErrCompacted, from, oldest)
	}
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: logKey(from), UpperBound: logKey(upto + 1)})
	if err != nil {
		return evs, 0, err
	}
	defer it.Close()
	next, size, n := upto+1, 0, 0
	for it.First(); it.Valid(); it.Next() {
		if n == watchBatchEvents || (n > 0 && size >= watchBatchBytes) {
			next = int64(binary.BigEndian.Uint64(it.Key()[len(prefixLog):]))
			break
		}
		ev, evSize, err := lr.event(it.Value())
		if errors.Is(err, errBrokenChain) {
			// Pruned under the iterator, or written under a longer
			// retention: the watcher cannot resume here.
			return evs, 0, fmt.Errorf("%w: %v", ErrCompacted, err)
		}
		if err != nil {
			return evs, 0, err
		}
		size += evSize // a change entry weighs as its whole twin
		n++
		evs = append(evs, ev)
	}
	if err := it.Error(); err != nil {
		return evs, 0, err
	}
	// The log may have been pruned under the iterator.
	if oldest := e.oldest.Load(); from < oldest {
		return evs, 0, fmt.Errorf("%w: the watcher fell behind past revision %d, the oldest retained",
			ErrCompacted, oldest)
	}
	return evs, next, nil
}

// OldestRevision returns the oldest revision watchers may resume from.
func (e *Engine) OldestRevision() int64 { return e.oldest.Load() }
