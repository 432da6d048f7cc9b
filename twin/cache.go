package twin

import (
	"errors"
	"fmt"
	"slices"
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2"
)

// The twin cache. Pebble is the home of every twin; each worker keeps the
// twins it has used lately in memory, within a byte budget, and reads the
// others from the store when a request, a rule or a timer needs them. A
// step fetches all the twins it misses in one pass over the store, in key
// order, before it applies anything.
//
// An entry holds two states of its twin. The working state (work, states)
// is the twin with every change the worker applied, durable or not; only
// the worker touches it. The durable state (durable) is the twin as of the
// worker's last published step, which readers see; the syncer sets it under
// w.mu as it publishes. An entry that a step in flight changed cannot be
// evicted: its working state is then ahead of the store's durable state,
// and its durable state must be there for readers when the step is
// published. A clean entry (every change to it published) holds what the
// store holds, so evicting it loses nothing.
//
// Only the worker adds and evicts entries (under w.mu's write lock), so the
// worker reads its map without a lock; readers read it under the read lock
// and never add to it: a reader that misses reads the twin from the
// worker's durable snapshot.

// entry is a cached twin, or the knowledge that there is none.
type entry struct {
	// work is the working state of the twin; nil if it does not exist.
	work *Twin
	// gone says what the last twin with this id left behind when it was
	// deleted, while work is nil.
	gone goneTwin
	// states are the twin's rule states (an immutable map), once
	// statesLoaded says they were read from the store.
	states       map[string]RuleState
	statesLoaded bool
	// cmds are the device's retained commands (nil: none), in the
	// working state.
	cmds *commandList
	// seen says the store holds a seen key for the twin (seenKey).
	seen bool
	// log is where the twin stands in the watch log's chains, as its
	// record says.
	log logPosition
	// seq is the last worker step that changed the twin's keys: until
	// that step is published the entry stays.
	seq int64
	// size estimates the memory the entry holds.
	size int64

	// durable is the twin as of the worker's last published step, nil if
	// none. w.mu guards it.
	durable *Twin
	// durableCmds are the device's retained commands as of the worker's
	// last published step. w.mu guards them.
	durableCmds *commandList
	// used is the cache clock at the entry's last use, for eviction.
	used atomic.Int64
}

// twinCache is a worker's cache of twins.
type twinCache struct {
	m     map[string]*entry
	bytes atomic.Int64 // the sum of the entries' sizes
	limit int64
	clock atomic.Int64 // advances once per worker step
	// hits and misses count lookups by the worker.
	hits, misses atomic.Int64
}

// entryOverhead estimates what an entry costs besides its twin: the map
// slot, the id and the entry itself.
const entryOverhead = 160

// twinSize estimates the memory a decoded twin holds from the size of its
// stored record: maps of interfaces take about ten times their binary
// encoding (a fridge twin of 278 bytes holds about 2.7 KB decoded,
// TestTwinSizeEstimate).
func twinSize(recordBytes int) int64 { return int64(recordBytes)*9 + entryOverhead }

// cached returns the worker's entry for id without reading the store.
func (w *worker) cached(id string) *entry {
	ent := w.cache.m[id]
	if ent != nil {
		ent.used.Store(w.cache.clock.Load())
		w.cache.hits.Add(1)
	}
	return ent
}

// entry returns the worker's entry for id, reading it from the store if it
// is not cached.
func (w *worker) entry(id string) (*entry, error) {
	if ent := w.cached(id); ent != nil {
		return ent, nil
	}
	if err := w.fetch([]string{id}); err != nil {
		return nil, err
	}
	return w.cache.m[id], nil
}

// current returns the working state of a twin, nil if it does not exist or
// cannot be read (the store's failure is then the engine's).
func (w *worker) current(id string) *Twin {
	ent, err := w.entry(id)
	if err != nil {
		w.e.fail(err)
		return nil
	}
	return ent.work
}

// touch notes that the current step changes the keys of a twin, so that
// its entry stays until the step is published.
func (w *worker) touch(ent *entry) {
	ent.seq = w.applied + 1 // the sequence the step will get
}

