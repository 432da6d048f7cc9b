package twin

import (
	"errors"
	"fmt"
	"maps"
	"reflect"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/encoding/protowire"
)

// The watch log stores most of a twin's changes as what changed, not as
// the whole twin (store.proto's TwinChange): a change entry holds the
// twin's fields other than its documents, and the members of reported and
// desired that changed. A twin's entries form a chain back to a complete
// entry, one that holds the whole twin, and a reader rebuilds the twin of
// any entry from its chain (logReader).
//
// The writer keeps chains short and within the log: an entry is complete
// when it is the twin's first, a deletion, the first after an import, the
// logCheckpointEvery-th of its chain, or when the chain's complete entry is
// more than logChainSpan revisions old. Pruning leaves logChainSpan
// revisions below the oldest one watchers may resume from, so the complete
// entry of every retained chain is still there, whatever the retention
// was when it was written. The oldest revision watchers may resume from is
// recorded (m/log) as pruning moves it.

// logCheckpointEvery bounds a chain: every so many entries of a twin, one
// holds the whole twin. A reader rebuilding one event reads at most this
// many entries.
const logCheckpointEvery = 16

// logChainSpan is how many revisions older than the oldest retained one
// the log keeps for chains, and so the oldest a chain's complete entry may
// be: a twin that changes less often than that logs whole entries. A
// constant, so that changing the retention between runs breaks no chain.
// Tests lower it.
var logChainSpan int64 = 1 << 16

// logPosition is where a twin stands in the watch log: the revision of its
// last complete entry and the number of change entries since, as its
// record stores them (Record.log_base and log_chain). base 0: the twin's
// next entry must be complete.
type logPosition struct {
	Base, Chain int64
}

// next returns the position after an entry at revision rev, and whether
// that entry must be complete.
func (p logPosition) next(rev int64) (_ logPosition, complete bool) {
	if p.Base == 0 || p.Chain+1 >= logCheckpointEvery || rev-p.Base > logChainSpan {
		return logPosition{Base: rev}, true
	}
	return logPosition{Base: p.Base, Chain: p.Chain + 1}, false
}

// twinDiff is what changed between two twins, as a change entry stores it.
type twinDiff struct {
	prev, next        *Twin
	reported, desired map[string]any // the documents' changed members, nil if none
}

// diffTwins returns what changed from prev, the twin as of its previous log
// entry, to next, or false when the change cannot be stored as a change (a
// document holds a null member, or metadata of an object changed): the
// entry then holds the whole twin.
func diffTwins(prev, next *Twin) (twinDiff, bool) {
	d := twinDiff{prev: prev, next: next}
	path := make([]byte, 0, 64) // scratch for the members' pointers
	var ok bool
	if d.reported, ok = diffDocument(prev.Reported, next.Reported, prev.ReportedMeta, next.ReportedMeta, path); !ok {
		return d, false
	}
	d.desired, ok = diffDocument(prev.Desired, next.Desired, prev.DesiredMeta, next.DesiredMeta, path)
	return d, ok
}

// diffDocument is diffObject for a whole document, which a change that did
// not touch it shares, with its metadata, with the twin before.
func diffDocument(prev, next Document, pm, nm map[string]FieldMeta, path []byte) (map[string]any, bool) {
	if sameMap(prev, next) && sameMap(pm, nm) {
		return nil, true
	}
	return diffObject(prev, next, pm, nm, path)
}

// sameMap reports whether a and b are the same map (or both empty).
func sameMap[M ~map[K]V, K comparable, V any](a, b M) bool {
	if len(a) != len(b) {
		return false
	}
	return len(a) == 0 || reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}

// appendChangeEvent appends the stored form of an event whose entry holds
// the change d, applied to the twin's entry at revision prevRev. twinBytes
// is the size of the whole twin's encoding, which readers count as the
// memory the event takes once rebuilt.
func appendChangeEvent(b []byte, ev *Event, d twinDiff, prevRev int64, twinBytes int) []byte {
	b = appendEventHead(b, ev)
	b, start := openLen(b, eventChange)
	b = appendIntField(b, changePreviousRevision, prevRev)
	head := *d.next
	head.Reported, head.Desired, head.ReportedMeta, head.DesiredMeta, head.TokenHash = nil, nil, nil, nil, nil
	if d.next.Type == d.prev.Type && equalLabels(d.next.Labels, d.prev.Labels) {
		b = appendBoolField(b, changeSameTypeLabels, true)
		head.Type, head.Labels = "", nil
	}
	b = appendIntField(b, changeTwinBytes, int64(twinBytes))
	var s int
	b, s = openLen(b, changeHead)
	b = appendTwinMessage(b, &head)
	b = closeLen(b, s)
	for _, doc := range []struct {
		num   protowire.Number
		patch map[string]any
		meta  map[string]FieldMeta
	}{{changeReported, d.reported, d.next.ReportedMeta}, {changeDesired, d.desired, d.next.DesiredMeta}} {
		if doc.patch == nil {
			continue
		}
		var mw *metaWriter
		if len(doc.meta) > 0 {
			mw = &metaWriter{meta: doc.meta, path: make([]byte, 0, 64)}
		}
		b, s = openLen(b, doc.num)
		b = appendObject(b, doc.patch, mw)
		b = closeLen(b, s)
	}
	return closeLen(b, start)
}

