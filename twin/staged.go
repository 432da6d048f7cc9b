package twin

import (
	"bytes"
	"slices"

	"github.com/cockroachdb/pebble/v2"
)

// writer is the part of a pebble.Batch that changes are written with.
type writer interface {
	Set(key, value []byte, _ *pebble.WriteOptions) error
	Delete(key []byte, _ *pebble.WriteOptions) error
	DeleteRange(start, end []byte, _ *pebble.WriteOptions) error
}

// staged collects a worker step's point writes so that they reach the batch
// in key order. Pebble inserts a batch into its memtable in batch order and
// remembers where the last insert went, so sorted keys turn most inserts
// into short steps from the previous one instead of a descent from the top
// of the skiplist. Range deletions go to the batch at once, ahead of every
// point write.
type staged struct {
	b     *pebble.Batch
	ops   []stagedOp
	arena []byte
}

type stagedOp struct {
	key, value []byte
	del        bool
}

func (s *staged) reset(b *pebble.Batch) {
	s.b, s.ops, s.arena = b, s.ops[:0], s.arena[:0]
}

func (s *staged) copy(p []byte) []byte {
	start := len(s.arena)
	s.arena = append(s.arena, p...)
	return s.arena[start:len(s.arena):len(s.arena)]
}

func (s *staged) Set(key, value []byte, _ *pebble.WriteOptions) error {
	s.ops = append(s.ops, stagedOp{key: key, value: s.copy(value)})
	return nil
}

func (s *staged) Delete(key []byte, _ *pebble.WriteOptions) error {
	s.ops = append(s.ops, stagedOp{key: key, del: true})
	return nil
}

// DeleteRange deletes [start, end) at once. The batch applies it before
// every staged point write, so the point writes staged before it, which it
// must shadow, are dropped here; those staged after it (a twin deleted and
// created again in one step) stay, and land after it.
func (s *staged) DeleteRange(start, end []byte, _ *pebble.WriteOptions) error {
	s.ops = slices.DeleteFunc(s.ops, func(op stagedOp) bool {
		return bytes.Compare(op.key, start) >= 0 && bytes.Compare(op.key, end) < 0
	})
	return s.b.DeleteRange(start, end, nil)
}

// flush writes the staged operations to the batch in key order. Operations
// on the same key keep their order, so the last one wins as written.
func (s *staged) flush() error {
	slices.SortStableFunc(s.ops, func(a, b stagedOp) int { return bytes.Compare(a.key, b.key) })
	for _, op := range s.ops {
		var err error
		if op.del {
			err = s.b.Delete(op.key, nil)
		} else {
			err = s.b.Set(op.key, op.value, nil)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
