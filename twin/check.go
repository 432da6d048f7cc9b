package twin

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// Violation is one broken invariant of a store, as Check finds it.
type Violation struct {
	// Key is the key at fault.
	Key []byte
	// Problem says what is wrong with it.
	Problem string
}

// String names the key in a readable form (see encoding.go for the layout)
// and says what is wrong with it.
func (v Violation) String() string { return keyString(v.Key) + ": " + v.Problem }

// Check reads the whole store in opts.Dir on opts.FS and returns every
// violation of the store's invariants that it finds, each naming its key:
//
//   - no twin's revision is ahead of the watch log's last revision, and the
//     log entry of a twin's revision, while retained, is that twin at its
//     version;
//   - each history entry is of a twin that exists, at a version no newer
//     than the twin's and within the history limit (see below), and
//     points at a revision of the watch log that is that twin at that
//     version (or that the log has pruned); a twin's history has no gaps, has
//     its current version, and holds nothing from before the twin was last
//     created;
//   - each command is of a twin that exists, under the twin's id and with a
//     sequence no higher than the twin's last command sequence;
//   - each rule state is of a twin that exists;
//   - a twin has a presence mark if and only if it is connected, and a
//     pending mark if and only if one of its rule states waits for a
//     hold_for;
//   - a shard's twin count, where the store keeps one, is its number of
//     twins;
//   - each index entry is of a twin that exists and has that type or
//     label, and, once the store records its index complete, each twin
//     has an index entry for its type and for each of its labels;
//   - every key is one of the layout's, in the virtual shard of its twin,
//     and its value decodes (in either store format: a store of format 1
//     whose conversion was interrupted holds both); in a store of format 2,
//     no value is left in the JSON of format 1.
//
// The history limit is opts.HistoryLimit if set. If not, it is the largest
// history limit the store was ever opened with, as the store records it
// (or the default, 100, for a store that does not): a twin keeps history
// beyond a lowered limit until its next change.
//
// Check opens the store read-only and needs it to itself: it fails while a
// twind or an Engine has it open. It uses opts.Dir, opts.FS, opts.Logger
// and opts.HistoryLimit (with their defaults), and changes nothing. The error
// is for a store it cannot read at all; a store it can read is reported on
// through the violations.
func Check(opts Options) ([]Violation, error) {
	historyLimit := opts.HistoryLimit
	opts.EnsureDefaults()
	if _, err := opts.FS.Stat(opts.Dir); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("twin: no store in %s: the directory does not exist", opts.Dir)
	}
	db, err := pebble.Open(opts.Dir, &pebble.Options{
		FS:       opts.FS,
		ReadOnly: true,
		Logger:   pebbleLogger{opts.Logger},
	})
	if errors.Is(err, pebble.ErrDBDoesNotExist) {
		return nil, fmt.Errorf("twin: no store in %s", opts.Dir)
	}
	if err != nil {
		return nil, fmt.Errorf("twin: open store in %s read-only (if a twind is using it, stop it first): %w", opts.Dir, err)
	}
	defer db.Close()
	c := &checker{db: db, historyLimit: int64(historyLimit), defaultHistoryLimit: int64(opts.HistoryLimit)}
	err = c.run()
	slices.SortStableFunc(c.out, func(a, b Violation) int { return bytes.Compare(a.Key, b.Key) })
	return c.out, err
}

// checker is the state of one Check.
type checker struct {
	db pebble.Reader
	// historyLimit is the one to check; 0 until run reads it from the
	// store, or defaultHistoryLimit if the store does not record it.
	historyLimit, defaultHistoryLimit int64
	vshards                           int
	// format is the store's format: 1 holds JSON values, 2 binary ones;
	// a store of format 1 that Open began to convert holds both.
	format int
	// oldest and last are the watch log's first and last revisions;
	// heads, if not empty, what the checker needs of each, by revision
	// from oldest.
	oldest, last int64
	heads        []logHead
	out          []Violation

	// The virtual shard being checked and its twins, by id; counted says
	// it has a twin count, as every shard of a store upgraded for the twin
	// cache does (and with it open-command marks).
	counted bool
	vs      int
	twins   map[string]*checkedTwin
	hist    historyRun
	// indexed says that the store records its index complete (m/index).
	indexed bool
}

