package twin

import (
	"container/heap"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// CommandState is where a command is in its life:
// Queued -> Sent -> Accepted -> Succeeded | Failed | Rejected, or Expired
// (its ttl passed first) or Canceled. The numbers match the API's.
type CommandState uint8

// Command states.
const (
	CommandQueued CommandState = iota + 1
	CommandSent
	CommandAccepted
	CommandSucceeded
	CommandFailed
	CommandRejected
	CommandExpired
	CommandCanceled
)

var commandStateNames = [...]string{"", "QUEUED", "SENT", "ACCEPTED", "SUCCEEDED", "FAILED", "REJECTED", "EXPIRED", "CANCELED"}

func (s CommandState) String() string {
	if int(s) < len(commandStateNames) && s > 0 {
		return commandStateNames[s]
	}
	return fmt.Sprintf("CommandState(%d)", uint8(s))
}

// Final reports whether a command in state s is done.
func (s CommandState) Final() bool { return s >= CommandSucceeded }

// Command is one instruction to one device. Commands handed out by this
// package are immutable snapshots.
type Command struct {
	ID         string        `json:"id"`
	DeviceID   string        `json:"device_id"`
	Seq        int64         `json:"seq"`
	Name       string        `json:"name"`
	Params     Document      `json:"params,omitempty"`
	State      CommandState  `json:"state"`
	Result     Document      `json:"result,omitempty"`
	Message    string        `json:"message,omitempty"`
	Source     Source        `json:"source,omitempty"`
	RequestID  string        `json:"request_id,omitempty"`
	TTL        time.Duration `json:"ttl"`
	CreateTime time.Time     `json:"create_time"`
	UpdateTime time.Time     `json:"update_time"`
	ExpireTime time.Time     `json:"expire_time"`
}

// CommandID returns the id of a device's command: the device id, "~", and
// the command's sequence number on that device, which never repeats.
func CommandID(deviceID string, seq int64) string {
	return deviceID + "~" + strconv.FormatInt(seq, 10)
}

// ParseCommandID splits a command id into its device id and sequence.
func ParseCommandID(id string) (deviceID string, seq int64, err error) {
	i := strings.LastIndexByte(id, '~')
	if i < 0 {
		return "", 0, fmt.Errorf("%w: command id %.60q is not of the form <device_id>~<number>", ErrInvalidArgument, id)
	}
	seq, err = strconv.ParseInt(id[i+1:], 10, 64)
	// One command, one id: "car-1~01" is not "car-1~1".
	if err != nil || seq <= 0 || strconv.FormatInt(seq, 10) != id[i+1:] || ValidateID(id[:i]) != nil {
		return "", 0, fmt.Errorf("%w: command id %.60q is not of the form <device_id>~<number>", ErrInvalidArgument, id)
	}
	return id[:i], seq, nil
}

var namePattern = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)

// CommandRequest asks for a command to be sent to a device.
type CommandRequest struct {
	DeviceID string
	Name     string
	Params   Document
	// TTL is how long the command may wait for a final state; 0 means the
	// engine's default.
	TTL time.Duration
	// RequestID, if set, makes the request idempotent: a second request
	// with the same device and RequestID returns the first command.
	RequestID string
	Source    Source
}

// CommandUpdate is a device's report of a command's progress.
type CommandUpdate struct {
	ID      string
	State   CommandState
	Result  Document
	Message string
	// Stream, if set, is the device stream the update came from: it
	// applies only while that stream is the device's current one, as
	// PatchRequest.Stream.
	Stream Sink
}

// commandList is the immutable list of a device's retained commands, by
// sequence.
type commandList struct {
	cmds []*Command
}

func (l *commandList) find(seq int64) (int, *Command) {
	if l == nil {
		return -1, nil
	}
	i, ok := slices.BinarySearchFunc(l.cmds, seq, func(c *Command, s int64) int {
		return int(min(max(c.Seq-s, -1), 1))
	})
	if !ok {
		return -1, nil
	}
	return i, l.cmds[i]
}

