package twin

import (
	"fmt"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// worker owns the twins of the virtual shards it serves.
type worker struct {
	e     *Engine
	index int // in e.workers; the worker serves the virtual shards vs with vs % len(e.workers) == index
	inbox chan *op
	// wake makes the worker look at its timed work again: the rules
	// changed, and with them what is due when.
	wake chan struct{}

	// cache holds the twins in use (cache.go).
	cache twinCache
	// counts holds the number of twins in each of the worker's virtual
	// shards, as of its last step.
	counts   map[uint16]int64
	sinks    map[string]Sink // the streams of connected devices
	expiries expiryHeap      // when open commands expire
	// ruleTimers say when rules want a twin evaluated again.
	ruleTimers ruleTimerHeap
	ruleWake   map[string]time.Time // each twin's pending wake-up in ruleTimers
	// timedBacklog are the twins whose timed evaluation a step left to the
	// next one, its CEL budget spent.
	timedBacklog []string
	// scan is the periodic rule tick's walk over the worker's twins, while
	// it lasts (rules.go).
	scan     *tickScan
	nextTick time.Time
	stepCost uint64 // the CEL cost spent in the current step
	// lost are the devices that were connected when the process last
	// stopped; those that have not connected again by lostAt are marked
	// disconnected then.
	lost   map[string]bool
	lostAt time.Time

	// mu protects the cache's map and its entries' durable states, and
	// snap: the committed state that readers see. The syncer
	// writes them after each commit; readers take the read lock. snap is
	// the store as of the last durable step (snapshot.go).
	mu   sync.RWMutex
	snap *sharedSnapshot
	// applied and published count the steps whose batch the worker has
	// applied to the store and those its syncer has published (or
	// failed). While they differ the worker has steps in flight and snap
	// is set; when they are equal snap is nil, and the store itself holds
	// exactly the worker's durable state. after holds, by step, the store
	// as of each step in flight that a later step followed
	// (snapshot.go).
	applied, published int64
	after              map[int64]*sharedSnapshot

	buf    []byte // scratch space of the worker goroutine
	staged staged // the step's writes, sorted before they reach the batch

	// syncCh carries the worker's commits, in commit order, to its syncer.
	syncCh chan *group
}

// run applies requests until the inbox is closed and drained.
func (w *worker) run() {
	defer w.e.workerWG.Done()
	defer close(w.syncCh)
	ops := make([]*op, 0, w.e.opts.MaxBatch)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		// Sleep until a request arrives or the next timed work is due.
		if at, ok := w.nextTimed(); ok {
			timer.Reset(max(at.Sub(w.e.opts.Clock()), 0))
		} else {
			timer.Stop()
		}
		var o *op
		select {
		case next, ok := <-w.inbox:
			if !ok {
				return
			}
			o = next
		case <-timer.C:
			w.step(nil)
			continue
		case <-w.wake:
			continue
		}
		ops = append(ops[:0], o)
	drain:
		for len(ops) < cap(ops) {
			select {
			case o, ok := <-w.inbox:
				if !ok {
					break drain
				}
				ops = append(ops, o)
			default:
				break drain
			}
		}
		w.step(ops)
	}
}