// checkedTwin is what the checker knows of one twin record.
type checkedTwin struct {
	key     []byte
	deleted bool
	version int64
	cmdSeq  int64
	// lastHist is the version of the twin's newest history entry.
	lastHist int64
	// connected says the twin's device is connected; marked that its
	// presence mark was found.
	connected, marked bool
	// open holds the twin's commands that are not finished, by sequence,
	// with their expiry, until their open-command marks are found.
	open map[int64]time.Time
	// pending says a rule state of the twin waits for a hold_for;
	// pendingMarked that its pending mark was found.
	pending, pendingMarked bool
	// typ and labels are the twin's; typeIndexed says its type index
	// entry was found, unindexed holds the labels whose entry was not.
	typ         string
	labels      map[string]string
	typeIndexed bool
	unindexed   map[string]string
}

// historyRun is the history entries of one twin, which are adjacent in key
// order: the checker holds one twin's at a time.
type historyRun struct {
	id      string
	t       *checkedTwin
	vers    []int64
	keys    [][]byte
	created int64 // the version of the newest creation among them, or 0
}

func (c *checker) add(key []byte, format string, args ...any) {
	c.out = append(c.out, Violation{Key: append([]byte(nil), key...), Problem: fmt.Sprintf(format, args...)})
}

func (c *checker) run() error {
	v, closer, err := c.db.Get(keyFormat)
	if errors.Is(err, pebble.ErrNotFound) {
		c.add(keyFormat, "the store format is missing; this is not a twind store, or it was never initialized")
		return nil
	}
	if err != nil {
		return fmt.Errorf("twin: read store format: %w", err)
	}
	var f storeFormat
	err = json.Unmarshal(v, &f)
	closer.Close()
	if err != nil || f.VShards <= 0 || f.VShards > 1<<16 || f.Format < 1 || f.Format > formatVersion {
		c.add(keyFormat, "store format %q is not valid (want format 1 to %d and 1 to 65536 vshards); nothing else can be checked", v, formatVersion)
		return nil
	}
	c.vshards, c.format = f.VShards, f.Format
	if c.historyLimit <= 0 {
		c.historyLimit = int64(f.MaxHistoryLimit)
	}
	if c.historyLimit <= 0 {
		c.historyLimit = c.defaultHistoryLimit
	}
	if _, closer, err := c.db.Get(keyIndex); err == nil {
		closer.Close()
		c.indexed = true
	}
	if err := c.checkLog(); err != nil {
		return err
	}
	return c.checkKeys()
}

