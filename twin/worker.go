package twin

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// worker owns the twins of the virtual shards it serves.
type worker struct {
	e     *Engine
	inbox chan *op
	// wake makes the worker look at its timed work again: the rules
	// changed, and with them what is due when.
	wake chan struct{}

	// twins and gone are the working state: every change applied, durable or
	// not yet. Only the worker goroutine touches them.
	twins    map[string]*Twin
	gone     map[string]goneTwin     // twins deleted in this step (earlier ones are in the store)
	sinks    map[string]Sink         // the streams of connected devices
	cmds     map[string]*commandList // retained commands by device
	expiries expiryHeap              // when open commands expire
	// ruleStates holds each twin's rule states (immutable maps);
	// ruleTimers when rules want a twin evaluated again.
	ruleStates map[string]map[string]RuleState
	ruleTimers ruleTimerHeap
	ruleWake   map[string]time.Time // each twin's pending wake-up in ruleTimers
	nextTick   time.Time
	stepCost   uint64 // the CEL cost spent in the current step
	// lost are the devices that were connected when the process last
	// stopped; those that have not connected again by lostAt are marked
	// disconnected then.
	lost   map[string]bool
	lostAt time.Time

	// mu protects view and cmdView, the committed state that readers see.
	// The syncer writes them after each commit; readers take the read lock.
	mu      sync.RWMutex
	view    map[string]*Twin
	cmdView map[string]*commandList

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
// changes into one Pebble batch and hands it to the committer. Requests that
// fail are answered at once; the others are answered by the syncer once the
// batch is durable.
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
	clear(w.gone) // deletions of earlier steps are in the store now
	changes := w.expireDue(now)
	changes = append(changes, w.lostDevices(ev, now)...)
	for _, o := range ops {
		if o.kind == opPoke {
			// Answered once everything before it is durable.
			changes = append(changes, &change{op: o})
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
		return
	}
	b := e.db.NewBatch()
	w.staged.reset(b)
	var err error
	for _, c := range changes {
		if w.buf, err = w.write(&w.staged, c, w.buf); err != nil {
			// Encoding a validated document cannot fail; if it does, the
			// working state is no longer what the store will hold.
			e.fail(fmt.Errorf("encode change of %q: %w", c.op.id, err))
			b.Close()
			for _, c := range changes {
				c.op.done <- Result{Err: e.err()}
			}
			return
		}
	}
	if err := w.staged.flush(); err != nil {
		e.fail(fmt.Errorf("write batch: %w", err))
		b.Close()
		for _, c := range changes {
			c.op.done <- Result{Err: e.err()}
		}
		return
	}
	g := &group{w: w, batch: b, changes: changes, start: time.Now()}
	if err := e.db.ApplyNoSyncWait(b, pebble.Sync); err != nil {
		e.fail(fmt.Errorf("commit: %w", err))
		b.Close()
		g.batch, g.err = nil, e.err()
	}
	w.syncCh <- g
}

// apply computes the change an op makes and applies it to the working
// state. A change with no event changes nothing durable about the twin but
// must still wait for the commit of the changes before it.
func (w *worker) apply(o *op, now time.Time) (*change, error) {
	cur := w.twins[o.id]
	if cur == nil && o.kind != opCreate {
		return nil, notFound(o.id)
	}
	c := &change{op: o, prev: cur, sink: w.sinks[o.id]}
	var (
		next   *Twin
		err    error
		kind   EventKind
		patch  Document
		source Source
		emit   bool // an event even without a version bump
	)
	switch o.kind {
	case opCreate:
		if cur != nil {
			return nil, fmt.Errorf("%w: twin %q already exists", ErrAlreadyExists, o.id)
		}
		var gone goneTwin
		if gone, err = w.lastLife(o.id); err != nil {
			return nil, err
		}
		next, err = w.e.apply.create(o.create, gone.version, now)
		if err == nil {
			next.CommandSeq = gone.cmdSeq
		}
		kind, source = KindCreated, o.create.Source
	case opReport, opDesired:
		desired := o.kind == opDesired
		if o.patch.Stream != nil && o.patch.Stream != c.sink {
			return nil, fmt.Errorf("%w: device %q", ErrStreamClosed, o.id)
		}
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
		next, err = w.e.apply.update(cur, o.update, now)
		kind, source = KindUpdated, o.update.Source
	case opDelete:
		if err := checkVersion(cur, o.expect); err != nil {
			return nil, err
		}
		c.gone = goneTwin{version: cur.Version, cmdSeq: cur.CommandSeq}
		kind, source = KindDeleted, SourceAPI
		if l := w.cmds[o.id]; l != nil {
			c.cmds = &commandList{}
			for _, cmd := range l.cmds {
				c.dropCmds = append(c.dropCmds, cmd.Seq)
				w.expiries.remove(cmd)
			}
		}
		if c.sink != nil {
			c.replaced, c.closeErr = c.sink, fmt.Errorf("%w: twin %q was deleted", ErrNotFound, o.id)
			delete(w.sinks, o.id)
			c.sink = nil
		}
	case opToken:
		next = cur.clone()
		next.TokenHash = o.token
		if c.sink != nil {
			// The stream authenticated with the old token: it ends, its
			// reports still in the inbox are refused, and the device is
			// offline until it connects with the new one.
			c.replaced, c.closeErr = c.sink, ErrTokenRevoked
			delete(w.sinks, o.id)
			c.sink = nil
			next.Presence = Presence{Connected: false, Since: now, LastSeen: cur.Presence.LastSeen}
			kind, source, emit = KindPresence, SourceAPI, true
		}
	case opConnect, opDisconnect:
		next = w.presence(c, cur, o, now)
		kind, source, emit = KindPresence, SourceDevice, next != cur
	case opSendCommand:
		next, err = w.sendCommand(c, cur, o.cmdReq, now)
	case opUpdateCommand:
		err = w.updateCommand(c, cur, o.cmdUpd, now)
		next = cur
	case opCancelCommand:
		err = w.finishCommand(c, o.seq, CommandCanceled, "canceled by an operator", now)
		next = cur
	default:
		return nil, fmt.Errorf("twin: unknown op %d", o.kind)
	}
	if err != nil {
		return nil, err
	}

	bumped := next == nil || cur == nil || next.Version != cur.Version
	if bumped || emit {
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
		delete(w.cmds, o.id)
		delete(w.ruleStates, o.id)
		w.gone[o.id] = c.gone
	} else {
		w.twins[o.id] = next
		delete(w.gone, o.id)
	}
	if c.cmds != nil && next != nil {
		w.cmds[o.id] = c.cmds
	}
	return c, nil
}

// lastLife returns what the last twin with this id left behind when it was
// deleted: deletions of this step from memory, earlier ones from the store
// (where their batches are applied, durable or not yet), so that no memory
// is held for deleted twins.
func (w *worker) lastLife(id string) (goneTwin, error) {
	if g, ok := w.gone[id]; ok {
		return g, nil
	}
	v, closer, err := w.e.db.Get(twinKey(w.e.VShard(id), id))
	if errors.Is(err, pebble.ErrNotFound) {
		return goneTwin{}, nil
	}
	if err != nil {
		return goneTwin{}, fmt.Errorf("twin: read the record of deleted twin %q: %w", id, err)
	}
	defer closer.Close()
	r, err := decodeRecord(v)
	if err != nil {
		return goneTwin{}, err
	}
	return goneTwin{version: r.LastVersion, cmdSeq: r.LastCommandSeq}, nil
}

// nextTimed returns when the worker has timed work next: a command to
// expire, a twin whose rules want evaluating, or the periodic rule tick.
func (w *worker) nextTimed() (time.Time, bool) {
	var at time.Time
	if w.expiries.Len() > 0 {
		at = w.expiries.next().at
	}
	if len(w.lost) > 0 && (at.IsZero() || w.lostAt.Before(at)) {
		at = w.lostAt
	}
	if w.ruleTimers.Len() > 0 && (at.IsZero() || w.ruleTimers[0].at.Before(at)) {
		at = w.ruleTimers[0].at
	}
	if w.e.currentEvaluator() != nil {
		if t := w.nextTick; t.IsZero() || at.IsZero() || t.Before(at) {
			at = t // a zero tick means "now": start ticking
		}
	}
	return at, !at.IsZero() || w.e.currentEvaluator() != nil
}

// write adds a change's keys to b. buf is scratch space, returned for reuse.
func (w *worker) write(b writer, c *change, buf []byte) ([]byte, error) {
	if c.err != nil || c.op.kind == opPoke {
		return buf, nil // nothing to write: answered in commit order
	}
	e := w.e
	id := c.op.id
	vs := e.VShard(id)
	for _, cmd := range c.writeCmds {
		v, err := encodeCommand(cmd)
		if err != nil {
			return buf, err
		}
		if err := b.Set(commandKey(vs, id, cmd.Seq), v, nil); err != nil {
			return buf, err
		}
	}
	if err := writeRuleStates(b, vs, id, c.ruleWrites); err != nil {
		return buf, err
	}
	for _, seq := range c.dropCmds {
		if err := b.Delete(commandKey(vs, id, seq), nil); err != nil {
			return buf, err
		}
	}
	if was, is := c.prev != nil && c.prev.Presence.Connected, c.next != nil && c.next.Presence.Connected; was != is {
		if is {
			if err := b.Set(presenceKey(vs, id), nil, nil); err != nil {
				return buf, err
			}
		} else if err := b.Delete(presenceKey(vs, id), nil); err != nil {
			return buf, err
		}
	}
	var tw []byte // the encoded twin of the event
	if c.next != c.prev {
		rec := record{Twin: c.next}
		if c.next == nil {
			rec = record{Deleted: true, LastVersion: c.gone.version, LastCommandSeq: c.gone.cmdSeq}
		}
		v := encodeRecord(rec)
		if err := b.Set(twinKey(vs, id), v, nil); err != nil {
			return buf, err
		}
		tw = v
	}
	if c.event == nil {
		return buf, nil
	}
	if c.next == nil {
		tw = appendTwin(nil, c.prev)
	}
	buf = appendEvent(buf[:0], c.event, tw)
	if err := b.Set(logKey(c.event.Revision), buf, nil); err != nil {
		return buf, err
	}
	if c.next == nil {
		for _, p := range [][]byte{historyPrefix(vs, id), commandPrefix(vs, id), ruleStatePrefix(vs, id)} {
			if err := b.DeleteRange(p, prefixEnd(p), nil); err != nil {
				return buf, err
			}
		}
		return buf, nil
	}
	if c.prev != nil && c.next.Version == c.prev.Version {
		return buf, nil // a presence change: no new version for the history
	}
	// The history entry points into the watch log.
	v := c.next.Version
	var rev [8]byte
	binary.BigEndian.PutUint64(rev[:], uint64(c.event.Revision))
	if err := b.Set(historyKey(vs, id, v), rev[:], nil); err != nil {
		return buf, err
	}
	if old := v - int64(e.opts.HistoryLimit); old > 0 {
		if e.trimHistory {
			return buf, b.DeleteRange(historyKey(vs, id, 0), historyKey(vs, id, old+1), nil)
		}
		return buf, b.Delete(historyKey(vs, id, old), nil)
	}
	return buf, nil
}

// syncLoop waits for the WAL sync of each of the worker's commits, in
// order, then publishes its changes to readers and watchers and answers its
// requests. It runs beside the worker so that the worker applies and commits
// its next step while this one's fsync is under way.
func (w *worker) syncLoop() {
	defer w.e.syncWG.Done()
	e := w.e
	for g := range w.syncCh {
		err := g.err
		if g.batch != nil {
			err = g.batch.SyncWait()
			g.batch.Close()
			if err != nil {
				e.fail(fmt.Errorf("sync: %w", err))
			}
		}
		if err != nil {
			for _, c := range g.changes {
				c.op.done <- Result{Err: e.err()}
			}
			continue
		}
		e.count(g)
		e.publish(g)
	}
}

// publish makes a durable group visible, tells connected devices and
// command waiters, and answers the group's requests.
func (e *Engine) publish(g *group) {
	g.w.mu.Lock()
	for _, c := range g.changes {
		if c.op.kind == opPoke || c.err != nil {
			continue
		}
		if c.next == nil {
			delete(g.w.view, c.op.id)
			delete(g.w.cmdView, c.op.id)
			continue
		}
		g.w.view[c.op.id] = c.next
		if c.cmds != nil {
			g.w.cmdView[c.op.id] = c.cmds
		}
	}
	g.w.mu.Unlock()

	e.idxMu.Lock()
	for _, c := range g.changes {
		switch {
		case c.op.kind == opPoke || c.err != nil:
		case c.prev == nil && c.next != nil:
			e.ids.ReplaceOrInsert(c.next.ID)
		case c.next == nil && c.prev != nil:
			e.ids.Delete(c.prev.ID)
		}
	}
	e.idxMu.Unlock()

	for _, c := range g.changes {
		if c.replaced != nil {
			c.replaced.Close(c.closeErr)
		}
		if c.sink != nil {
			switch {
			case c.welcome:
				c.sink.Welcome(c.next, c.deliver)
			case len(c.deliver) > 0:
				c.sink.Commands(c.deliver)
			}
			if c.event != nil && c.event.Kind == KindDesired {
				c.sink.DesiredChanged(c.next, c.event.Patch)
			}
		}
		for _, cmd := range c.writeCmds {
			if cmd.State.Final() {
				e.notifyCommand(cmd)
			}
		}
		if len(c.firings) > 0 && e.opts.OnFirings != nil {
			t := c.next
			if t == nil {
				t = c.prev
			}
			evs := make([]FiringEvent, len(c.firings))
			for i, f := range c.firings {
				evs[i] = FiringEvent{Firing: f, TwinID: t.ID, TwinVersion: t.Version, Time: e.opts.Clock()}
			}
			e.opts.OnFirings(evs)
		}
	}

	e.revMu.Lock()
	for _, c := range g.changes {
		if c.event != nil {
			e.revDone[c.event.Revision] = struct{}{}
		}
	}
	advanced := false
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
		e.pruneLog()
	}
	e.revMu.Unlock()
	for _, c := range g.changes {
		if c.err != nil {
			c.op.done <- Result{Err: c.err}
			continue
		}
		c.op.done <- Result{Twin: c.next, Command: c.cmd}
	}
}

// pruneLog drops the watch log's revisions older than the retention, in
// steps, so that one range deletion covers many revisions. e.revMu is held.
func (e *Engine) pruneLog() {
	const pruneStep = 1024
	keep := e.rev - e.opts.LogRetention + 1
	from := e.oldest.Load()
	if keep-from < pruneStep || e.err() != nil {
		return
	}
	// Watchers learn of the pruning before it happens, so none reads a
	// partly pruned range and takes it for complete.
	e.oldest.Store(keep)
	if err := e.db.DeleteRange(logKey(from), logKey(keep), pebble.NoSync); err != nil {
		e.opts.Logger.Error("pruning the watch log failed", "err", err)
	}
}
