package twin

import (
	"bytes"
	"container/heap"
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/cockroachdb/pebble/v2"
)

// The index of twins by type and by label lets a filter that pins a type
// or a label read only the twins that can match. Its keys live under their
// virtual shard's prefix like every other key of a twin, so that a shard
// stays one key range:
//
//	s/<vs:2>/y/<type>\x00<id>              the twin's type (empty value)
//	s/<vs:2>/b/<key>\x00<value>\x00<id>    one of the twin's labels (empty value)
//	m/index                                the index is complete (value "1")
//
// Types, label keys and ids hold no zero byte; a label value may, so a
// label key is split at its first zero byte and its last. Every twin has
// one type entry (its type may be empty) and one entry per label. The
// entries are written in the same batch as the twin record (writeIndex),
// and a store written before the index existed gets them from buildIndex,
// which writes m/index last.
var keyIndex = []byte("m/index")

// Sections of a shard's index.
const (
	sectionTypeIndex  = 'y'
	sectionLabelIndex = 'b'
)

func typeIndexPrefix(vs uint16, typ string) []byte {
	return append(append(shardPrefix(vs, sectionTypeIndex), typ...), 0)
}

func labelIndexPrefix(vs uint16, key, value string) []byte {
	b := append(append(shardPrefix(vs, sectionLabelIndex), key...), 0)
	return append(append(b, value...), 0)
}

// Pin is what a filter requires of a twin's type and labels, as far as the
// index can answer it: a necessary condition of the filter, not a sufficient
// one. The zero Pin pins nothing.
type Pin struct {
	// Types, if not nil, are the types a matching twin may have.
	Types []string
	// Labels holds, by label key, the values that the label of a matching
	// twin may have; a twin without the label does not match.
	Labels map[string][]string
	// None says that no twin can match, as with a filter that pins the type
	// to two different values.
	None bool
}

// Pinned reports whether p narrows the twins at all.
func (p Pin) Pinned() bool { return p.None || p.Types != nil || len(p.Labels) > 0 }

// Matches reports whether t meets p.
func (p Pin) Matches(t *Twin) bool {
	if p.None {
		return false
	}
	if p.Types != nil && !slices.Contains(p.Types, t.Type) {
		return false
	}
	for k, vals := range p.Labels {
		v, ok := t.Labels[k]
		if !ok || !slices.Contains(vals, v) {
			return false
		}
	}
	return true
}

// String formats p as a CEL condition, for logs and errors.
func (p Pin) String() string {
	if p.None {
		return "false"
	}
	var b bytes.Buffer
	term := func(field string, vals []string) {
		if b.Len() > 0 {
			b.WriteString(" && ")
		}
		if len(vals) == 1 {
			fmt.Fprintf(&b, "%s == %q", field, vals[0])
			return
		}
		fmt.Fprintf(&b, "%s in %q", field, vals)
	}
	if p.Types != nil {
		term("twin.type", p.Types)
	}
	keys := make([]string, 0, len(p.Labels))
	for k := range p.Labels {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		term(fmt.Sprintf("twin.labels[%q]", k), p.Labels[k])
	}
	return b.String()
}

// indexKeys returns the index keys of twin t in virtual shard vs.
func indexKeys(vs uint16, t *Twin) [][]byte {
	keys := make([][]byte, 0, 1+len(t.Labels))
	keys = append(keys, append(typeIndexPrefix(vs, t.Type), t.ID...))
	for k, v := range t.Labels {
		keys = append(keys, append(labelIndexPrefix(vs, k, v), t.ID...))
	}
	return keys
}

// writeIndex adds to b what keeps the index of a twin of virtual shard vs
// right when it changes from prev to next: nil prev for a twin created,
// nil next for one deleted. Only what changed is written.
func writeIndex(b writer, vs uint16, prev, next *Twin) error {
	switch {
	case prev == next:
		return nil
	case prev == nil:
		for _, k := range indexKeys(vs, next) {
			if err := b.Set(k, nil, nil); err != nil {
				return err
			}
		}
		return nil
	case next == nil:
		for _, k := range indexKeys(vs, prev) {
			if err := b.Delete(k, nil); err != nil {
				return err
			}
		}
		return nil
	}
	id := next.ID
	if prev.Type != next.Type {
		if err := b.Delete(append(typeIndexPrefix(vs, prev.Type), id...), nil); err != nil {
			return err
		}
		if err := b.Set(append(typeIndexPrefix(vs, next.Type), id...), nil, nil); err != nil {
			return err
		}
	}
	for k, v := range prev.Labels {
		if nv, ok := next.Labels[k]; !ok || nv != v {
			if err := b.Delete(append(labelIndexPrefix(vs, k, v), id...), nil); err != nil {
				return err
			}
		}
	}
	for k, v := range next.Labels {
		if pv, ok := prev.Labels[k]; !ok || pv != v {
			if err := b.Set(append(labelIndexPrefix(vs, k, v), id...), nil, nil); err != nil {
				return err
			}
		}
	}
	return nil
}