// checkLog reads the watch log's bounds and checks its entries.
func (c *checker) checkLog() error {
	it, err := c.db.NewIter(&pebble.IterOptions{LowerBound: prefixLog, UpperBound: prefixEnd(prefixLog)})
	if err != nil {
		return err
	}
	defer it.Close()
	revOf := func(k []byte) (int64, bool) {
		if len(k) != len(prefixLog)+8 {
			return 0, false
		}
		return int64(binary.BigEndian.Uint64(k[len(prefixLog):])), true
	}
	if it.Last() {
		if last, ok := revOf(it.Key()); ok && it.First() {
			if first, ok := revOf(it.Key()); ok && last-first < maxCachedLog {
				c.heads = make([]logHead, last-first+1)
			}
		}
	}
	// The oldest revision watchers may resume from (logchain.go): as
	// pruning recorded it, or the log's first.
	var servable int64
	if v, closer, err := c.db.Get(keyLogOldest); err == nil {
		if len(v) == 8 {
			servable = int64(binary.BigEndian.Uint64(v))
		} else {
			c.add(keyLogOldest, "the oldest revision must be 8 bytes, not %d", len(v))
		}
		closer.Close()
	}
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		rev, ok := revOf(k)
		if !ok {
			c.add(k, "a watch log key must be l/ and an 8-byte revision")
			continue
		}
		if c.oldest == 0 {
			c.oldest = rev
		}
		c.last = rev
		ev, err := decodeEventHead(it.Value())
		if err != nil {
			c.add(k, "the event does not decode: %v", err)
			continue
		}
		c.checkEncoding(k, it.Value())
		if ev.Revision != rev {
			c.add(k, "the event says revision %d", ev.Revision)
		}
		h := logHead{id: ev.TwinID, version: ev.Version, kind: ev.Kind, previous: ev.Previous, base: rev, ok: true}
		if ev.Previous != 0 {
			// A change: its chain goes back to a whole twin
			// (logchain.go), within the log for every revision
			// watchers may resume from.
			h.base = 0
			switch {
			case ev.Previous >= rev:
				c.add(k, "the change applies to revision %d, not an earlier one", ev.Previous)
			case ev.Previous < c.oldest:
				if rev >= servable {
					c.add(k, "the change applies to revision %d, below the watch log's first entry %d: watchers that resume here cannot rebuild the twin", ev.Previous, c.oldest)
				}
			default:
				if prev, ok := c.checkChain(k, ev); ok && prev.base != 0 {
					h.base, h.depth = prev.base, prev.depth+1
					if h.depth >= logCheckpointEvery {
						c.add(k, "the change is the %dth of its chain; a chain holds at most %d", h.depth, logCheckpointEvery-1)
					}
				}
			}
		}
		if i := rev - c.oldest; i < int64(len(c.heads)) {
			c.heads[i] = h
		}
	}
	if c.oldest == 0 {
		c.oldest = 1
	}
	return it.Error()
}

// checkChain checks that the entry a change applies to is of the same
// twin, and returns it.
func (c *checker) checkChain(k []byte, ev eventHead) (logHead, bool) {
	prev, err := c.event(ev.Previous)
	if err != nil {
		if _, closer, err := c.db.Get(logKey(ev.Previous)); err == nil {
			closer.Close()
			return prev, false // there, but it does not decode: reported for its key
		}
		c.add(k, "the change applies to revision %d, which the watch log lacks", ev.Previous)
		return prev, false
	}
	if prev.id != ev.TwinID || prev.version > ev.Version {
		c.add(k, "the change of twin %q (version %d) applies to revision %d, version %d of twin %q",
			ev.TwinID, ev.Version, ev.Previous, prev.version, prev.id)
		return prev, false
	}
	return prev, true
}

// maxCachedLog bounds how many revisions of the watch log the checker keeps
// what it needs of in memory (about 50 bytes each); a longer log is read
// again for each history entry. Tests change it.
var maxCachedLog int64 = 1 << 22

// logHead is what the checker keeps of a watch log entry.
type logHead struct {
	id      string
	version int64
	kind    EventKind
	// previous is, for a change, the revision it applies to.
	previous int64
	// base is the revision of the whole entry its chain starts at (its
	// own, for a whole entry; 0 if unknown), and depth how many changes
	// the chain holds up to it. Known only while the checker keeps the
	// heads in memory (maxCachedLog).
	base  int64
	depth int64
	ok    bool // the entry exists and decodes
}

// event returns the head of the watch log's entry at rev, or why it has
// none.
func (c *checker) event(rev int64) (logHead, error) {
	if len(c.heads) > 0 {
		if i := rev - c.oldest; i >= 0 && i < int64(len(c.heads)) && c.heads[i].ok {
			return c.heads[i], nil
		}
		return logHead{}, pebble.ErrNotFound
	}
	v, closer, err := c.db.Get(logKey(rev))
	if err != nil {
		return logHead{}, err
	}
	defer closer.Close()
	ev, err := decodeEventHead(v)
	if err != nil {
		return logHead{}, pebble.ErrNotFound // reported by checkLog
	}
	return logHead{id: ev.TwinID, version: ev.Version, kind: ev.Kind, previous: ev.Previous, ok: true}, nil
}

