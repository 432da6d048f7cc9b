package twin

import (
	"bytes"
	"container/heap"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// Sink receives what a connected device must be told. The engine calls it
// from its own goroutines, after the change concerned is durable and in
// commit order; its methods must not block. A sink that cannot keep up
// closes its stream rather than wait.
type Sink interface {
	// Welcome is the first call: the twin as of the connection, and the
	// device's unfinished commands in order.
	Welcome(t *Twin, cmds []*Command)
	// DesiredChanged says that desired state changed by patch.
	DesiredChanged(t *Twin, patch Document)
	// Commands delivers new commands, or commands whose state an operator
	// changed (canceled).
	Commands(cmds []*Command)
	// Close ends the stream: a newer stream replaced it, or the twin was
	// deleted.
	Close(err error)
}

// ErrReplaced is given to a Sink's Close when a newer stream of the same
// device replaces it.
var ErrReplaced = fmt.Errorf("twin: replaced by a newer stream of the same device")

// ErrTokenRevoked is given to a Sink's Close when the device's token was
// replaced (SetTokenHash): the stream authenticated with the old one.
var ErrTokenRevoked = fmt.Errorf("twin: the device token this stream authenticated with was revoked")

// ErrStreamClosed answers a report whose stream (PatchRequest.Stream) is no
// longer the device's current stream.
var ErrStreamClosed = fmt.Errorf("twin: the stream is no longer the device's current stream")

// Connect registers sink as the device's stream, replacing (and closing) any
// previous one, and marks the twin connected. The sink is welcomed once the
// change is durable.
func (e *Engine) Connect(ctx context.Context, id string, sink Sink) (*Twin, error) {
	return e.do(ctx, &op{kind: opConnect, id: id, sink: sink})
}

// ConnectWithToken is Connect for a stream authenticated with a device
// token: it registers sink only if the token's hash is still the twin's,
// and fails with ErrTokenRevoked otherwise. The check is made in the
// worker, in order with token rotations, so that a stream authenticated
// just before IssueDeviceToken replaced the token is refused rather than
// welcomed after it.
func (e *Engine) ConnectWithToken(ctx context.Context, id string, tokenHash []byte, sink Sink) (*Twin, error) {
	if tokenHash == nil {
		return nil, fmt.Errorf("%w: no token hash", ErrInvalidArgument)
	}
	return e.do(ctx, &op{kind: opConnect, id: id, sink: sink, token: tokenHash})
}

// Disconnect unregisters sink, if it is still the device's stream, and
// marks the twin disconnected.
func (e *Engine) Disconnect(ctx context.Context, id string, sink Sink) error {
	_, err := e.do(ctx, &op{kind: opDisconnect, id: id, sink: sink})
	return err
}

// presence applies a connect or disconnect.
func (w *worker) presence(c *change, cur *Twin, o *op, now time.Time) *Twin {
	if o.kind == opDisconnect {
		if c.sink != o.sink {
			c.sink = nil
			return cur // a newer stream took over; it owns presence
		}
		delete(w.sinks, o.id)
		c.sink = nil
		next := cur.clone()
		lastSeen := now
		if o.sink == nil {
			// Lost in a restart: last seen before it.
			lastSeen = cur.Presence.LastSeen
		}
		next.Presence = Presence{Connected: false, Since: now, LastSeen: lastSeen}
		return next
	}
	if c.sink != nil {
		c.replaced, c.closeErr = c.sink, ErrReplaced
	}
	delete(w.lost, o.id) // back after a restart
	w.sinks[o.id] = o.sink
	c.sink, c.welcome = o.sink, true
	next := cur.clone()
	next.Presence = Presence{Connected: true, Since: now, LastSeen: now}
	// Everything unfinished goes (again) to the new stream, in order.
	for _, cmd := range w.cmdsOf(o.id).open() {
		if cmd.State == CommandQueued {
			cmd = cmd.clone()
			cmd.State, cmd.UpdateTime = CommandSent, now
			w.putCommand(c, cmd, true)
			continue
		}
		c.deliver = append(c.deliver, cmd)
	}
	return next
}

// sendCommand queues a command.
func (w *worker) sendCommand(c *change, cur *Twin, req *CommandRequest, now time.Time) (*Twin, error) {
	l := w.cmdsOf(cur.ID)
	if req.RequestID != "" && l != nil {
		for _, cmd := range l.cmds {
			if cmd.RequestID != req.RequestID {
				continue
			}
			if cmd.Name != req.Name || !jsonEqual(map[string]any(cmd.Params), map[string]any(req.Params)) {
				return nil, fmt.Errorf("%w: request_id %q was used for another command (%s, %s); use a new request_id for a different command",
					ErrAlreadyExists, req.RequestID, cmd.ID, cmd.Name)
			}
			c.cmd = cmd
			return cur, nil
		}
	}
	if req.Source.IsRule() {
		// An operator's command was checked before it was queued; a rule
		// computes its params here.
		if err := w.e.opts.Limits.checkCommandDoc(req.Params, "params"); err != nil {
			return nil, err
		}
	}
	if n := len(l.open()); n >= w.e.opts.CommandQueueLimit {
		return nil, fmt.Errorf("%w: device %q has %d unfinished commands, the most its queue holds; wait for some to finish or cancel them",
			ErrOverloaded, cur.ID, n)
	}
	next := cur.clone()
	next.CommandSeq++
	cmd := &Command{
		ID:         CommandID(cur.ID, next.CommandSeq),
		DeviceID:   cur.ID,
		Seq:        next.CommandSeq,
		Name:       req.Name,
		Params:     req.Params,
		State:      CommandQueued,
		Source:     req.Source,
		RequestID:  req.RequestID,
		TTL:        req.TTL,
		CreateTime: now,
		UpdateTime: now,
		ExpireTime: now.Add(req.TTL),
	}
	if c.sink != nil {
		cmd.State = CommandSent
	}
	w.putCommand(c, cmd, c.sink != nil)
	w.expiries.add(cmd)
	return next, nil
}

// updateCommand applies a device's report of a command's progress.
func (w *worker) updateCommand(c *change, cur *Twin, u *CommandUpdate, now time.Time) error {
	dev, seq, err := ParseCommandID(u.ID)
	if err != nil {
		return err
	}
	if u.Stream != nil && u.Stream != c.sink {
		return fmt.Errorf("%w: device %q", ErrStreamClosed, cur.ID)
	}
	if dev != cur.ID {
		return fmt.Errorf("%w: command %q is not one of device %q", ErrInvalidArgument, u.ID, cur.ID)
	}
	_, cmd := w.cmdsOf(cur.ID).find(seq)
	if cmd == nil {
		return fmt.Errorf("%w: command %q does not exist", ErrNotFound, u.ID)
	}
	if cmd.State == u.State && cmd.State == CommandAccepted {
		c.cmd = cmd
		return nil // a repeated accept
	}
	if !validTransition(cmd.State, u.State) {
		return fmt.Errorf("%w: command %q is %s and cannot become %s", ErrVersionMismatch, u.ID, cmd.State, u.State)
	}
	cmd = cmd.clone()
	cmd.State, cmd.Result, cmd.Message, cmd.UpdateTime = u.State, u.Result, u.Message, now
	w.putCommand(c, cmd, false)
	return nil
}

// finishCommand moves an unfinished command to a final state chosen by the
// server: canceled or expired.
func (w *worker) finishCommand(c *change, seq int64, state CommandState, msg string, now time.Time) error {
	id := CommandID(c.op.id, seq)
	_, cmd := w.cmdsOf(c.op.id).find(seq)
	if cmd == nil {
		return fmt.Errorf("%w: command %q does not exist", ErrNotFound, id)
	}
	if cmd.State.Final() {
		return fmt.Errorf("%w: command %q already finished (%s) and cannot be %s; only QUEUED, SENT or ACCEPTED commands can",
			ErrFinished, id, cmd.State, strings.ToLower(state.String()))
	}
	cmd = cmd.clone()
	cmd.State, cmd.Message, cmd.UpdateTime = state, msg, now
	// A canceled command goes to the device, which may stop working on it.
	w.putCommand(c, cmd, state == CommandCanceled && c.sink != nil)
	return nil
}

// putCommand is the one place where a change adds or changes a command of
// its device: it updates the device's working command list (pruning the
// oldest finished commands beyond the retention) and records, in the
// change, the command to store, the pruned ones to delete and, if deliver,
// the command to send to the device's stream once durable. A change may
// carry any number of commands: a connect's redelivered backlog, every
// command of every rule that fired, an operator's command.
func (w *worker) putCommand(c *change, cmd *Command, deliver bool) {
	l := c.cmds
	if l == nil {
		l = w.cmdsOf(cmd.DeviceID)
	}
	l = l.with(cmd)
	var dropped []int64
	l, dropped = l.prune(w.e.opts.CommandRetention)
	c.cmds = l
	w.cache.m[cmd.DeviceID].cmds = l
	c.dropCmds = append(c.dropCmds, dropped...)
	c.writeCmds = append(c.writeCmds, cmd)
	if deliver {
		c.deliver = append(c.deliver, cmd)
	}
	c.cmd = cmd
	if cmd.State.Final() {
		w.expiries.remove(cmd)
	}
}

// expireDue expires the open commands whose ttl has passed, one change per
// device, and returns those changes.
func (w *worker) expireDue(now time.Time) []*change {
	var out []*change
	byDevice := map[string]*change{}
	for w.expiries.Len() > 0 && !w.expiries.next().at.After(now) {
		x := heap.Pop(&w.expiries).(expiry).key
		cur := w.current(x.device)
		if cur == nil {
			continue
		}
		_, cmd := w.cmdsOf(x.device).find(x.seq)
		if cmd == nil || cmd.State.Final() || cmd.ExpireTime.After(now) {
			continue // cannot happen: finished commands leave the heap
		}
		c := byDevice[x.device]
		if c == nil {
			o := &op{kind: opExpire, id: x.device, done: make(chan Result, 1)}
			c = &change{op: o, prev: cur, next: cur, sink: w.sinks[x.device]}
			byDevice[x.device] = c
			out = append(out, c)
		}
		w.finishCommand(c, x.seq, CommandExpired, fmt.Sprintf("ttl of %v passed before the command finished", cmd.TTL), now)
	}
	return out
}

// SendCommand queues a command for a device. It returns the command as
// queued, or the existing command for a repeated RequestID.
func (e *Engine) SendCommand(ctx context.Context, req CommandRequest) (*Command, error) {
	if !namePattern.MatchString(req.Name) {
		return nil, fmt.Errorf("%w: command name %.40q must be 1 to 128 characters of [A-Za-z0-9._:-]", ErrInvalidArgument, req.Name)
	}
	if len(req.RequestID) > 128 {
		return nil, fmt.Errorf("%w: request_id is %d bytes, at most 128", ErrInvalidArgument, len(req.RequestID))
	}
	switch {
	case req.TTL < 0:
		return nil, fmt.Errorf("%w: ttl is negative", ErrInvalidArgument)
	case req.TTL == 0:
		req.TTL = e.opts.DefaultCommandTTL
	case req.TTL > e.opts.MaxCommandTTL:
		return nil, fmt.Errorf("%w: ttl %v is over the maximum of %v", ErrInvalidArgument, req.TTL, e.opts.MaxCommandTTL)
	}
	if err := e.opts.Limits.checkCommandDoc(req.Params, "params"); err != nil {
		return nil, err
	}
	if req.Source == "" {
		req.Source = SourceAPI
	}
	o := &op{kind: opSendCommand, id: req.DeviceID, cmdReq: &req}
	r, err := e.submit(ctx, o)
	return r.Command, err
}

// UpdateCommand applies a device's report of a command's progress.
func (e *Engine) UpdateCommand(ctx context.Context, deviceID string, u CommandUpdate) (*Command, error) {
	if u.State < CommandAccepted || u.State > CommandRejected {
		return nil, fmt.Errorf("%w: a device may set a command ACCEPTED, SUCCEEDED, FAILED or REJECTED, not %s", ErrInvalidArgument, u.State)
	}
	if err := e.opts.Limits.checkCommandDoc(u.Result, "result"); err != nil {
		return nil, err
	}
	if n := len(u.Message); n > e.opts.Limits.MaxMessageBytes {
		return nil, fmt.Errorf("%w: message is %d bytes, over the limit of %d bytes", ErrLimit, n, e.opts.Limits.MaxMessageBytes)
	}
	o := &op{kind: opUpdateCommand, id: deviceID, cmdUpd: &u}
	r, err := e.submit(ctx, o)
	return r.Command, err
}

// CancelCommand cancels an unfinished command.
func (e *Engine) CancelCommand(ctx context.Context, id string) (*Command, error) {
	return e.CancelCommandBy(ctx, id, SourceAPI)
}

// CancelCommandBy is CancelCommand; the command's message names source
// unless it is SourceAPI ("canceled by key:ops").
func (e *Engine) CancelCommandBy(ctx context.Context, id string, source Source) (*Command, error) {
	dev, seq, err := ParseCommandID(id)
	if err != nil {
		return nil, err
	}
	o := &op{kind: opCancelCommand, id: dev, seq: seq, source: source}
	r, err := e.submit(ctx, o)
	return r.Command, err
}

// GetCommand returns the committed state of a command.
func (e *Engine) GetCommand(id string) (*Command, error) {
	dev, seq, err := ParseCommandID(id)
	if err != nil {
		return nil, err
	}
	l, err := e.durableCommands(dev)
	if err != nil {
		return nil, err
	}
	_, cmd := l.find(seq)
	if cmd == nil {
		return nil, fmt.Errorf("%w: command %q does not exist", ErrNotFound, id)
	}
	return cmd, nil
}

// ListCommands returns up to limit of a device's retained commands with
// sequence after `after`, oldest first, whose state is one of states (any if
// empty). more reports whether more follow.
func (e *Engine) ListCommands(deviceID string, states []CommandState, after int64, limit int) (cmds []*Command, more bool, err error) {
	if _, err := e.Get(deviceID); err != nil {
		return nil, false, err
	}
	l, err := e.durableCommands(deviceID)
	if err != nil || l == nil {
		return nil, false, err
	}
	for _, c := range l.cmds {
		if c.Seq <= after || (len(states) > 0 && !slices.Contains(states, c.State)) {
			continue
		}
		if len(cmds) == limit {
			return cmds, true, nil
		}
		cmds = append(cmds, c)
	}
	return cmds, false, nil
}

// WaitCommand waits until a command reaches a final state, or ctx is done,
// and returns the command as it then is.
func (e *Engine) WaitCommand(ctx context.Context, id string) (*Command, error) {
	ch := make(chan *Command, 1)
	e.waitMu.Lock()
	e.waiters[id] = append(e.waiters[id], ch)
	e.waitMu.Unlock()
	defer func() {
		e.waitMu.Lock()
		e.waiters[id] = slices.DeleteFunc(e.waiters[id], func(c chan *Command) bool { return c == ch })
		if len(e.waiters[id]) == 0 {
			delete(e.waiters, id)
		}
		e.waitMu.Unlock()
	}()
	cmd, err := e.GetCommand(id)
	if err != nil || cmd.State.Final() {
		return cmd, err
	}
	select {
	case cmd := <-ch:
		if cmd == nil {
			return nil, fmt.Errorf("%w: command %q was deleted with its twin", ErrNotFound, id)
		}
		return cmd, nil
	case <-ctx.Done():
		return e.GetCommand(id)
	case <-e.done:
		return e.GetCommand(id)
	}
}

// notifyCommand wakes the waiters of a command that reached a final state.
// A nil cmd says the command no longer exists.
func (e *Engine) notifyCommand(id string, cmd *Command) {
	e.waitMu.Lock()
	defer e.waitMu.Unlock()
	for _, ch := range e.waiters[id] {
		select {
		case ch <- cmd:
		default:
		}
	}
}

// lostDevices marks disconnected the devices that were connected when the
// process last stopped and have not connected again within the grace
// period, each as a presence change of its own, so that rules watching
// presence see them go. It returns those changes.
func (w *worker) lostDevices(ev Evaluator, now time.Time) []*change {
	if len(w.lost) == 0 || now.Before(w.lostAt) {
		return nil
	}
	var out []*change
	for id := range w.lost {
		delete(w.lost, id)
		cur := w.current(id)
		if cur == nil || !cur.Presence.Connected || w.sinks[id] != nil {
			continue
		}
		c, err := w.apply(&op{kind: opDisconnect, id: id, done: make(chan Result, 1)}, now)
		if err != nil {
			continue // cannot happen: the twin exists
		}
		out = append(out, c)
		if ev != nil && c.event != nil {
			out = append(out, w.runRules(ev, c, now, false)...)
		}
	}
	return out
}

// cmdsOf returns the retained commands of a device whose twin the worker
// read into its cache in this step.
func (w *worker) cmdsOf(id string) *commandList { return w.cache.m[id].cmds }

// durableCommands returns a device's retained commands as durable: from
// its worker's cache, or else from the worker's durable snapshot.
func (e *Engine) durableCommands(id string) (*commandList, error) {
	return readDurable(e, id, durableCommandList, readCommandList)
}

func durableCommandList(ent *entry) *commandList { return ent.durableCmds }

// readCommandList reads a device's retained commands from a store or
// snapshot.
func readCommandList(r pebble.Reader, vs uint16, id string) (*commandList, error) {
	it, err := r.NewIter(nil)
	if err != nil {
		return nil, err
	}
	l, _, err := readCommands(it, vs, id)
	return l, errors.Join(err, it.Close())
}

// readCommands reads a device's retained commands, in sequence order, and
// returns them (nil if none) with their encoded size.
func readCommands(it *pebble.Iterator, vs uint16, id string) (*commandList, int, error) {
	p := commandPrefix(vs, id)
	var l *commandList
	size := 0
	for ok := it.SeekGE(p); ok && bytes.HasPrefix(it.Key(), p); ok = it.Next() {
		cmd, err := decodeCommand(it.Value())
		if err != nil {
			return nil, 0, fmt.Errorf("%w (key %q)", err, it.Key())
		}
		if l == nil {
			l = &commandList{}
		}
		l.cmds = append(l.cmds, cmd)
		size += len(it.Value())
	}
	return l, size, it.Error()
}