// prefetch reads every twin of ops that is not cached, in one pass.
func (w *worker) prefetch(ops []*op) error {
	var miss []string
	for _, o := range ops {
		if o.id != "" && w.cache.m[o.id] == nil {
			miss = append(miss, o.id)
		}
	}
	if len(miss) == 0 {
		return nil
	}
	return w.fetch(miss)
}

// fetch reads the given twins, and their rule states if rules are set, from
// the store into the cache. The store holds every step the worker applied,
// durable or not, and a twin that is not cached has no step in flight, so
// what the store holds is both its working and its durable state.
//
// Records are read with point lookups, which Pebble's bloom filters make
// cheap for ids that have no record (a twin being created); rule states
// with one iterator, in key order, for the twins found.
func (w *worker) fetch(ids []string) error {
	slices.Sort(ids)
	ids = slices.Compact(ids)
	ids = slices.DeleteFunc(ids, func(id string) bool { return w.cache.m[id] != nil })
	if len(ids) == 0 {
		return nil // every one cached: no miss, and no read
	}
	loaded := make([]*entry, len(ids))
	var found []int // indexes in ids of the twins found
	for i, id := range ids {
		vs := w.e.VShard(id)
		ent := &entry{size: entryOverhead}
		rec, seen, size, err := w.readRecord(vs, id)
		if err != nil {
			return err
		}
		switch {
		case rec.Twin != nil:
			ent.work, ent.durable, ent.seen, ent.log = rec.Twin, rec.Twin, seen, rec.Log
			ent.size += twinSize(size)
			found = append(found, i)
		case rec.Deleted:
			ent.gone = goneTwin{version: rec.LastVersion, cmdSeq: rec.LastCommandSeq}
			ent.statesLoaded = true
		default:
			ent.statesLoaded = true
		}
		ent.used.Store(w.cache.clock.Load())
		loaded[i] = ent
	}
	// Rule states are read only for twins of a type that rules watch.
	ev := w.e.currentEvaluator()
	rules := func(t *Twin) bool { return ev != nil && ev.Watches(t.Type) }
	found = slices.DeleteFunc(found, func(i int) bool { return loaded[i].work.CommandSeq == 0 && !rules(loaded[i].work) })
	if len(found) > 0 {
		// The found twins' commands, and their rule states if rules are
		// set, with one iterator, in key order.
		it, err := w.e.db.NewIter(&pebble.IterOptions{LowerBound: prefixShards, UpperBound: prefixEnd(prefixShards)})
		if err != nil {
			return err
		}
		for _, i := range found {
			ent, vs := loaded[i], w.e.VShard(ids[i])
			var size int
			if ent.work.CommandSeq > 0 {
				// A device that never had a command has none to read.
				ent.cmds, size, err = readCommands(it, vs, ids[i])
			}
			if err == nil && rules(ent.work) {
				ent.states, err = readRuleStates(it, vs, ids[i])
				ent.statesLoaded = true
			}
			if err != nil {
				it.Close()
				return err
			}
			ent.durableCmds = ent.cmds
			ent.size += int64(size) * 4
		}
		if err := it.Close(); err != nil {
			return err
		}
	}
	w.mu.Lock()
	for i, ent := range loaded {
		if ent != nil {
			w.cache.m[ids[i]] = ent
			w.cache.bytes.Add(ent.size)
		}
	}
	w.mu.Unlock()
	w.cache.misses.Add(int64(len(ids)))
	return nil
}

// readRecord reads a twin's record, with its seen key applied, and returns
// it, whether the twin had a seen key, and the record's size.
func (w *worker) readRecord(vs uint16, id string) (rec record, seen bool, size int, err error) {
	v, closer, err := w.e.db.Get(twinKey(vs, id))
	if errors.Is(err, pebble.ErrNotFound) {
		return record{}, false, 0, nil
	}
	if err != nil {
		return record{}, false, 0, fmt.Errorf("twin: read twin %q: %w", id, err)
	}
	size = len(v)
	rec, err = decodeRecord(v)
	closer.Close()
	if err != nil || rec.Deleted {
		return rec, false, size, err
	}
	v, closer, err = w.e.db.Get(seenKey(vs, id))
	if errors.Is(err, pebble.ErrNotFound) {
		return rec, false, size, nil
	}
	if err != nil {
		return record{}, false, 0, fmt.Errorf("twin: read twin %q: %w", id, err)
	}
	defer closer.Close()
	rec.Twin, err = withSeen(rec.Twin, v)
	return rec, true, size, err
}