// checkKeys checks every key outside the watch log, in key order.
func (c *checker) checkKeys() error {
	it, err := c.db.NewIter(nil)
	if err != nil {
		return err
	}
	defer it.Close()
	c.vs = -1
	for valid := it.First(); valid; valid = it.Next() {
		k := it.Key()
		switch {
		case bytes.HasPrefix(k, prefixLog):
			// Checked already: skip it.
			if !it.SeekLT(prefixEnd(prefixLog)) {
				return it.Error()
			}
		case bytes.Equal(k, keyFormat), bytes.HasPrefix(k, prefixRules), bytes.HasPrefix(k, prefixAPIKeys):
			// Rule definitions are the rules package's, API keys the
			// server's.
		case bytes.HasPrefix(k, []byte("m/")):
			// Store metadata other than the format: kept for newer
			// features; nothing to check.
		case bytes.HasPrefix(k, prefixShards):
			if err := c.checkShardKey(k, it.Value()); err != nil {
				return err
			}
		default:
			c.add(k, "unknown key: not part of the store's layout")
		}
	}
	if err := it.Error(); err != nil {
		return err
	}
	c.endShard()
	return nil
}

// checkShardKey checks one key under s/.
func (c *checker) checkShardKey(k, v []byte) error {
	const head = len("s/") + 2 + len("/x/")
	if len(k) < head || k[4] != '/' || k[6] != '/' {
		c.add(k, "a shard key must be s/<vshard:2>/<section>/...")
		return nil
	}
	vs := int(binary.BigEndian.Uint16(k[2:4]))
	if vs >= c.vshards {
		c.add(k, "virtual shard %d does not exist: the store has %d", vs, c.vshards)
		return nil
	}
	if vs != c.vs {
		c.endShard()
		if err := c.loadTwins(vs); err != nil {
			return err
		}
	}
	rest := k[head:]
	if k[5] != 'h' {
		c.endHistory()
	}
	switch k[5] {
	case 't':
		// Checked by loadTwins.
	case 'c':
		c.checkCommand(k, rest, v)
	case 'h':
		c.checkHistory(k, rest, v)
	case 'x':
		c.checkRuleState(k, rest, v)
	case sectionTypeIndex, sectionLabelIndex:
		c.checkIndex(k, rest, v)
	case 'p':
		if t := c.owner(k, "presence mark", string(rest)); t != nil {
			t.marked = true
			if !t.connected {
				c.add(k, "twin %q has a presence mark but is not connected", rest)
			}
		}
	case 'w':
		if t := c.owner(k, "pending mark", string(rest)); t != nil {
			t.pendingMarked = true
		}
	case 'n':
		c.checkCount(k, rest, v)
	case 'o':
		c.checkOpenMark(k, rest, v)
	default:
		c.add(k, "unknown section %q of a shard", k[5])
	}
	return nil
}

// loadTwins checks the twin records of virtual shard vs and keeps what the
// other keys of the shard are checked against.
func (c *checker) loadTwins(vs int) error {
	c.vs, c.counted = vs, false
	c.twins = map[string]*checkedTwin{}
	lower := shardPrefix(uint16(vs), 't')
	it, err := c.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: prefixEnd(lower)})
	if err != nil {
		return err
	}
	defer it.Close()
	var last *checkedTwin // the record before, for a seen key
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		id := string(k[len(lower):])
		if rest := k[len(lower):]; isSubKey(rest) {
			i := bytes.IndexByte(rest, 0)
			switch {
			case string(rest[i:]) != "\x00s":
				c.add(k, "unknown key of twin %q", rest[:i])
			case last == nil || last.deleted || string(last.key[len(lower):]) != string(rest[:i]):
				c.add(k, "last_seen of twin %q, which does not exist", rest[:i])
			case len(it.Value()) != 8:
				c.add(k, "last_seen must be 8 bytes; it is %d", len(it.Value()))
			}
			continue
		}
		last = nil
		if !c.checkID(k, id) {
			continue
		}
		r, err := decodeRecord(it.Value())
		if err != nil {
			c.add(k, "%v", err)
			continue
		}
		c.checkEncoding(k, it.Value())
		ct := &checkedTwin{key: append([]byte(nil), k...), deleted: r.Deleted, version: r.LastVersion, cmdSeq: r.LastCommandSeq}
		c.twins[id] = ct
		last = ct
		if r.Deleted {
			if r.LastVersion < 1 {
				c.add(k, "the deleted twin's last version is %d", r.LastVersion)
			}
			continue
		}
		t := r.Twin
		ct.version, ct.cmdSeq, ct.connected = t.Version, t.CommandSeq, t.Presence.Connected
		ct.typ, ct.labels = t.Type, t.Labels
		if len(t.Labels) > 0 {
			ct.unindexed = maps.Clone(t.Labels)
		}
		switch {
		case t.ID != id:
			c.add(k, "the record is of twin %q", t.ID)
		case t.Version < 1:
			c.add(k, "the twin's version is %d", t.Version)
		case t.Revision > c.last:
			c.add(k, "the twin's revision %d is ahead of the watch log's last revision %d", t.Revision, c.last)
		case t.Revision < c.oldest:
			// Pruned from the log.
		default:
			c.checkEvent(k, "the twin's revision", t.Revision, id, t.Version)
		}
		c.checkLogPosition(k, id, t.Revision, r.Log)
	}
	return it.Error()
}

