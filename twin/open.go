package twin

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
)

// Open opens or creates the store in opts.Dir, loads what the workers must
// know of their shards (their sizes, retained commands, presence and pending
// rule marks: nothing per twin) and starts the workers. The caller must
// Close the engine.
func Open(opts Options) (*Engine, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	cache := pebble.NewCache(opts.blockCacheBytes())
	defer cache.Unref()
	health := newStoreHealth(opts.Logger)
	popts := &pebble.Options{
		FS:            opts.FS,
		Cache:         cache,
		Logger:        healthLogger{pebbleLogger{opts.Logger}, health},
		EventListener: health.listener(),
		MemTableSize:  opts.MemTableBytes,
	}
	for i := range popts.Levels {
		// Most reads are point lookups of one twin's keys, many of them
		// of keys that do not exist (a twin being created, a twin with no
		// seen key): a bloom filter answers those without reading data
		// blocks.
		popts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	db, err := pebble.Open(opts.Dir, popts)
	// Another process holds the lock (EAGAIN), or this one does (Pebble
	// says so in words).
	if errors.Is(err, syscall.EWOULDBLOCK) || errors.Is(err, syscall.EAGAIN) ||
		(err != nil && strings.Contains(err.Error(), "lock held by current process")) {
		return nil, fmt.Errorf("twin: the store in %s is in use by another process (another twind?); stop it or use another directory: %w", opts.Dir, err)
	}
	if err != nil {
		return nil, fmt.Errorf("twin: open store in %s: %w", opts.Dir, err)
	}
	e := &Engine{
		opts:    opts,
		db:      db,
		health:  health,
		apply:   applier{limits: opts.Limits},
		done:    make(chan struct{}),
		revWait: make(chan struct{}),
		revDone: map[int64]struct{}{},
		waiters: map[string][]chan *Command{},
	}
	if err := e.load(); err != nil {
		db.Close()
		return nil, err
	}
	if err := e.readApplied(); err != nil {
		db.Close()
		return nil, err
	}
	if opts.Follow {
		return e, nil // no workers: the log's entries reach the store through ApplyEntry
	}
	if opts.Log != nil {
		e.committer = newCommitter(e, opts.Log)
	}
	for _, w := range e.workers {
		if len(w.lost) > 0 {
			// The grace counts from now, when the engine serves, not from
			// the moment load met the first mark: loading every shard
			// takes a while, and a device cannot come back before Open
			// returns.
			w.lostAt = e.opts.Clock().Add(e.opts.PresenceGrace)
		}
		e.workerWG.Add(1)
		go w.run()
		e.syncWG.Add(1)
		go w.syncLoop()
	}
	return e, nil
}

// load reads the store's format, its revision and what the workers must
// know of their shards.
func (e *Engine) load() error {
	f, err := e.readFormat()
	if err != nil {
		return err
	}
	e.vshards = f.VShards
	if f.MaxHistoryLimit != e.opts.HistoryLimit {
		// Lowered (or not recorded): twins may hold entries beyond the
		// limit, which no point deletion would reach.
		e.trimHistory = f.MaxHistoryLimit == 0 || f.MaxHistoryLimit > e.opts.HistoryLimit
		if f.MaxHistoryLimit < e.opts.HistoryLimit {
			f.MaxHistoryLimit = e.opts.HistoryLimit
			b, _ := json.Marshal(f)
			if err := e.db.Set(keyFormat, b, pebble.Sync); err != nil {
				return fmt.Errorf("twin: record the history limit: %w", err)
			}
		}
	}
	e.workers = make([]*worker, min(e.opts.Workers, e.vshards))
	for i := range e.workers {
		e.workers[i] = &worker{
			e:      e,
			index:  i,
			inbox:  make(chan *op, e.opts.InboxSize),
			wake:   make(chan struct{}, 1),
			cache:  twinCache{m: map[string]*entry{}, limit: e.opts.twinCacheBytes() / int64(min(e.opts.Workers, e.vshards))},
			counts: map[uint16]int64{},
			sinks:  map[string]Sink{},

			ruleWake: map[string]time.Time{},
			// A few commits in flight per worker overlap the next
			// step's work with this one's fsync.
			syncCh: make(chan *group, 4),
		}
	}
	// Every committed change is in the watch log, and pruning never
	// reaches the newest entries, so the log's last key is the store's
	// revision. The oldest revision watchers may resume from is the one
	// pruning recorded, or, if it never did, the log's first (logchain.go).
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: prefixLog, UpperBound: prefixEnd(prefixLog)})
	if err != nil {
		return err
	}
	if it.Last() {
		e.rev = int64(binary.BigEndian.Uint64(it.Key()[len(prefixLog):]))
	}
	e.nextRev.Store(e.rev)
	e.logFloor = e.rev + 1
	if it.First() {
		e.logFloor = int64(binary.BigEndian.Uint64(it.Key()[len(prefixLog):]))
	}
	oldest := e.logFloor
	if v, closer, err := e.db.Get(keyLogOldest); err == nil {
		if len(v) == 8 {
			oldest = max(oldest, min(int64(binary.BigEndian.Uint64(v)), e.rev+1))
		}
		closer.Close()
	} else if !errors.Is(err, pebble.ErrNotFound) {
		it.Close()
		return err
	}
	e.oldest.Store(oldest)
	if err := it.Close(); err != nil {
		return err
	}

	// What shards written before twind kept their counts lack is written
	// in one batch, with one sync, rather than one per shard: a new store
	// has no counts either.
	up := e.db.NewBatch()
	defer up.Close()
	for vs := range e.vshards {
		_, closer, err := e.db.Get(countKey(uint16(vs)))
		switch {
		case errors.Is(err, pebble.ErrNotFound):
			// A store written before shards kept their counts.
			if err := e.upgradeShard(uint16(vs), up); err != nil {
				return fmt.Errorf("twin: upgrade virtual shard %d: %w", vs, err)
			}
		case err != nil:
			return err
		default:
			closer.Close()
		}
	}
	if !up.Empty() {
		if err := up.Commit(pebble.Sync); err != nil {
			return fmt.Errorf("twin: upgrade the store: %w", err)
		}
	}
	for vs := range e.vshards {
		if err := e.loadShard(uint16(vs)); err != nil {
			return err
		}
	}
	return e.ensureIndex()
}