// step applies a batch of requests to the working state, writes their
// changes into one Pebble batch, applies it without waiting for its WAL
// sync and hands it to the worker's syncer, which answers every request of
// the step, failed ones included, once the batch is durable.
func (w *worker) step(ops []*op) {
	e := w.e
	if err := e.err(); err != nil {
		for _, o := range ops {
			o.done <- Result{Err: err}
		}
		return
	}
	now := e.opts.Clock().UTC()
	ev := e.currentEvaluator()
	w.stepCost = 0
	w.cache.clock.Add(1)
	if err := w.prefetch(ops); err != nil {
		e.fail(fmt.Errorf("read twins: %w", err))
		for _, o := range ops {
			o.done <- Result{Err: e.err()}
		}
		return
	}
	changes := w.expireDue(now)
	changes = append(changes, w.lostDevices(ev, now)...)
	for _, o := range ops {
		if o.kind == opPoke {
			// Answered once everything before it is durable.
			changes = append(changes, &change{op: o})
			continue
		}
		if o.kind == opImport {
			changes = append(changes, w.importTwins(o, now)...)
			continue
		}
		c, err := w.apply(o, now)
		if err != nil {
			// Answered, like a success, once everything before it is
			// durable: the state that made it fail may not be yet.
			changes = append(changes, &change{op: o, err: err})
			continue
		}
		changes = append(changes, c)
		if ev != nil && c.event != nil {
			changes = append(changes, w.runRules(ev, c, now, false)...)
		}
	}
	if ev != nil {
		// After the requests, so that what they cost counts against the
		// budget of the timed work.
		tick := !w.nextTick.IsZero() && !now.Before(w.nextTick)
		if tick || w.nextTick.IsZero() {
			w.nextTick = now.Add(e.opts.RuleTick)
		}
		changes = append(changes, w.timedRules(ev, now, tick)...)
	}
	if len(changes) == 0 {
		w.mu.Lock()
		w.evict()
		w.mu.Unlock()
		return
	}
	b := e.db.NewBatch()
	w.staged.reset(b)
	var err error
	for _, c := range changes {
		if w.buf, err = w.write(&w.staged, c, w.buf); err != nil {
			// Encoding a validated document cannot fail; if it does, the
			// working state is no longer what the store will hold.
			w.abandon(b, changes, fmt.Errorf("encode change of %q: %w", c.op.id, err))
			return
		}
	}
	if err := w.staged.flush(); err != nil {
		w.abandon(b, changes, fmt.Errorf("write batch: %w", err))
		return
	}
	g := &group{w: w, batch: b, changes: changes, start: time.Now()}
	w.mu.Lock()
	g.seq = w.beforeApply()
	w.evict()
	w.mu.Unlock()
	if e.committer != nil {
		// Clustered: the step is durable once the log holds it, and the
		// committer applies it to the store before it returns, so that
		// the next step reads what this one wrote.
		if err := e.committer.commit(b); err != nil {
			e.fail(err)
			g.err = e.err()
		}
		g.batch = nil
	} else if err := e.db.ApplyNoSyncWait(b, pebble.Sync); err != nil {
		e.fail(fmt.Errorf("commit: %w", err))
		b.Close()
		g.batch, g.err = nil, e.err()
	}
	w.syncCh <- g
}

// abandon fails the engine with err, for a step whose batch cannot be
// written, and answers every request of the step.
func (w *worker) abandon(b *pebble.Batch, changes []*change, err error) {
	w.e.fail(err)
	b.Close()
	for _, c := range changes {
		c.op.done <- Result{Err: w.e.err()}
	}
}

// nextTimed returns when the worker has timed work next: a command to
// expire, a twin whose rules want evaluating, or the periodic rule tick.
func (w *worker) nextTimed() (time.Time, bool) {
	var at time.Time
	if w.expiries.Len() > 0 {
		at = w.expiries.next().at
	}
	if len(w.timedBacklog) > 0 && w.e.currentEvaluator() != nil {
		return w.e.opts.Clock(), true // at once
	}
	if w.scan != nil && w.e.currentEvaluator() != nil {
		at = minTime(at, w.scan.next(w.e.opts.RuleTick))
	}
	if len(w.lost) > 0 && (at.IsZero() || w.lostAt.Before(at)) {
		at = w.lostAt
	}
	// Rule wake-ups wait for rules to evaluate them with: without, they
	// would be due forever and the worker would spin.
	if w.ruleTimers.Len() > 0 && w.e.currentEvaluator() != nil && (at.IsZero() || w.ruleTimers[0].at.Before(at)) {
		at = w.ruleTimers[0].at
	}
	if w.e.currentEvaluator() != nil {
		if t := w.nextTick; t.IsZero() || at.IsZero() || t.Before(at) {
			at = t // a zero tick means "now": start ticking
		}
	}
	return at, !at.IsZero() || w.e.currentEvaluator() != nil
}

// minTime returns the earlier of a and b, a zero time counting as none.
func minTime(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}