// diffObject returns the members of next that differ from prev, as
// TwinChange stores them (nil if none), or false if the difference cannot
// be stored so. path is the objects' JSON Pointer; diffObject appends to
// it, in place when it has room, and leaves path itself as it was.
func diffObject(prev, next map[string]any, pm, nm map[string]FieldMeta, path []byte) (map[string]any, bool) {
	var out map[string]any
	set := func(k string, v any) {
		if out == nil {
			out = map[string]any{}
		}
		out[k] = v
	}
	for k, nv := range next {
		if nv == nil {
			return nil, false // a null member would read as a removal
		}
		p := appendPointerKey(append(path, '/'), k)
		pv, had := prev[k]
		if !had {
			set(k, nv)
			continue
		}
		po, pObj := pv.(map[string]any)
		no, nObj := nv.(map[string]any)
		sameMeta := metaAt(pm, p) == metaAt(nm, p)
		switch {
		case pObj && nObj:
			if !sameMeta {
				return nil, false // a reader would keep the old metadata
			}
			if sameMap(po, no) {
				// A merge copies every object it changes (mergeObject),
				// and metadata changes only where it sets or removes: an
				// object it kept has nothing changed under it.
				continue
			}
			sub, ok := diffObject(po, no, pm, nm, p)
			if !ok {
				return nil, false
			}
			if sub != nil {
				set(k, sub)
			}
		case !pObj && !nObj && sameMeta && jsonEqual(pv, nv):
		default:
			set(k, nv)
		}
	}
	for k := range prev {
		if _, ok := next[k]; !ok {
			set(k, nil)
		}
	}
	return out, true
}

// metaKey is a FieldMeta made comparable: time.Time's == tells apart equal
// times with different locations.
type metaKey struct {
	ok      bool
	nanos   int64
	version int64
}

func metaAt(meta map[string]FieldMeta, p []byte) metaKey {
	m, ok := meta[string(p)]
	if !ok {
		return metaKey{}
	}
	return metaKey{ok: true, nanos: m.Time.UnixNano(), version: m.Version}
}

// twinChange is a decoded TwinChange.
type twinChange struct {
	prevRev int64
	head    *Twin
	// The documents' changes and their metadata, when has says they
	// changed.
	reported, desired         map[string]any
	reportedMeta, desiredMeta map[string]FieldMeta
	hasReported, hasDesired   bool
	sameTypeAndLabels         bool
	// twinBytes is the size of the whole twin's encoding.
	twinBytes int
}

func parseTwinChange(b []byte) (*twinChange, error) {
	c := new(twinChange)
	for len(b) > 0 {
		f, rest, err := nextFieldOf(changeWire, b)
		if err != nil {
			return nil, err
		}
		b = rest
		switch f.num {
		case changePreviousRevision:
			c.prevRev = f.int()
		case changeHead:
			if c.head, err = parseTwin(f.bytes); err != nil {
				return nil, err
			}
		case changeReported:
			if err := readTwinDocument(f.bytes, (*Document)(&c.reported), &c.reportedMeta); err != nil {
				return nil, err
			}
			c.hasReported = true
		case changeDesired:
			if err := readTwinDocument(f.bytes, (*Document)(&c.desired), &c.desiredMeta); err != nil {
				return nil, err
			}
			c.hasDesired = true
		case changeSameTypeLabels:
			c.sameTypeAndLabels = f.u != 0
		case changeTwinBytes:
			c.twinBytes = int(f.u)
		}
	}
	if c.head == nil {
		return nil, errors.New("a twin change without its head")
	}
	if c.prevRev <= 0 {
		return nil, fmt.Errorf("a twin change with previous revision %d", c.prevRev)
	}
	return c, nil
}

// apply returns the twin after the change, from base, the twin as of the
// previous entry. base is not changed; the result shares what did not
// change with it.
func (c *twinChange) apply(base *Twin) *Twin {
	t := c.head.clone()
	t.TokenHash = nil
	if c.sameTypeAndLabels {
		t.Type, t.Labels = base.Type, base.Labels
	}
	t.Reported, t.ReportedMeta = base.Reported, base.ReportedMeta
	if c.hasReported {
		t.Reported, t.ReportedMeta = applyObjectChange(base.Reported, base.ReportedMeta, c.reported, c.reportedMeta)
	}
	t.Desired, t.DesiredMeta = base.Desired, base.DesiredMeta
	if c.hasDesired {
		t.Desired, t.DesiredMeta = applyObjectChange(base.Desired, base.DesiredMeta, c.desired, c.desiredMeta)
	}
	t.Delta = Delta(t.Desired, t.Reported, t.Tombstones)
	return t
}