// buildIndexBatchBytes is how large a batch of buildIndex grows before it
// is committed.
const buildIndexBatchBytes = 4 << 20

// buildIndex builds the index of a store of vshards virtual shards written
// before the index existed, or whose build was cut short: it replaces
// every index entry with those of the twin records, in batches, and then
// records the index as complete (m/index), synced. Nothing else may write
// to db meanwhile. It reads every twin record once.
func buildIndex(db *pebble.DB, vshards int) error {
	b := db.NewBatch()
	defer func() { b.Close() }()
	for vs := range vshards {
		vs := uint16(vs)
		for _, sec := range []byte{sectionTypeIndex, sectionLabelIndex} {
			p := shardPrefix(vs, sec)
			if err := b.DeleteRange(p, prefixEnd(p), nil); err != nil {
				return err
			}
		}
		lower := shardPrefix(vs, 't')
		it, err := db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: prefixEnd(lower)})
		if err != nil {
			return err
		}
		for it.First(); it.Valid(); it.Next() {
			if isSubKey(it.Key()[len(lower):]) {
				continue // a seen key
			}
			r, err := decodeRecord(it.Value())
			if err != nil {
				it.Close()
				return fmt.Errorf("twin: build the index: record %s: %w", keyString(it.Key()), err)
			}
			if r.Deleted {
				continue
			}
			if err := writeIndex(b, vs, nil, r.Twin); err != nil {
				it.Close()
				return err
			}
			if b.Len() >= buildIndexBatchBytes {
				if err := db.Apply(b, pebble.NoSync); err != nil {
					it.Close()
					return fmt.Errorf("twin: build the index: %w", err)
				}
				b.Close()
				b = db.NewBatch()
			}
		}
		if err := it.Close(); err != nil {
			return err
		}
	}
	if err := b.Set(keyIndex, []byte("1"), nil); err != nil {
		return err
	}
	if err := db.Apply(b, pebble.Sync); err != nil {
		return fmt.Errorf("twin: build the index: %w", err)
	}
	return nil
}

// ensureIndex builds the index if the store does not record it complete.
// It runs at open, before the workers start.
func (e *Engine) ensureIndex() error {
	_, closer, err := e.db.Get(keyIndex)
	if err == nil {
		return closer.Close()
	}
	if !errors.Is(err, pebble.ErrNotFound) {
		return fmt.Errorf("twin: read %s: %w", keyIndex, err)
	}
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: prefixShards, UpperBound: prefixEnd(prefixShards)})
	if err != nil {
		return err
	}
	empty := !it.First()
	if err := it.Close(); err != nil {
		return err
	}
	if empty { // a new store
		return e.db.Set(keyIndex, []byte("1"), pebble.Sync)
	}
	e.opts.Logger.Info("building the index of twins by type and label (once, for a store written before it existed)")
	return buildIndex(e.db, e.vshards)
}

// indexTerm is the one term of a pin that ListIndexed reads the index
// for: the type (label "") or a label, with the values it may have.
type indexTerm struct {
	label  string
	values []string
}

// scanTerm chooses the term of p to read the index of: the one with the
// fewest values, a label before the type (a fleet tends to have more
// sites than types). The other terms are checked on each twin.
func (p Pin) scanTerm() indexTerm {
	var best indexTerm
	found := false
	better := func(t indexTerm) bool {
		return !found || len(t.values) < len(best.values) ||
			(len(t.values) == len(best.values) && best.label == "" && t.label != "")
	}
	if p.Types != nil {
		best, found = indexTerm{values: p.Types}, true
	}
	keys := make([]string, 0, len(p.Labels))
	for k := range p.Labels {
		keys = append(keys, k)
	}
	slices.Sort(keys) // the same choice every time
	for _, k := range keys {
		if t := (indexTerm{label: k, values: p.Labels[k]}); better(t) {
			best, found = t, true
		}
	}
	return best
}

func (t indexTerm) prefix(vs uint16, value string) []byte {
	if t.label == "" {
		return typeIndexPrefix(vs, value)
	}
	return labelIndexPrefix(vs, t.label, value)
}

