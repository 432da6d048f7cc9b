package server

import (
	"context"
	"sync"

	"github.com/twind-io/twind/twin"
)

// filterMemo shares the results of watch filters among watchers: every
// watcher with the same filter gets the same answer for the same event
// (a filter reads only the event's twin and time), so each distinct filter
// is evaluated once per event however many watchers use it. Dashboards and
// consoles open many watches with one filter.
//
// It remembers the newest events by revision, in slots: a watcher far
// behind, whose event's slot holds a newer one, evaluates for itself.
type filterMemo struct {
	slots [filterMemoSlots]memoSlot
}

// filterMemoSlots is how many revisions the memo holds, a power of two:
// watchers that keep up are within a few steps of each other.
const filterMemoSlots = 1 << 10

type memoSlot struct {
	mu      sync.Mutex
	rev     int64
	entries map[string]*memoEntry // by filter source
}

// memoEntry is one filter's answer for one event, once done is closed. Its
// first watcher evaluates while the others of the same filter wait, and
// watchers of other filters evaluate theirs meanwhile.
type memoEntry struct {
	done  chan struct{}
	ok    bool
	cost  uint64
	err   error
	valid bool // false: the evaluating watcher's context ended first
}

// match returns what eval says of f for ev, evaluating it only if no
// watcher with the same filter has yet. Errors of the context are not
// remembered: they belong to the watcher that saw them.
func (m *filterMemo) match(ctx context.Context, f *filter, ev *twin.Event, eval func() (bool, uint64, error)) (bool, uint64, error) {
	if f.prg == nil || f.src == "" {
		return eval()
	}
	s := &m.slots[ev.Revision&(filterMemoSlots-1)]
	s.mu.Lock()
	if s.rev > ev.Revision {
		s.mu.Unlock()
		return eval() // the slot holds a newer event: this watcher is far behind
	}
	if s.rev != ev.Revision {
		s.rev = ev.Revision
		clear(s.entries)
	}
	if me, ok := s.entries[f.src]; ok {
		s.mu.Unlock()
		select {
		case <-me.done:
		case <-ctx.Done():
			return false, 0, ctx.Err()
		}
		if me.valid {
			return me.ok, 0, me.err // the first watcher paid the cost
		}
		return eval()
	}
	me := &memoEntry{done: make(chan struct{})}
	if s.entries == nil {
		s.entries = map[string]*memoEntry{}
	}
	s.entries[f.src] = me
	s.mu.Unlock()
	defer close(me.done)
	me.ok, me.cost, me.err = eval()
	me.valid = ctx.Err() == nil
	return me.ok, me.cost, me.err
}