// checkLogPosition checks where a record says its twin stands in the
// watch log's chains: at a whole entry of the twin, fewer than
// logCheckpointEvery changes ago.
func (c *checker) checkLogPosition(k []byte, id string, rev int64, pos logPosition) {
	switch {
	case pos.Base == 0 && pos.Chain == 0, pos.Base < c.oldest && pos.Base > 0:
		return // the next entry is whole, or the base was pruned
	case pos.Base < 0 || pos.Chain < 0 || pos.Chain >= logCheckpointEvery || pos.Base > c.last:
		c.add(k, "the record's place in the watch log (base %d, %d changes since) is impossible", pos.Base, pos.Chain)
		return
	}
	ev, err := c.event(pos.Base)
	switch {
	case err != nil:
		c.add(k, "the record's log base %d is missing from the watch log", pos.Base)
	case ev.id != id || ev.previous != 0:
		c.add(k, "the record's log base %d is not a whole entry of twin %q", pos.Base, id)
	}
	// The twin's last entry is where the record says.
	if i := rev - c.oldest; rev >= c.oldest && i < int64(len(c.heads)) && c.heads[i].ok && c.heads[i].base != 0 {
		if h := c.heads[i]; h.base != pos.Base || h.depth != pos.Chain {
			c.add(k, "the record puts the twin %d changes after revision %d in the watch log; its entry at revision %d is %d after %d",
				pos.Chain, pos.Base, rev, h.depth, h.base)
		}
	}
}

// checkEncoding reports a value (that decodes) of a store of format 2 that
// is still in the JSON of format 1: Open converts every value before it records format 2.
func (c *checker) checkEncoding(k, v []byte) {
	if c.format >= 2 && !isBinary(v) {
		c.add(k, "the value is in the JSON of store format 1 in a store of format %d: the conversion at open did not finish", c.format)
	}
}

// checkID checks that id is valid and belongs to the shard being checked.
func (c *checker) checkID(k []byte, id string) bool {
	if err := ValidateID(id); err != nil {
		c.add(k, "%v", err)
		return false
	}
	if vs := vshardOf(id, c.vshards); vs != c.vs {
		c.add(k, "twin %q belongs to virtual shard %d, not %d", id, vs, c.vs)
		return false
	}
	return true
}

// checkEvent checks that the watch log's entry at rev, what the key k points
// at, is version of twin id.
func (c *checker) checkEvent(k []byte, what string, rev int64, id string, version int64) (ev logHead, ok bool) {
	ev, err := c.event(rev)
	if errors.Is(err, pebble.ErrNotFound) {
		c.add(k, "%s %d is missing from the watch log (which holds %d to %d)", what, rev, c.oldest, c.last)
		return ev, false
	}
	if err != nil {
		c.add(k, "%s %d cannot be read: %v", what, rev, err)
		return ev, false
	}
	if ev.id != id || ev.version != version {
		c.add(k, "%s %d is version %d of twin %q in the watch log, not version %d of %q",
			what, rev, ev.version, ev.id, version, id)
		return ev, false
	}
	return ev, true
}

