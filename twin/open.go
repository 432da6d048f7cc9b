package twin

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/google/btree"
)

// Open opens or creates the store in opts.Dir, loads every twin into its
// shard and starts the workers. The caller must Close the engine.
func Open(opts Options) (*Engine, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	cache := pebble.NewCache(opts.PebbleCacheBytes)
	defer cache.Unref()
	health := newStoreHealth(opts.Logger)
	db, err := pebble.Open(opts.Dir, &pebble.Options{
		FS:            opts.FS,
		Cache:         cache,
		Logger:        healthLogger{pebbleLogger{opts.Logger}, health},
		EventListener: health.listener(),
		MemTableSize:  opts.MemTableBytes,
	})
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
		ids:     btree.NewOrderedG[string](32),
	}
	if err := e.load(); err != nil {
		db.Close()
		return nil, err
	}
	for _, w := range e.workers {
		e.workerWG.Add(1)
		go w.run()
		e.syncWG.Add(1)
		go w.syncLoop()
	}
	return e, nil
}

// load reads the store's format, its revision and every twin.
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
			e:       e,
			inbox:   make(chan *op, e.opts.InboxSize),
			wake:    make(chan struct{}, 1),
			twins:   map[string]*Twin{},
			gone:    map[string]goneTwin{},
			view:    map[string]*Twin{},
			sinks:   map[string]Sink{},
			cmds:    map[string]*commandList{},
			cmdView: map[string]*commandList{},

			ruleStates: map[string]map[string]RuleState{},
			ruleWake:   map[string]time.Time{},
			// A few commits in flight per worker overlap the next
			// step's work with this one's fsync.
			syncCh: make(chan *group, 4),
		}
	}
	// Every committed change is in the watch log, and pruning never
	// reaches the newest entries, so the log's last key is the store's
	// revision and its first the oldest that watchers can resume from.
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: prefixLog, UpperBound: prefixEnd(prefixLog)})
	if err != nil {
		return err
	}
	if it.Last() {
		e.rev = int64(binary.BigEndian.Uint64(it.Key()[len(prefixLog):]))
	}
	e.nextRev.Store(e.rev)
	if it.First() {
		e.oldest.Store(int64(binary.BigEndian.Uint64(it.Key()[len(prefixLog):])))
	} else {
		e.oldest.Store(e.rev + 1)
	}
	if err := it.Close(); err != nil {
		return err
	}

	for vs := range e.vshards {
		if err := e.loadShard(uint16(vs)); err != nil {
			return err
		}
	}
	return e.ensureIndex()
}

// loadShard loads the twins of one virtual shard, their commands, presence
// marks and rule states.
func (e *Engine) loadShard(vs uint16) error {
	for _, load := range []struct {
		section byte
		fn      func(key, value []byte) error
	}{
		{'t', e.loadTwin},
		{'c', e.loadCommand},
		{'p', e.loadPresence},
		{'x', e.loadRuleState},
	} {
		lower := shardPrefix(vs, load.section)
		it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: prefixEnd(lower)})
		if err != nil {
			return err
		}
		for it.First(); it.Valid(); it.Next() {
			if err := load.fn(it.Key()[len(lower):], it.Value()); err != nil {
				it.Close()
				return fmt.Errorf("%w (key %q)", err, it.Key())
			}
		}
		if err := errors.Join(it.Error(), it.Close()); err != nil {
			return err
		}
	}
	return nil
}

// loadTwin loads a twin record, keyed by the twin's id.
func (e *Engine) loadTwin(id, value []byte) error {
	r, err := decodeRecord(value)
	if err != nil {
		return err
	}
	if r.Deleted {
		return nil // read again only if the id is created again
	}
	w := e.workerFor(string(id))
	w.twins[r.Twin.ID] = r.Twin
	w.view[r.Twin.ID] = r.Twin
	e.ids.ReplaceOrInsert(r.Twin.ID)
	if r.Twin.Presence.Connected {
		// A store written before presence marks existed has none: while
		// start-up reads every twin anyway, the twin itself says so.
		e.loadPresence(id, nil)
	}
	return nil
}

// loadPresence notes a device that was connected when the process last
// stopped: it is not now.
func (e *Engine) loadPresence(id, _ []byte) error {
	w := e.workerFor(string(id))
	if w.lost[string(id)] {
		return nil // noted already
	}
	if w.lost == nil {
		w.lost = map[string]bool{}
		w.lostAt = e.opts.Clock().Add(e.opts.PresenceGrace)
	}
	w.lost[string(id)] = true
	e.counters.connected.Add(1) // until marked disconnected
	return nil
}

// loadCommand loads a retained command.
func (e *Engine) loadCommand(_, value []byte) error {
	cmd, err := decodeCommand(value)
	if err != nil {
		return err
	}
	w := e.workerFor(cmd.DeviceID)
	l := w.cmds[cmd.DeviceID]
	if l == nil {
		l = &commandList{}
	}
	l.cmds = append(l.cmds, cmd) // keys, and so commands, are in sequence order
	w.cmds[cmd.DeviceID] = l
	w.cmdView[cmd.DeviceID] = l
	if !cmd.State.Final() {
		w.expiries.add(cmd)
	}
	return nil
}

func (e *Engine) readFormat() (storeFormat, error) {
	v, closer, err := e.db.Get(keyFormat)
	if errors.Is(err, pebble.ErrNotFound) {
		f := storeFormat{VShards: e.opts.VShards, Format: formatVersion, MaxHistoryLimit: e.opts.HistoryLimit}
		b, _ := json.Marshal(f)
		if err := e.db.Set(keyFormat, b, pebble.Sync); err != nil {
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
	if f.Format != formatVersion {
		return f, fmt.Errorf("twin: store format %d is not supported (this build reads format %d)", f.Format, formatVersion)
	}
	return f, nil
}