// indexCursor walks one range of the index: one value of the term in one
// virtual shard, in id order.
type indexCursor struct {
	it     *pebble.Iterator
	prefix int // the length of the key before the id
	id     string
}

// skip moves c to the first entry at or after its position whose key ends
// in an id, and reports whether there is one. (A label value may hold a
// zero byte, so the range of value "a" also holds value "a\x00b".)
func (c *indexCursor) skip(valid bool) bool {
	for ; valid; valid = c.it.Next() {
		rest := c.it.Key()[c.prefix:]
		if bytes.IndexByte(rest, 0) < 0 {
			c.id = string(rest)
			return true
		}
	}
	return false
}

// cursorHeap orders cursors by their current id.
type cursorHeap []*indexCursor

func (h cursorHeap) Len() int           { return len(h) }
func (h cursorHeap) Less(i, j int) bool { return h[i].id < h[j].id }
func (h cursorHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *cursorHeap) Push(x any)        { *h = append(*h, x.(*indexCursor)) }
func (h *cursorHeap) Pop() any {
	old := *h
	c := old[len(old)-1]
	*h = old[:len(old)-1]
	return c
}

// shardWorker returns the worker that serves virtual shard vs, as
// workerFor does for a twin id.
func (e *Engine) shardWorker(vs uint16) *worker {
	return e.workers[int(vs)%len(e.workers)]
}

// indexCheckEvery is how many index entries ListIndexed reads between
// checks of its context.
const indexCheckEvery = 64

// ListIndexed is List for the twins that meet pin, which must be Pinned:
// it calls fn with the committed twins that meet pin and whose ids sort
// after `after`, in id order, until fn returns false, ctx is done or the
// engine closes, and returns as List does. Its cost follows the twins
// whose indexed type or label matches, not the fleet: it merges, in id
// order, the index ranges of every virtual shard, read as durable, and
// passes each twin that still meets pin when it is read.
func (e *Engine) ListIndexed(ctx context.Context, pin Pin, after string, fn func(*Twin) bool) (rev int64, err error) {
	if !pin.Pinned() {
		return 0, fmt.Errorf("%w: ListIndexed needs a pinned type or label", ErrInvalidArgument)
	}
	if !e.startReader() {
		return 0, ErrClosed
	}
	defer e.readerWG.Done()
	// The revision first: each worker's durable state, read after it,
	// holds every change up to it.
	rev = e.Revision()
	if pin.None {
		return rev, nil
	}
	term := pin.scanTerm()
	snaps := map[*worker]*sharedSnapshot{}
	var h cursorHeap
	defer func() {
		for _, c := range h {
			c.it.Close()
		}
		for _, s := range snaps {
			s.release()
		}
	}()
	for vs := range e.vshards {
		vs := uint16(vs)
		w := e.shardWorker(vs)
		snap := snaps[w]
		if snap == nil {
			snap = w.durableSnapshot()
			snaps[w] = snap
		}
		for _, v := range term.values {
			p := term.prefix(vs, v)
			it, err := snap.s.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
			if err != nil {
				return rev, err
			}
			c := &indexCursor{it: it, prefix: len(p)}
			var valid bool
			if after == "" {
				valid = it.First()
			} else {
				valid = it.SeekGE(append(append(p[:len(p):len(p)], after...), 0))
			}
			if !c.skip(valid) {
				err := it.Error()
				it.Close()
				if err != nil {
					return rev, err
				}
				continue
			}
			h = append(h, c)
		}
	}
	heap.Init(&h)
	last, n := "", 0
	for len(h) > 0 {
		if n++; n%indexCheckEvery == 0 {
			if err := e.readStopped(ctx); err != nil {
				return rev, err
			}
		}
		c := h[0]
		id := c.id
		if c.skip(c.it.Next()) {
			heap.Fix(&h, 0)
		} else {
			heap.Pop(&h)
			err := c.it.Error()
			c.it.Close()
			if err != nil {
				return rev, err
			}
		}
		if id == last {
			continue // one twin under two values: only while it changes
		}
		last = id
		t, err := e.Get(id)
		if errors.Is(err, ErrNotFound) {
			continue // deleted since the index was read
		}
		if err != nil {
			return rev, err // as List fails on a twin it cannot read
		}
		if !pin.Matches(t) {
			continue // changed since the index was read
		}
		if err := e.readStopped(ctx); err != nil {
			return rev, err
		}
		if !fn(t) {
			return rev, nil
		}
	}
	return rev, nil
}
