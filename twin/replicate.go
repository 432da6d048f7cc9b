package twin

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/cockroachdb/pebble/v2"
)

// A clustered engine commits to a replicated log before its store: the log
// is the source of truth, and the store each node's materialized copy of
// it. Every write the engine makes to its store that other nodes must see
// (a worker step's batch, a rule, an API key) goes into one log entry
// first, and into the store only once the log holds it durably; the
// entry's position in the log goes into the store in the same batch, under
// m/applied, so that a node that restarts (or took a power cut) replays
// the log from exactly there. Writes a node makes for itself alone (the
// watch log's pruning, the secondary index, the store's format) stay out
// of the log.
//
// An entry is the representations of one or more Pebble batches, each
// behind its length as a uvarint. Applying a batch twice, or a suffix of
// the log again in order, leaves the store as applying it once: every
// write in a batch is a set or a deletion of a value the worker computed,
// never a read-modify-write.

// keyApplied holds the position (big-endian uint64) of the last log entry
// the store holds.
var keyApplied = []byte("m/applied")

// Log is the replicated log a clustered engine commits to.
type Log interface {
	// Append durably appends entry to the log under this node's
	// ownership, and returns its position. Positions grow with every
	// append. An error means the entry may or may not be in the log, and
	// the engine stops: its working state may now be ahead of the log.
	Append(ctx context.Context, entry []byte) (pos uint64, err error)
}

// maxEntryBytes bounds the batches the committer puts in one entry; a
// single batch larger than that is an entry of its own, which the Log
// splits as it must.
const maxEntryBytes = 1 << 20

// committer appends the batches of every worker (and of the engine's own
// writes) to the log, many in one entry, in the order it received them,
// then applies each entry to the store in log order. It is the only writer
// of replicated state to a clustered engine's store.
type committer struct {
	e    *Engine
	log  Log
	reqs chan *commitReq
	wg   sync.WaitGroup
	err  error // the first failure; every later request fails with it
}

type commitReq struct {
	b    *pebble.Batch
	done chan error
}

func newCommitter(e *Engine, log Log) *committer {
	c := &committer{e: e, log: log, reqs: make(chan *commitReq, 4*len(e.workers)+16)}
	c.wg.Add(1)
	go c.run()
	return c
}

// commit appends b to the log and applies it to the store, and returns
// once both are done. It takes b over: b is closed when commit returns.
func (c *committer) commit(b *pebble.Batch) error {
	return <-c.send(b).done
}

func (c *committer) send(b *pebble.Batch) *commitReq {
	r := &commitReq{b: b, done: make(chan error, 1)}
	c.reqs <- r
	return r
}

// stop ends the committer once every request sent is answered. No commit
// may be sent after it.
func (c *committer) stop() {
	close(c.reqs)
	c.wg.Wait()
}

func (c *committer) run() {
	defer c.wg.Done()
	var (
		batch []*commitReq
		entry []byte
	)
	for r := range c.reqs {
		batch = append(batch[:0], r)
		size := len(r.b.Repr())
	drain:
		for size < maxEntryBytes {
			select {
			case next, ok := <-c.reqs:
				if !ok {
					break drain
				}
				batch = append(batch, next)
				size += len(next.b.Repr())
			default:
				break drain
			}
		}
		err := c.err
		if err == nil {
			entry = entry[:0]
			for _, r := range batch {
				entry = appendBatch(entry, r.b.Repr())
			}
			err = c.append(entry, batch)
			if err != nil {
				c.err = err
			}
		}
		for _, r := range batch {
			r.b.Close()
			r.done <- err
		}
	}
}

func (c *committer) append(entry []byte, batch []*commitReq) error {
	pos, err := c.log.Append(context.Background(), entry)
	if err != nil {
		return fmt.Errorf("append to the replicated log: %w", err)
	}
	all := batch[0].b
	for _, r := range batch[1:] {
		if err := all.Apply(r.b, nil); err != nil {
			return fmt.Errorf("apply a log entry: %w", err)
		}
	}
	if err := all.Set(keyApplied, binary.BigEndian.AppendUint64(nil, pos), nil); err != nil {
		return err
	}
	// No fsync: the log holds the entry on a quorum's disks, and a store
	// that loses its tail replays it from the log.
	if err := c.e.db.Apply(all, pebble.NoSync); err != nil {
		return fmt.Errorf("apply a log entry to the store: %w", err)
	}
	c.e.applied.Store(pos)
	return nil
}