// loadShard loads what a virtual shard's worker must know before it
// serves: how many twins the shard holds, its retained commands, and the
// twins marked connected or waiting for a hold_for. It reads no twin.
func (e *Engine) loadShard(vs uint16) error {
	v, closer, err := e.db.Get(countKey(vs))
	if err != nil {
		return err
	}
	if len(v) != 8 {
		closer.Close()
		return fmt.Errorf("twin: corrupt twin count of virtual shard %d: %q", vs, v)
	}
	n := int64(binary.BigEndian.Uint64(v))
	closer.Close()
	e.workers[int(vs)%len(e.workers)].counts[vs] = n
	e.twins.Add(n)
	for _, load := range []struct {
		section byte
		fn      func(key, value []byte) error
	}{
		{'o', e.loadOpenCommand},
		{'p', e.loadPresence},
		{'w', e.loadPending},
	} {
		if err := e.scanSection(vs, load.section, load.fn); err != nil {
			return err
		}
	}
	return nil
}

// scanSection calls fn with the key (after the section's prefix) and value
// of every key in a section of a virtual shard.
func (e *Engine) scanSection(vs uint16, section byte, fn func(key, value []byte) error) error {
	lower := shardPrefix(vs, section)
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: prefixEnd(lower)})
	if err != nil {
		return err
	}
	for it.First(); it.Valid(); it.Next() {
		if err := fn(it.Key()[len(lower):], it.Value()); err != nil {
			it.Close()
			return fmt.Errorf("%w (key %q)", err, it.Key())
		}
	}
	return errors.Join(it.Error(), it.Close())
}