// splitSeqKey splits the rest of a command or history key into the twin id
// and the number after it.
func splitSeqKey(rest []byte) (string, int64, bool) {
	i := bytes.IndexByte(rest, 0)
	if i < 0 || len(rest)-i-1 != 8 {
		return "", 0, false
	}
	return string(rest[:i]), int64(binary.BigEndian.Uint64(rest[i+1:])), true
}

// owner returns the live twin that owns a key of twin id, or reports the
// key as an orphan.
func (c *checker) owner(k []byte, what, id string) *checkedTwin {
	if !c.checkID(k, id) {
		return nil
	}
	t := c.twins[id]
	switch {
	case t == nil:
		c.add(k, "%s of twin %q, which does not exist", what, id)
		return nil
	case t.deleted:
		c.add(k, "%s of twin %q, which was deleted at version %d", what, id, t.version)
		return nil
	}
	return t
}

func (c *checker) checkCommand(k, rest, v []byte) {
	id, seq, ok := splitSeqKey(rest)
	if !ok {
		c.add(k, "a command key must be s/<vshard>/c/<id>, a zero byte and an 8-byte sequence")
		return
	}
	t := c.owner(k, "command", id)
	if t == nil {
		return
	}
	if seq > t.cmdSeq {
		c.add(k, "command sequence %d is above twin %q's last command sequence %d", seq, id, t.cmdSeq)
	}
	cmd, err := decodeCommand(v)
	if err != nil {
		c.add(k, "%v", err)
		return
	}
	c.checkEncoding(k, v)
	if cmd.DeviceID != id || cmd.Seq != seq || cmd.ID != CommandID(id, seq) {
		c.add(k, "the command says id %q, device %q, sequence %d; its key says %q", cmd.ID, cmd.DeviceID, cmd.Seq, CommandID(id, seq))
	}
	if cmd.State < CommandQueued || cmd.State > CommandCanceled {
		c.add(k, "command state %d is not valid", cmd.State)
	}
	if !cmd.State.Final() {
		if t.open == nil {
			t.open = map[int64]time.Time{}
		}
		t.open[seq] = cmd.ExpireTime
	}
}

// checkOpenMark checks an open-command mark against the command, read
// before it (c sorts before o).
func (c *checker) checkOpenMark(k, rest, v []byte) {
	id, seq, ok := splitSeqKey(rest)
	if !ok || len(v) != 8 {
		c.add(k, "an open-command mark must be s/<vshard>/o/<id>, a zero byte and an 8-byte sequence, with an 8-byte expiry")
		return
	}
	t := c.owner(k, "open-command mark", id)
	if t == nil {
		return
	}
	at, open := t.open[seq]
	switch {
	case !open:
		c.add(k, "open-command mark of command %s, which is finished or does not exist", CommandID(id, seq))
	case at.UnixNano() != int64(binary.BigEndian.Uint64(v)):
		c.add(k, "open-command mark of command %s says it expires at %v; the command says %v", CommandID(id, seq),
			time.Unix(0, int64(binary.BigEndian.Uint64(v))).UTC(), at)
	}
	delete(t.open, seq)
}

func (c *checker) checkHistory(k, rest, v []byte) {
	id, version, ok := splitSeqKey(rest)
	if !ok {
		c.add(k, "a history key must be s/<vshard>/h/<id>, a zero byte and an 8-byte version")
		return
	}
	if id != c.hist.id {
		c.endHistory()
	}
	t := c.owner(k, "history entry", id)
	if t == nil {
		return
	}
	switch {
	case version > t.version:
		c.add(k, "history entry of version %d is ahead of twin %q's version %d", version, id, t.version)
		return
	case version <= t.version-c.historyLimit:
		c.add(k, "history entry of version %d is older than the history limit of %d versions (twin %q is at version %d)",
			version, c.historyLimit, id, t.version)
	}
	if len(v) != 8 {
		c.add(k, "a history entry's value must be an 8-byte revision, not %d bytes", len(v))
		return
	}
	c.hist.id, c.hist.t = id, t
	c.hist.vers = append(c.hist.vers, version)
	c.hist.keys = append(c.hist.keys, append([]byte(nil), k...))
	rev := int64(binary.BigEndian.Uint64(v))
	switch {
	case rev > c.last:
		c.add(k, "the history entry's revision %d is ahead of the watch log's last revision %d", rev, c.last)
	case rev >= c.oldest:
		if ev, ok := c.checkEvent(k, "the history entry's revision", rev, id, version); ok && ev.kind == KindCreated {
			c.hist.created = version
		}
	}
}

