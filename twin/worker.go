package twin

import (
	"encoding/binary"
	"fmt"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// worker owns the twins of the virtual shards it serves.
type worker struct {
	e     *Engine
	inbox chan *op

	// twins and gone are the working state: every change applied, durable or
	// not yet. Only the worker goroutine touches them.
	twins map[string]*Twin
	gone  map[string]int64 // last version of each deleted twin

	// mu protects view, the committed state that readers see. The syncer
	// writes it after each commit; readers take the read lock.
	mu   sync.RWMutex
	view map[string]*Twin
}

// run applies requests until the inbox is closed and drained.
func (w *worker) run() {
	defer w.e.workerWG.Done()
	ops := make([]*op, 0, w.e.opts.MaxBatch)
	for o := range w.inbox {
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
// changes into one Pebble batch and hands it to the committer. Requests that
// fail are answered at once; the others are answered by the syncer once the
// batch is durable.
func (w *worker) step(ops []*op) {
	e := w.e
	if err := e.err(); err != nil {
		for _, o := range ops {
			o.done <- result{err: err}
		}
		return
	}
	now := e.opts.Clock().UTC()
	var changes []*change
	for _, o := range ops {
		c, err := w.apply(o, now)
		if err != nil {
			o.done <- result{err: err}
			continue
		}
		changes = append(changes, c)
	}
	if len(changes) == 0 {
		return
	}
	b := e.db.NewBatch()
	for _, c := range changes {
		if err := w.write(b, c); err != nil {
			// Encoding a validated document cannot fail; if it does, the
			// working state is no longer what the store will hold.
			e.fail(fmt.Errorf("encode change of %q: %w", c.op.id, err))
			b.Close()
			for _, c := range changes {
				c.op.done <- result{err: e.err()}
			}
			return
		}
	}
	e.commitCh <- &group{w: w, batch: b, changes: changes}
}

// apply computes the change an op makes and applies it to the working
// state. A change with no event changes nothing but must still wait for the
// commit of the changes before it.
func (w *worker) apply(o *op, now time.Time) (*change, error) {
	cur := w.twins[o.id]
	c := &change{op: o, prev: cur}
	var (
		next   *Twin
		err    error
		kind   EventKind
		patch  Document
		source Source
	)
	switch o.kind {
	case opCreate:
		if cur != nil {
			return nil, fmt.Errorf("%w: twin %q already exists", ErrAlreadyExists, o.id)
		}
		next, err = w.e.apply.create(o.create, w.gone[o.id], now)
		kind, source = KindCreated, o.create.Source
	case opReport, opDesired:
		if cur == nil {
			return nil, notFound(o.id)
		}
		desired := o.kind == opDesired
		next, err = w.e.apply.patch(cur, o.patch, desired, now)
		kind, patch, source = KindReported, o.patch.Patch, o.patch.Source
		if desired {
			kind = KindDesired
		} else if err == nil && o.patch.Source == SourceDevice {
			if next == cur {
				next = cur.clone()
			}
			next.Presence.LastSeen = now
		}
	case opUpdate:
		if cur == nil {
			return nil, notFound(o.id)
		}
		next, err = w.e.apply.update(cur, o.update, now)
		kind, source = KindUpdated, o.update.Source
	case opDelete:
		if cur == nil {
			return nil, notFound(o.id)
		}
		if err := checkVersion(cur, o.expect); err != nil {
			return nil, err
		}
		c.deletedVersion = cur.Version
		kind, source = KindDeleted, SourceAPI
	case opToken:
		if cur == nil {
			return nil, notFound(o.id)
		}
		next = cur.clone()
		next.TokenHash = o.token
	default:
		return nil, fmt.Errorf("twin: unknown op %d", o.kind)
	}
	if err != nil {
		return nil, err
	}

	bumped := next == nil || cur == nil || next.Version != cur.Version
	if bumped {
		rev := w.e.nextRev.Add(1)
		evTwin := next
		if next == nil {
			evTwin = cur
		} else {
			next.Revision = rev
		}
		c.event = &Event{Revision: rev, Kind: kind, Twin: evTwin, Patch: patch, Time: now, Source: source}
	}
	c.next = next
	if next == nil {
		delete(w.twins, o.id)
		w.gone[o.id] = c.deletedVersion
	} else {
		w.twins[o.id] = next
		delete(w.gone, o.id)
	}
	return c, nil
}

// write adds a change's keys to b.
func (w *worker) write(b *pebble.Batch, c *change) error {
	e := w.e
	id := c.op.id
	vs := e.VShard(id)
	if c.next != c.prev {
		var rec record
		if c.next == nil {
			rec = record{Deleted: true, LastVersion: c.deletedVersion}
		} else {
			rec = record{Twin: c.next}
		}
		v, err := encodeRecord(rec)
		if err != nil {
			return err
		}
		if err := b.Set(twinKey(vs, id), v, nil); err != nil {
			return err
		}
	}
	if c.event == nil {
		return nil
	}
	ev, err := encodeEvent(c.event)
	if err != nil {
		return err
	}
	if err := b.Set(logKey(c.event.Revision), ev, nil); err != nil {
		return err
	}
	if c.next == nil {
		hp := historyPrefix(vs, id)
		return b.DeleteRange(hp, prefixEnd(hp), nil)
	}
	v := c.next.Version
	if err := b.Set(historyKey(vs, id, v), ev, nil); err != nil {
		return err
	}
	if old := v - int64(e.opts.HistoryLimit); old > 0 {
		return b.Delete(historyKey(vs, id, old), nil)
	}
	return nil
}

// commitLoop merges the batches of the groups it receives, in the order it
// receives them, into one Pebble commit with a synced WAL, and hands each
// commit to the syncer without waiting for the sync, so that the next
// commit's write overlaps this one's fsync.
func (e *Engine) commitLoop() {
	defer e.pipeWG.Done()
	defer close(e.syncCh)
	const maxGroups = 256
	for g := range e.commitCh {
		groups := []*group{g}
	drain:
		for len(groups) < maxGroups {
			select {
			case g, ok := <-e.commitCh:
				if !ok {
					break drain
				}
				groups = append(groups, g)
			default:
				break drain
			}
		}
		e.commit(groups)
	}
}

func (e *Engine) commit(groups []*group) {
	b := groups[0].batch
	if len(groups) > 1 {
		b = e.db.NewBatch()
		for _, g := range groups {
			if err := b.Apply(g.batch, nil); err != nil {
				e.fail(fmt.Errorf("merge batches: %w", err))
			}
			g.batch.Close()
		}
	}
	for _, g := range groups {
		for _, c := range g.changes {
			if c.event != nil {
				e.maxStore = max(e.maxStore, c.event.Revision)
			}
		}
	}
	var rev [8]byte
	binary.BigEndian.PutUint64(rev[:], uint64(e.maxStore))
	if err := b.Set(keyRevision, rev[:], nil); err != nil {
		e.fail(err)
	}
	// Prune the watch log in steps, so that one range deletion covers many
	// revisions.
	const pruneStep = 1024
	if keep := e.maxStore - e.opts.LogRetention + 1; keep-e.pruned >= pruneStep {
		if err := b.DeleteRange(logKey(e.pruned), logKey(keep), nil); err != nil {
			e.fail(err)
		}
		e.pruned = keep
		e.oldest.Store(keep)
	}
	var err error
	if e.err() == nil {
		err = e.db.ApplyNoSyncWait(b, pebble.Sync)
	} else {
		err = e.err()
	}
	if err != nil {
		e.fail(fmt.Errorf("commit: %w", err))
		b.Close()
		e.syncCh <- &commitUnit{groups: groups}
		return
	}
	e.syncCh <- &commitUnit{batch: b, groups: groups}
}

// syncLoop waits for each commit's WAL sync, then publishes its changes to
// readers and watchers and answers its requests, in commit order.
func (e *Engine) syncLoop() {
	defer e.pipeWG.Done()
	for u := range e.syncCh {
		var err error
		if u.batch != nil {
			err = u.batch.SyncWait()
			u.batch.Close()
			if err != nil {
				e.fail(fmt.Errorf("sync: %w", err))
			}
		}
		if err == nil {
			err = e.err()
		}
		if err != nil {
			for _, g := range u.groups {
				for _, c := range g.changes {
					c.op.done <- result{err: err}
				}
			}
			continue
		}
		e.publish(u.groups)
	}
}

func (e *Engine) publish(groups []*group) {
	for _, g := range groups {
		g.w.mu.Lock()
		for _, c := range g.changes {
			if c.next == nil {
				delete(g.w.view, c.op.id)
			} else {
				g.w.view[c.op.id] = c.next
			}
		}
		g.w.mu.Unlock()
	}
	e.revMu.Lock()
	advanced := false
	for _, g := range groups {
		for _, c := range g.changes {
			if c.event != nil {
				e.revDone[c.event.Revision] = struct{}{}
			}
		}
	}
	for {
		if _, ok := e.revDone[e.rev+1]; !ok {
			break
		}
		delete(e.revDone, e.rev+1)
		e.rev++
		advanced = true
	}
	if advanced {
		close(e.revWait)
		e.revWait = make(chan struct{})
	}
	e.revMu.Unlock()
	for _, g := range groups {
		for _, c := range g.changes {
			c.op.done <- result{twin: c.next}
		}
	}
}