// upgradeShard writes, once, what a store written before twind kept shard
// counts and marks lacks: the shard's twin count, a presence mark for each
// twin whose record says it is connected, a pending mark for each twin
// with a rule state waiting for a hold_for, and an open-command mark for
// each command not finished, to b. It reads the shard's twins and
// commands, as every start-up of those versions did.
func (e *Engine) upgradeShard(vs uint16, b *pebble.Batch) error {
	var n int64
	err := e.scanSection(vs, 't', func(id, value []byte) error {
		if isSubKey(id) {
			return nil
		}
		r, err := decodeRecord(value)
		if err != nil || r.Deleted {
			return err
		}
		n++
		if r.Twin.Presence.Connected {
			return b.Set(presenceKey(vs, string(id)), nil, nil)
		}
		return nil
	})
	if err != nil {
		return err
	}
	err = e.scanSection(vs, 'c', func(_, value []byte) error {
		cmd, err := decodeCommand(value)
		if err != nil || cmd.State.Final() {
			return err
		}
		return b.Set(openKey(vs, cmd.DeviceID, cmd.Seq), appendUint64(nil, uint64(cmd.ExpireTime.UnixNano())), nil)
	})
	if err != nil {
		return err
	}
	err = e.scanSection(vs, 'x', func(k, value []byte) error {
		i := bytes.IndexByte(k, 0)
		if i < 0 {
			return fmt.Errorf("twin: corrupt rule state key")
		}
		s, err := decodeRuleState(value)
		if err != nil || s.PendingSince.IsZero() {
			return err
		}
		return b.Set(pendingKey(vs, string(k[:i])), nil, nil)
	})
	if err != nil {
		return err
	}
	return b.Set(countKey(vs), appendUint64(nil, uint64(n)), nil)
}

// loadPresence notes a device that was connected when the process last
// stopped: it is not now.
func (e *Engine) loadPresence(id, _ []byte) error {
	w := e.workerFor(string(id))
	if w.lost[string(id)] {
		return nil // noted already
	}
	if w.lost == nil {
		w.lost = map[string]bool{} // lostAt is set when load is done (Open)
	}
	w.lost[string(id)] = true
	e.counters.connected.Add(1) // until marked disconnected
	return nil
}

// loadOpenCommand schedules the expiry of a command that is not finished,
// from its mark (openKey): start-up reads no command.
func (e *Engine) loadOpenCommand(k, value []byte) error {
	id, seq, ok := splitSeqKey(k)
	if !ok || len(value) != 8 {
		return fmt.Errorf("twin: corrupt open-command mark")
	}
	at := time.Unix(0, int64(binary.BigEndian.Uint64(value))).UTC()
	e.workerFor(id).expiries.addAt(id, seq, at)
	return nil
}

func (e *Engine) readFormat() (storeFormat, error) {
	v, closer, err := e.db.Get(keyFormat)
	if errors.Is(err, pebble.ErrNotFound) {
		f := storeFormat{VShards: e.opts.VShards, Format: formatVersion, MaxHistoryLimit: e.opts.HistoryLimit}
		b, _ := json.Marshal(f)
		// A new store has its (empty) index complete from the start:
		// ensureIndex, which runs after load has written the shards'
		// counts, could not tell it from a store written before the
		// index existed.
		batch := e.db.NewBatch()
		defer batch.Close()
		err := errors.Join(batch.Set(keyFormat, b, nil), batch.Set(keyIndex, []byte("1"), nil))
		if err == nil {
			err = batch.Commit(pebble.Sync)
		}
		if err != nil {
			return f, fmt.Errorf("twin: initialize store: %w", err)
		}
		return f, nil
	}
	if err != nil {
		return storeFormat{}, fmt.Errorf("twin: read store format: %w", err)
	}
	defer closer.Close()
	var f storeFormat
	if err := json.Unmarshal(v, &f); err != nil || f.VShards <= 0 || f.VShards > 1<<16 {
		return f, fmt.Errorf("twin: store format %q is not valid", v)
	}
	if err := convertStore(e.db, f, e.opts.Logger); err != nil {
		return f, err
	}
	f.Format = formatVersion
	return f, nil
}
