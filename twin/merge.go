package twin

import (
	"bytes"
	"container/heap"
	"errors"

	"github.com/cockroachdb/pebble/v2"
)

// shardMerge walks one section of every virtual shard at once, in the order
// of the keys after the section's prefix (twin ids, for most sections), as
// of each worker's durable snapshot: a shard is one key range, so a query
// over the fleet merges the shards' ranges.
type shardMerge struct {
	snaps []*sharedSnapshot
	its   mergeHeap
	err   error
	// advance says the front iterator's key was returned by next.
	advance bool
}

type shardIter struct {
	it     *pebble.Iterator
	prefix int // the length of the section's prefix
	vs     uint16
}

func (s *shardIter) suffix() []byte { return s.it.Key()[s.prefix:] }

type mergeHeap []*shardIter

func (h mergeHeap) Len() int           { return len(h) }
func (h mergeHeap) Less(i, j int) bool { return bytes.Compare(h[i].suffix(), h[j].suffix()) < 0 }
func (h mergeHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *mergeHeap) Push(x any)        { *h = append(*h, x.(*shardIter)) }
func (h *mergeHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// mergeShards starts a walk of a section of every virtual shard at the first
// key whose suffix sorts after `after`. The caller closes it.
func (e *Engine) mergeShards(section byte, after string) (*shardMerge, error) {
	m := &shardMerge{}
	for _, w := range e.workers {
		snap := w.durableSnapshot()
		m.snaps = append(m.snaps, snap)
		for _, vs := range w.shards() {
			lower := shardPrefix(vs, section)
			it, err := snap.s.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: prefixEnd(lower)})
			if err != nil {
				m.close()
				return nil, err
			}
			s := &shardIter{it: it, prefix: len(lower), vs: vs}
			ok := it.First()
			if after != "" {
				ok = it.SeekGE(append(append(lower, after...), 0))
			}
			if !ok {
				if err := errors.Join(it.Error(), it.Close()); err != nil {
					m.close()
					return nil, err
				}
				continue
			}
			m.its = append(m.its, s)
		}
	}
	heap.Init(&m.its)
	return m, nil
}

// next returns the next key's suffix and value, and the virtual shard it is
// in, valid until the next call; false at the end or on an error (m.err).
func (m *shardMerge) next() (suffix, value []byte, vs uint16, ok bool) {
	if m.advance && m.err == nil && len(m.its) > 0 {
		// Move on from the key returned last, only now, so that it stayed
		// valid until this call.
		s := m.its[0]
		if s.it.Next() {
			heap.Fix(&m.its, 0)
		} else {
			heap.Pop(&m.its)
			m.err = errors.Join(s.it.Error(), s.it.Close())
		}
	}
	if m.err != nil || len(m.its) == 0 {
		return nil, nil, 0, false
	}
	m.advance = true
	s := m.its[0]
	return s.suffix(), s.it.Value(), s.vs, true
}

// close closes the iterators and releases the snapshots.
func (m *shardMerge) close() {
	for _, s := range m.its {
		s.it.Close()
	}
	m.its = nil
	for _, s := range m.snaps {
		s.release()
	}
	m.snaps = nil
}
