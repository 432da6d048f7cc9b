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
	results map[string]memoResult // by filter source
}

type memoResult struct {
	ok   bool
	cost uint64
	err  error
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
	defer s.mu.Unlock()
	if s.rev > ev.Revision {
		return eval() // the slot holds a newer event: this watcher is far behind
	}
	if s.rev != ev.Revision {
		s.rev = ev.Revision
		clear(s.results)
	}
	if r, ok := s.results[f.src]; ok {
		return r.ok, 0, r.err // the first watcher paid the cost
	}
	ok, cost, err := eval()
	if ctx.Err() == nil {
		if s.results == nil {
			s.results = map[string]memoResult{}
		}
		s.results[f.src] = memoResult{ok: ok, cost: cost, err: err}
	}
	return ok, cost, err
}
