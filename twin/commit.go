package twin

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// group is one worker step's worth of changes, with the batch that commits
// them, or the error that kept them from committing.
type group struct {
	seq     int64 // numbers the worker's steps, from 1 (snapshot.go)
	w       *worker
	start   time.Time
	batch   *pebble.Batch
	err     error
	changes []*change
}

// write adds a change's keys to b. buf is scratch space, returned for reuse.
func (w *worker) write(b writer, c *change, buf []byte) ([]byte, error) {
	if c.err != nil || c.op.kind == opPoke {
		return buf, nil // nothing to write: answered in commit order
	}
	if c.op.kind == opImport {
		return w.writeImport(b, c, buf)
	}
	e := w.e
	id := c.op.id
	vs := e.VShard(id)
	// The change's twin was read into the cache by the step, and stays
	// there until the step is published.
	ent := w.cache.m[id]
	w.touch(ent)
	if err := writeCommands(b, vs, id, c.writeCmds); err != nil {
		return buf, err
	}
	if err := writeRuleStates(b, vs, id, c.ruleWrites); err != nil {
		return buf, err
	}
	if len(c.ruleWrites) > 0 {
		var err error
		if hasPending(ent.states) {
			err = b.Set(pendingKey(vs, id), nil, nil)
		} else {
			err = b.Delete(pendingKey(vs, id), nil)
		}
		if err != nil {
			return buf, err
		}
	}
	for _, seq := range c.dropCmds {
		if err := errors.Join(b.Delete(commandKey(vs, id, seq), nil), b.Delete(openKey(vs, id, seq), nil)); err != nil {
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
	if c.seenOnly {
		// Only last_seen moved: no event, and 8 bytes instead of the record.
		ent.seen = true
		return buf, b.Set(seenKey(vs, id), appendUint64(nil, uint64(c.next.Presence.LastSeen.UnixNano())), nil)
	}
	// The event's log entry holds the change since the twin's previous
	// entry, if the chain may grow (logchain.go), else the whole twin.
	complete := c.event != nil
	var diff twinDiff
	if c.event != nil && c.next != nil {
		var pos logPosition
		pos, complete = ent.log.next(c.event.Revision)
		if !complete {
			var ok bool
			diff, ok = diffTwins(c.prev, c.next)
			complete = !ok
		}
		if complete {
			pos = logPosition{Base: c.event.Revision}
		}
		ent.log = pos
	}
	if c.next != c.prev {
		if ent.seen {
			// The record holds last_seen again.
			ent.seen = false
			if err := b.Delete(seenKey(vs, id), nil); err != nil {
				return buf, err
			}
		}
		if err := writeIndex(b, vs, c.prev, c.next); err != nil {
			return buf, err
		}
		rec := record{Twin: c.next, Log: ent.log}
		if c.next == nil {
			rec = record{Deleted: true, LastVersion: c.gone.version, LastCommandSeq: c.gone.cmdSeq}
		}
		v := encodeRecord(rec)
		if err := b.Set(twinKey(vs, id), v, nil); err != nil {
			return buf, err
		}
		tw = v
		if c.next != nil {
			w.resize(ent, len(v))
		} else {
			w.resize(ent, 0)
		}
		if d := c.twinsAdded(); d != 0 {
			w.counts[vs] += d
			if err := b.Set(countKey(vs), appendUint64(nil, uint64(w.counts[vs])), nil); err != nil {
				return buf, err
			}
		}
	}
	if c.event == nil {
		return buf, nil
	}
	if c.next == nil {
		tw = appendTwin(nil, c.prev)
		ent.log = logPosition{}
	}
	if complete {
		buf = appendEvent(buf[:0], c.event, tw)
	} else {
		buf = appendChangeEvent(buf[:0], c.event, diff, c.prev.Revision, len(tw))
	}
	// A change entry is small, but watchers keep its twin decoded.
	c.eventBytes = max(len(buf), len(tw))
	if err := b.Set(logKey(c.event.Revision), buf, nil); err != nil {
		return buf, err
	}
	if c.next == nil {
		if err := b.Delete(pendingKey(vs, id), nil); err != nil {
			return buf, err
		}
		for _, p := range [][]byte{historyPrefix(vs, id), commandPrefix(vs, id), openPrefix(vs, id), ruleStatePrefix(vs, id)} {
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
			w.mu.Lock()
			w.afterPublish(g.seq)
			w.mu.Unlock()
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
		if c.prev == nil && c.next == nil {
			continue // an import's marker event: no twin
		}
		// Cached: the entries a step changed stay until it is published.
		ent := g.w.cache.m[c.op.id]
		ent.durable = c.next
		switch {
		case c.next == nil:
			ent.durableCmds = nil
		case c.cmds != nil:
			ent.durableCmds = c.cmds
		}
		e.twins.Add(c.twinsAdded())
	}
	g.w.afterPublish(g.seq)
	g.w.mu.Unlock()

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
				e.notifyCommand(cmd.ID, cmd)
			}
		}
		if (c.next == nil || c.op.kind == opImport) && c.prev != nil && c.err == nil {
			// The twin was deleted, or replaced by an import, and its
			// commands with it: their waiters learn it now, not at the
			// end of their wait.
			for _, seq := range c.dropCmds {
				e.notifyCommand(CommandID(c.prev.ID, seq), nil)
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

	for _, c := range g.changes {
		if c.event != nil {
			e.remember(c.event, c.eventBytes)
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
// steps, so that one range deletion covers many revisions. It keeps
// logChainSpan revisions below the oldest retained one, which the chains of
// retained entries may reach (logchain.go), and records the oldest
// retained one with the deletion. e.revMu is held.
func (e *Engine) pruneLog() {
	const pruneStep = 1024
	keep := e.rev - e.opts.LogRetention + 1
	if keep-e.oldest.Load() < pruneStep || e.err() != nil {
		return
	}
	// Watchers learn of the pruning before it happens, so none reads a
	// partly pruned range and takes it for complete.
	e.oldest.Store(keep)
	floor := max(keep-logChainSpan, e.logFloor)
	b := e.db.NewBatch()
	defer b.Close()
	err := b.Set(keyLogOldest, appendUint64(nil, uint64(keep)), nil)
	if err == nil && floor > e.logFloor {
		err = b.DeleteRange(logKey(e.logFloor), logKey(floor), nil)
	}
	if err == nil {
		// Not synced: a crash that loses it leaves a longer log, and the
		// oldest revision it had before.
		err = b.Commit(pebble.NoSync)
	}
	if err != nil {
		e.opts.Logger.Error("pruning the watch log failed", "err", err)
		return
	}
	e.logFloor = floor
}

// twinsAdded returns how the change changes the number of twins: 1 for a
// creation, -1 for a deletion.
func (c *change) twinsAdded() int64 {
	switch {
	case c.prev == nil && c.next != nil:
		return 1
	case c.prev != nil && c.next == nil:
		return -1
	}
	return 0
}

// writeCommands adds a device's written commands to b.
func writeCommands(b writer, vs uint16, id string, cmds []*Command) error {
	for _, cmd := range cmds {
		v, err := encodeCommand(cmd)
		if err != nil {
			return err
		}
		if err := b.Set(commandKey(vs, id, cmd.Seq), v, nil); err != nil {
			return err
		}
		if cmd.State.Final() {
			err = b.Delete(openKey(vs, id, cmd.Seq), nil)
		} else {
			err = b.Set(openKey(vs, id, cmd.Seq), appendUint64(nil, uint64(cmd.ExpireTime.UnixNano())), nil)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