// readRuleStates reads a twin's rule states with it.
func readRuleStates(it *pebble.Iterator, vs uint16, id string) (map[string]RuleState, error) {
	p := ruleStatePrefix(vs, id)
	var states map[string]RuleState
	for ok := it.SeekGE(p); ok && len(it.Key()) > len(p) && string(it.Key()[:len(p)]) == string(p); ok = it.Next() {
		s, err := decodeRuleState(it.Value())
		if err != nil {
			return nil, fmt.Errorf("%w (key %q)", err, it.Key())
		}
		if states == nil {
			states = map[string]RuleState{}
		}
		states[string(it.Key()[len(p):])] = s
	}
	return states, it.Error()
}

// evict drops clean entries, least recently used first among a sample,
// until the cache is within its budget. w.mu is held.
func (w *worker) evict() {
	const sample = 8
	c := &w.cache
	for c.bytes.Load() > c.limit {
		var victim string
		var oldest *entry
		n := 0
		for id, ent := range c.m {
			if ent.seq > w.published {
				continue // a step in flight changed it
			}
			if oldest == nil || ent.used.Load() < oldest.used.Load() {
				victim, oldest = id, ent
			}
			if n++; n == sample {
				break
			}
		}
		if oldest == nil {
			return // everything is in flight; the next step tries again
		}
		delete(c.m, victim)
		c.bytes.Add(-oldest.size)
	}
}

// resize records the new size of a twin's entry, from the size of the
// record just written for it.
func (w *worker) resize(ent *entry, recordBytes int) {
	size := entryOverhead
	if recordBytes > 0 {
		size = int(twinSize(recordBytes))
	}
	w.cache.bytes.Add(int64(size) - ent.size)
	ent.size = int64(size)
}

// readDurable returns part of a twin's durable state, for a reader: from
// the worker's cache entry if the twin is cached (cached), or else read
// from the worker's durable snapshot (stored), which holds exactly what
// the worker's published steps wrote.
func readDurable[T any](e *Engine, id string, cached func(*entry) T, stored func(r pebble.Reader, vs uint16, id string) (T, error)) (T, error) {
	w := e.workerFor(id)
	w.mu.RLock()
	ent := w.cache.m[id]
	var v T
	if ent != nil {
		v = cached(ent)
		ent.used.Store(w.cache.clock.Load())
	}
	w.mu.RUnlock()
	if ent != nil {
		return v, nil
	}
	if !e.startReader() {
		return v, ErrClosed
	}
	defer e.readerWG.Done()
	snap := w.durableSnapshot()
	defer snap.release()
	return stored(snap.s, e.VShard(id), id)
}

func durableTwin(ent *entry) *Twin { return ent.durable }

// readTwin reads a twin's record, and its seen key, from a store or
// snapshot: the twin, or nil if there is none.
func readTwin(r pebble.Reader, vs uint16, id string) (*Twin, error) {
	v, closer, err := r.Get(twinKey(vs, id))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("twin: read twin %q: %w", id, err)
	}
	rec, err := decodeRecord(v)
	closer.Close()
	if err != nil || rec.Deleted {
		return nil, err // nil for a deletion marker
	}
	return readSeen(r, vs, rec.Twin)
}

// readSeen returns t with its seen key, if it has one in r, applied.
func readSeen(r pebble.Reader, vs uint16, t *Twin) (*Twin, error) {
	v, closer, err := r.Get(seenKey(vs, t.ID))
	if errors.Is(err, pebble.ErrNotFound) {
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("twin: read twin %q: %w", t.ID, err)
	}
	defer closer.Close()
	return withSeen(t, v)
}

// cacheBytes returns the estimated size of the worker's cache.
func (w *worker) cacheBytes() int64 { return w.cache.bytes.Load() }