func appendBatch(entry, repr []byte) []byte {
	entry = binary.AppendUvarint(entry, uint64(len(repr)))
	return append(entry, repr...)
}

// ApplyEntry applies the log entry at position pos to the store of a
// following engine (Options.Follow). Entries must come in log order; an
// entry at or below Applied is skipped. A nil entry (a record of the log
// that holds no writes, such as an owner's fence) only advances Applied.
func (e *Engine) ApplyEntry(pos uint64, entry []byte) error {
	if !e.opts.Follow {
		return errors.New("twin: ApplyEntry on an engine that does not follow a log")
	}
	if err := e.err(); err != nil {
		return err
	}
	if pos <= e.applied.Load() {
		return nil
	}
	all := e.db.NewBatch()
	defer all.Close()
	for rest := entry; len(rest) > 0; {
		n, w := binary.Uvarint(rest)
		if w <= 0 || uint64(len(rest)-w) < n {
			return fmt.Errorf("twin: log entry %d is malformed", pos)
		}
		b := e.db.NewBatch()
		err := b.SetRepr(append([]byte(nil), rest[w:w+int(n)]...))
		if err == nil {
			err = all.Apply(b, nil)
		}
		b.Close()
		if err != nil {
			return fmt.Errorf("twin: log entry %d: %w", pos, err)
		}
		rest = rest[w+int(n):]
	}
	if err := all.Set(keyApplied, binary.BigEndian.AppendUint64(nil, pos), nil); err != nil {
		return err
	}
	top := lastLogRevision(all)
	if err := e.db.Apply(all, pebble.NoSync); err != nil {
		e.fail(fmt.Errorf("apply log entry %d: %w", pos, err))
		return err
	}
	e.applied.Store(pos)
	if top > 0 {
		// The follower prunes its watch log as an owner does (its own
		// write, out of the log): a standby's store stays within the
		// retention, and so does the watch log it serves from once it
		// owns the shards.
		e.revMu.Lock()
		e.rev = max(e.rev, top)
		e.pruneLog()
		e.revMu.Unlock()
	}
	return nil
}

// lastLogRevision returns the newest revision b writes to the watch log,
// 0 if none.
func lastLogRevision(b *pebble.Batch) int64 {
	var top int64
	r := b.Reader()
	for {
		_, k, _, ok, err := r.Next()
		if !ok || err != nil {
			return top
		}
		if len(k) == len(prefixLog)+8 && bytes.HasPrefix(k, prefixLog) {
			top = max(top, int64(binary.BigEndian.Uint64(k[len(prefixLog):])))
		}
	}
}

// Applied returns the position of the last log entry the store holds: 0
// for a store that has never been part of a cluster.
func (e *Engine) Applied() uint64 { return e.applied.Load() }

// readApplied reads keyApplied at open.
func (e *Engine) readApplied() error {
	v, closer, err := e.db.Get(keyApplied)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	defer closer.Close()
	if len(v) != 8 {
		return fmt.Errorf("twin: %s is %d bytes, want 8", keyApplied, len(v))
	}
	e.applied.Store(binary.BigEndian.Uint64(v))
	return nil
}

// commitDirect durably writes b, a write of the engine outside the
// workers' steps (a rule, an API key): through the log when the engine is
// clustered. It takes b over.
func (e *Engine) commitDirect(b *pebble.Batch) error {
	if e.opts.Follow {
		b.Close()
		return ErrFollowing
	}
	if e.committer == nil {
		defer b.Close()
		return e.db.Apply(b, pebble.Sync)
	}
	e.closeMu.RLock()
	if e.closed {
		e.closeMu.RUnlock()
		b.Close()
		return ErrClosed
	}
	r := e.committer.send(b)
	e.closeMu.RUnlock()
	if err := <-r.done; err != nil {
		e.fail(err)
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return nil
}

// ErrFollowing: the engine follows a log (Options.Follow) and takes no
// changes of its own.
var ErrFollowing = errors.New("twin: this engine follows the replicated log and takes no changes")