// applyObjectChange applies a document's change (diffObject's form) and
// its metadata, and returns the new document and metadata.
func applyObjectChange(doc Document, meta map[string]FieldMeta, patch map[string]any, patchMeta map[string]FieldMeta) (Document, map[string]FieldMeta) {
	var replaced []string // pointers of members removed or set whole
	out := applyObject(doc, patch, nil, &replaced)
	m := make(map[string]FieldMeta, len(meta)+len(patchMeta))
	for p, fm := range meta {
		if !removedBy(p, replaced) {
			m[p] = fm
		}
	}
	maps.Copy(m, patchMeta)
	if len(out) == 0 {
		out = nil
	}
	return out, m
}

func applyObject(dst, patch map[string]any, path []byte, replaced *[]string) map[string]any {
	out := make(map[string]any, len(dst)+len(patch))
	maps.Copy(out, dst)
	for k, v := range patch {
		p := appendPointerKey(append(path, '/'), k)
		if po, ok := v.(map[string]any); ok {
			if do, ok := out[k].(map[string]any); ok {
				out[k] = applyObject(do, po, p, replaced)
				continue
			}
		}
		*replaced = append(*replaced, string(p))
		if v == nil {
			delete(out, k)
		} else {
			out[k] = v
		}
	}
	return out
}

// errBrokenChain says that an entry's chain reaches below what the log
// holds: the log was pruned under the reader, or the retention was lowered
// since the chain was written.
var errBrokenChain = errors.New("a change's chain reaches below the watch log's oldest entry")

// logReader reads watch log entries and rebuilds the twin of each. It
// remembers the last twin it rebuilt of each id, within a memory budget, so
// that a reader going forward through the log applies each change once.
type logReader struct {
	r     pebble.Reader
	last  map[string]loggedTwin
	bytes int64 // the estimated memory of the twins in last
}

type loggedTwin struct {
	rev  int64
	twin *Twin
	size int64
}

// logReaderBytes bounds the estimated memory of the twins a logReader
// remembers: a few thousand fridges. Beyond it, it forgets twins at
// random, so that a fleet a little larger than the budget still finds
// most of its twins.
const logReaderBytes = 16 << 20

func newLogReader(r pebble.Reader) *logReader {
	return &logReader{r: r, last: map[string]loggedTwin{}}
}

// reset forgets the twins remembered.
func (lr *logReader) reset() {
	clear(lr.last)
	lr.bytes = 0
}

// event decodes v, a log entry, with its twin, and returns the encoded
// size of the entry or, if larger, of its twin: what the event weighs.
func (lr *logReader) event(v []byte) (*Event, int, error) {
	ev, ch, err := decodeLogEntry(v)
	if err != nil {
		return nil, 0, err
	}
	size := len(v)
	if ch != nil {
		base, err := lr.twinAt(ch.head.ID, ch.prevRev)
		if err != nil {
			return nil, 0, err
		}
		ev.Twin = ch.apply(base)
		size = max(size, ch.twinBytes)
	}
	if ev.Twin != nil {
		ev.Twin.TokenHash = nil // the log does not hold it
		lr.remember(ev.Twin.ID, ev.Revision, ev.Twin, size)
	}
	return ev, size, nil
}

func (lr *logReader) remember(id string, rev int64, t *Twin, encoded int) {
	if old, ok := lr.last[id]; ok {
		lr.bytes -= old.size
	}
	l := loggedTwin{rev: rev, twin: t, size: twinSize(encoded)}
	lr.last[id] = l
	lr.bytes += l.size
	for k, v := range lr.last { // in random order
		if lr.bytes <= logReaderBytes {
			break
		}
		if k != id {
			delete(lr.last, k)
			lr.bytes -= v.size
		}
	}
}

// twinAt returns the twin of id as of its entry at revision rev.
func (lr *logReader) twinAt(id string, rev int64) (*Twin, error) {
	var chain []*twinChange // newest first
	var base *Twin
	for base == nil {
		if l, ok := lr.last[id]; ok && l.rev == rev {
			base = l.twin // rebuilt already: from there on
			break
		}
		v, closer, err := lr.r.Get(logKey(rev))
		if errors.Is(err, pebble.ErrNotFound) {
			return nil, fmt.Errorf("%w: twin %q, revision %d", errBrokenChain, id, rev)
		}
		if err != nil {
			return nil, err
		}
		ev, ch, err := decodeLogEntry(v)
		closer.Close()
		if err != nil {
			return nil, fmt.Errorf("%w (revision %d)", err, rev)
		}
		switch {
		case ch != nil:
			if ch.head.ID != id || ch.prevRev >= rev || len(chain) > 4*logCheckpointEvery {
				return nil, fmt.Errorf("twin: corrupt watch log: the chain of twin %q breaks at revision %d", id, rev)
			}
			chain = append(chain, ch)
			rev = ch.prevRev
		case ev.Twin == nil || ev.Twin.ID != id:
			return nil, fmt.Errorf("twin: corrupt watch log: the chain of twin %q breaks at revision %d", id, rev)
		default:
			base = ev.Twin
		}
	}
	for i := len(chain) - 1; i >= 0; i-- {
		base = chain[i].apply(base)
	}
	return base, nil
}