func (c *checker) checkRuleState(k, rest, v []byte) {
	i := bytes.IndexByte(rest, 0)
	if i < 0 {
		c.add(k, "a rule state key must be s/<vshard>/x/<id>, a zero byte and the rule id")
		return
	}
	t := c.owner(k, "rule state", string(rest[:i]))
	if t == nil {
		return
	}
	s, err := decodeRuleState(v)
	if err != nil {
		c.add(k, "the rule state does not decode: %v", err)
		return
	}
	c.checkEncoding(k, v)
	if !s.PendingSince.IsZero() {
		t.pending = true
	}
}

// checkCount checks a shard's twin count.
func (c *checker) checkCount(k, rest, v []byte) {
	c.counted = true
	if len(rest) != 0 || len(v) != 8 {
		c.add(k, "a twin count is s/<vshard>/n/ with 8 bytes; found %d bytes after the key and a value of %d", len(rest), len(v))
		return
	}
	n := 0
	for _, t := range c.twins {
		if !t.deleted {
			n++
		}
	}
	if got := binary.BigEndian.Uint64(v); got != uint64(n) {
		c.add(k, "the shard's twin count is %d; it holds %d twins", got, n)
	}
}

// endHistory checks the history entries of one twin, all read, as a whole.
func (c *checker) endHistory() {
	h := &c.hist
	if h.t != nil {
		var prev int64
		for i, v := range h.vers {
			switch {
			case v < h.created:
				c.add(h.keys[i], "history entry of version %d is from before twin %q was created at version %d (left over from a deleted twin)", v, h.id, h.created)
				continue
			case v <= h.t.version-c.historyLimit:
				continue // beyond the limit: reported already
			case prev != 0 && v != prev+1:
				c.add(h.keys[i], "history of twin %q jumps from version %d to %d", h.id, prev, v)
			}
			prev = v
		}
		h.t.lastHist = h.vers[len(h.vers)-1]
	}
	*h = historyRun{vers: h.vers[:0], keys: h.keys[:0]}
}

// endShard checks what is left to check of the shard's twins once all its
// keys are read.
func (c *checker) endShard() {
	c.endHistory()
	for id, t := range c.twins {
		if t.deleted {
			continue
		}
		if t.lastHist != t.version {
			c.add(t.key, "twin %q has no history entry for its version %d", id, t.version)
		}
		for _, seq := range slices.Sorted(maps.Keys(t.open)) {
			if !c.counted {
				break // a store from before the marks: its first start adds them
			}
			c.add(t.key, "command %s is not finished but has no open-command mark: a restart would not expire it", CommandID(id, seq))
		}
		if t.connected && !t.marked {
			c.add(t.key, "twin %q is connected but has no presence mark: a restart would not find it connected", id)
		}
		switch {
		case t.pending && !t.pendingMarked:
			c.add(t.key, "twin %q has a rule state waiting for a hold_for but no pending mark: a restart would not evaluate it", id)
		case !t.pending && t.pendingMarked:
			c.add(t.key, "twin %q has a pending mark but no rule state waits for a hold_for", id)
		}
		if c.indexed && !t.typeIndexed {
			c.add(t.key, "twin %q has no type index entry (for type %q): filters on its type would miss it", id, t.typ)
		}
		if c.indexed {
			for _, k := range slices.Sorted(maps.Keys(t.unindexed)) {
				c.add(t.key, "twin %q has no label index entry for %s=%q: filters on the label would miss it", id, k, t.unindexed[k])
			}
		}
	}
	c.twins = nil
}