func (l *commandList) open() []*Command {
	if l == nil {
		return nil
	}
	var out []*Command
	for _, c := range l.cmds {
		if !c.State.Final() {
			out = append(out, c)
		}
	}
	return out
}

// with returns a copy of l with c replacing the command of the same
// sequence, or appended.
func (l *commandList) with(c *Command) *commandList {
	var cmds []*Command
	if l != nil {
		cmds = l.cmds
	}
	if i, _ := l.find(c.Seq); i >= 0 {
		cmds = slices.Clone(cmds)
		cmds[i] = c
	} else {
		cmds = append(slices.Clip(cmds), c)
	}
	return &commandList{cmds: cmds}
}

// prune drops the oldest final commands beyond keep and returns the new
// list and the dropped sequences.
func (l *commandList) prune(keep int) (*commandList, []int64) {
	final := 0
	for _, c := range l.cmds {
		if c.State.Final() {
			final++
		}
	}
	if final <= keep {
		return l, nil
	}
	drop := final - keep
	var dropped []int64
	out := make([]*Command, 0, len(l.cmds)-drop)
	for _, c := range l.cmds {
		if drop > 0 && c.State.Final() {
			dropped = append(dropped, c.Seq)
			drop--
			continue
		}
		out = append(out, c)
	}
	return &commandList{cmds: out}, dropped
}

func (c *Command) clone() *Command {
	n := *c
	return &n
}

// validTransition reports whether a device may move a command from one
// state to another.
func validTransition(from, to CommandState) bool {
	if from.Final() {
		return false
	}
	switch to {
	case CommandAccepted:
		return from != CommandAccepted
	case CommandSucceeded, CommandFailed, CommandRejected:
		return true
	}
	return false
}

// expiry is one entry of a worker's expiry heap: an open command of a
// device and when it expires.
type expiry struct {
	at  time.Time
	key expiryKey
}

type expiryKey struct {
	device string
	seq    int64
}

// expiryHeap orders the open commands of a worker by expiry time. It holds
// exactly one entry per open command: a command that finishes, or whose
// device is deleted, leaves it at once, so the heap never outgrows the open
// commands.
type expiryHeap struct {
	h   []expiry
	pos map[expiryKey]int // the index in h of each command's entry
}

func (h *expiryHeap) Len() int           { return len(h.h) }
func (h *expiryHeap) Less(i, j int) bool { return h.h[i].at.Before(h.h[j].at) }
func (h *expiryHeap) Swap(i, j int) {
	h.h[i], h.h[j] = h.h[j], h.h[i]
	h.pos[h.h[i].key] = i
	h.pos[h.h[j].key] = j
}
func (h *expiryHeap) Push(x any) {
	e := x.(expiry)
	h.pos[e.key] = len(h.h)
	h.h = append(h.h, e)
}
func (h *expiryHeap) Pop() any {
	x := h.h[len(h.h)-1]
	h.h = h.h[:len(h.h)-1]
	delete(h.pos, x.key)
	return x
}

// next returns the earliest entry; the heap must not be empty.
func (h *expiryHeap) next() expiry { return h.h[0] }

// add schedules an open command's expiry, or reschedules it.
func (h *expiryHeap) add(c *Command) { h.addAt(c.DeviceID, c.Seq, c.ExpireTime) }

// addAt schedules the expiry of a device's open command at a time, or
// reschedules it.
func (h *expiryHeap) addAt(device string, seq int64, at time.Time) {
	if h.pos == nil {
		h.pos = map[expiryKey]int{}
	}
	k := expiryKey{device, seq}
	if i, ok := h.pos[k]; ok {
		h.h[i].at = at
		heap.Fix(h, i)
		return
	}
	heap.Push(h, expiry{at: at, key: k})
}

// remove drops a command's entry, if it has one.
func (h *expiryHeap) remove(c *Command) {
	if i, ok := h.pos[expiryKey{c.DeviceID, c.Seq}]; ok {
		heap.Remove(h, i)
	}
}
