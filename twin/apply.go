package twin

import (
	"crypto/subtle"
	"fmt"
	"time"
)

// apply computes the change an op makes and applies it to the working
// state. A change with no event changes nothing durable about the twin but
// must still wait for the commit of the changes before it.
func (w *worker) apply(o *op, now time.Time) (*change, error) {
	ent, err := w.entry(o.id)
	if err != nil {
		return nil, err
	}
	cur := ent.work
	if cur == nil && o.kind != opCreate {
		return nil, notFound(o.id)
	}
	c := &change{op: o, prev: cur, sink: w.sinks[o.id]}
	var (
		next   *Twin
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
		next, err = w.e.apply.create(o.create, ent.gone.version, now)
		if err == nil {
			next.CommandSeq = ent.gone.cmdSeq
		}
		kind, source = KindCreated, o.create.Source
	case opReport, opDesired:
		desired := o.kind == opDesired
		if o.patch.Stream != nil && o.patch.Stream != c.sink {
			return nil, fmt.Errorf("%w: device %q", ErrStreamClosed, o.id)
		}
		if o.patch.TokenHash != nil && subtle.ConstantTimeCompare(cur.TokenHash, o.patch.TokenHash) != 1 {
			return nil, fmt.Errorf("%w: the token is not device %q's token (any more); report with the current one", ErrTokenRevoked, o.id)
		}
		next, err = w.e.apply.patch(cur, o.patch, desired, now)
		kind, patch, source = KindReported, o.patch.Patch, o.patch.Source
		if desired {
			kind = KindDesired
		} else if err == nil && !o.patch.Source.IsRule() {
			// A report is what the device said, whoever carried it (its
			// stream, ReportState with its token or with an API key).
			if next == cur {
				// Nothing changed but when the device was last seen:
				// that goes to a small key of its own (seenKey).
				next = cur.clone()
				c.seenOnly = true
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
		kind, source = KindDeleted, o.sourceOr(SourceAPI)
		if l := ent.cmds; l != nil {
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
			kind, source, emit = KindPresence, o.sourceOr(SourceAPI), true
		}
	case opConnect, opDisconnect:
		if o.kind == opConnect && o.token != nil && subtle.ConstantTimeCompare(cur.TokenHash, o.token) != 1 {
			return nil, fmt.Errorf("%w: device %q has another token now; connect with the new one", ErrTokenRevoked, o.id)
		}
		next = w.presence(c, cur, o, now)
		kind, source, emit = KindPresence, SourceDevice, next != cur
	case opSendCommand:
		next, err = w.sendCommand(c, cur, o.cmdReq, now)
	case opUpdateCommand:
		err = w.updateCommand(c, cur, o.cmdUpd, now)
		next = cur
	case opCancelCommand:
		msg := "canceled by an operator"
		if o.source != "" && o.source != SourceAPI {
			msg = "canceled by " + string(o.source)
		}
		err = w.finishCommand(c, o.seq, CommandCanceled, msg, now)
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
	ent.work = next
	w.touch(ent)
	if next == nil {
		ent.cmds = nil
		ent.gone, ent.states, ent.statesLoaded = c.gone, nil, true
	} else if cur == nil {
		ent.states, ent.statesLoaded = nil, true // a new twin has none
	}
	if c.cmds != nil && next != nil {
		ent.cmds = c.cmds
	}
	return c, nil
}