// vshardOf returns the virtual shard of a twin id in a store of n shards,
// as Engine.VShard does.
func vshardOf(id string, n int) int {
	h := fnv.New32a()
	h.Write([]byte(id))
	return int(h.Sum32() % uint32(n))
}

// keyString formats a key of the store's layout readably: numbers in
// decimal, the zero byte after an id as '/'.
func keyString(k []byte) string {
	switch {
	case bytes.HasPrefix(k, prefixLog) && len(k) == len(prefixLog)+8:
		return "l/" + strconv.FormatUint(binary.BigEndian.Uint64(k[len(prefixLog):]), 10)
	case bytes.HasPrefix(k, prefixShards) && len(k) >= 7 && k[4] == '/' && k[6] == '/':
		head := fmt.Sprintf("s/%d/%c/", binary.BigEndian.Uint16(k[2:4]), k[5])
		rest := k[7:]
		switch k[5] {
		case 't':
			return head + readable(string(rest))
		case 'c', 'h', 'o':
			if id, n, ok := splitSeqKey(rest); ok {
				return head + readable(id) + "/" + strconv.FormatInt(n, 10)
			}
		case 'p', 'w':
			return head + readable(string(rest))
		case sectionTypeIndex:
			if i := bytes.IndexByte(rest, 0); i >= 0 {
				return head + strconv.Quote(string(rest[:i])) + "/" + readable(string(rest[i+1:]))
			}
		case sectionLabelIndex:
			if i, j := bytes.IndexByte(rest, 0), bytes.LastIndexByte(rest, 0); i >= 0 && j > i {
				return head + strconv.Quote(string(rest[:i])) + "=" + strconv.Quote(string(rest[i+1:j])) + "/" + readable(string(rest[j+1:]))
			}
		case 'x':
			if i := bytes.IndexByte(rest, 0); i >= 0 {
				return head + readable(string(rest[:i])) + "/" + readable(string(rest[i+1:]))
			}
		}
		return head + strconv.Quote(string(rest))
	}
	return strconv.Quote(string(k))
}

// readable returns s as it is if it is a valid id, and quoted otherwise.
func readable(s string) string {
	if ValidateID(s) == nil {
		return s
	}
	return strconv.Quote(s)
}

// checkIndex checks an entry of the type or label index: its twin exists
// and has that type or label.
func (c *checker) checkIndex(k, rest, v []byte) {
	if len(v) != 0 {
		c.add(k, "an index entry's value must be empty, not %d bytes", len(v))
	}
	if k[5] == sectionTypeIndex {
		i := bytes.IndexByte(rest, 0)
		if i < 0 {
			c.add(k, "a type index key must be s/<vshard>/y/<type>, a zero byte and the twin id")
			return
		}
		typ, id := string(rest[:i]), string(rest[i+1:])
		t := c.owner(k, "type index entry", id)
		if t == nil {
			return
		}
		if t.typ != typ {
			c.add(k, "type index entry says type %q; twin %q has type %q", typ, id, t.typ)
			return
		}
		t.typeIndexed = true
		return
	}
	i, j := bytes.IndexByte(rest, 0), bytes.LastIndexByte(rest, 0)
	if i < 0 || j == i {
		c.add(k, "a label index key must be s/<vshard>/b/<key>, a zero byte, the value, a zero byte and the twin id")
		return
	}
	key, value, id := string(rest[:i]), string(rest[i+1:j]), string(rest[j+1:])
	t := c.owner(k, "label index entry", id)
	if t == nil {
		return
	}
	if have, ok := t.labels[key]; !ok || have != value {
		if ok {
			c.add(k, "label index entry says %s=%q; twin %q has %s=%q", key, value, id, key, have)
		} else {
			c.add(k, "label index entry says %s=%q; twin %q has no label %s", key, value, id, key)
		}
		return
	}
	delete(t.unindexed, key)
}
