package twin

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/google/btree"
)

// Options configure an Engine. The zero value of every field is its default.
type Options struct {
	// Dir is the directory of the Pebble store. Default "twind-data".
	Dir string
	// FS is the filesystem of the store. Default vfs.Default; tests use
	// vfs.NewMem().
	FS vfs.FS
	// Clock tells the time. Default time.Now.
	Clock func() time.Time
	// Logger receives the engine's logs. Default slog.Default().
	Logger *slog.Logger
	// VShards is the number of virtual shards of a new store. It is recorded
	// in the store when the store is created and never changes; for an
	// existing store this field is ignored. Default 256.
	VShards int
	// Workers is the number of shard worker goroutines. Default
	// 2*GOMAXPROCS.
	Workers int
	// InboxSize bounds each worker's queue of pending requests; a full inbox
	// blocks the sender. Default 1024.
	InboxSize int
	// MaxBatch bounds how many requests a worker applies in one step.
	// Default 512.
	MaxBatch int
	// Limits bound documents.
	Limits Limits
	// HistoryLimit is how many versions of each twin ListTwinHistory keeps,
	// as long as they are still in the watch log (see LogRetention).
	// Default 100.
	HistoryLimit int
	// LogRetention is how many revisions the watch log keeps, so that
	// watchers can resume from a revision at most this old. Default
	// 1,000,000.
	LogRetention int64
	// CommandQueueLimit bounds each device's unfinished commands; more are
	// refused with ErrOverloaded. Default 100.
	CommandQueueLimit int
	// CommandRetention is how many finished commands are kept per device.
	// Default 100.
	CommandRetention int
	// DefaultCommandTTL is the ttl of a command sent without one. Default
	// 1 hour.
	DefaultCommandTTL time.Duration
	// MaxCommandTTL bounds a command's ttl. Default 7 days.
	MaxCommandTTL time.Duration
	// RuleTick is how often rules that read `now` are re-evaluated for
	// every twin they select, without a change. Default 10s.
	RuleTick time.Duration
	// PresenceGrace is how long, after a restart, a device that was
	// connected when the process stopped has to connect again before its
	// twin is marked disconnected (and rules watching presence see it go).
	// It spares a fleet that reconnects at once a storm of offline and
	// online changes. Default 10s.
	PresenceGrace time.Duration
	// StepCostBudget is the CEL cost a worker step may spend on timed rule
	// evaluations (wake-ups and ticks) before it leaves the rest to its
	// next step, so that requests waiting in its inbox are not held up by
	// a tick over many twins. Evaluations caused by requests always run.
	// Default 2,000,000 (about twice the cost limit of one evaluation).
	StepCostBudget uint64
	// OnFirings, if set, is called with rule firings and errors once the
	// changes they belong to are durable, in commit order per twin. It
	// must not block.
	OnFirings func([]FiringEvent)
	// PebbleCacheBytes is the size of Pebble's block cache. Default 64 MiB.
	PebbleCacheBytes int64
	// MemTableBytes is the size of each Pebble memtable. A large memtable
	// absorbs the rewrites of busy twins before they reach disk. Default
	// 64 MiB.
	MemTableBytes uint64
}

// EnsureDefaults fills the zero fields of o with their defaults.
func (o *Options) EnsureDefaults() {
	if o.Dir == "" {
		o.Dir = "twind-data"
	}
	if o.FS == nil {
		o.FS = vfs.Default
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.VShards <= 0 {
		o.VShards = 256
	}
	if o.Workers <= 0 {
		o.Workers = 2 * runtime.GOMAXPROCS(0)
	}
	if o.InboxSize <= 0 {
		o.InboxSize = 1024
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 512
	}
	o.Limits.EnsureDefaults()
	if o.HistoryLimit <= 0 {
		o.HistoryLimit = 100
	}
	if o.LogRetention <= 0 {
		o.LogRetention = 1_000_000
	}
	if o.CommandQueueLimit <= 0 {
		o.CommandQueueLimit = 100
	}
	if o.CommandRetention <= 0 {
		o.CommandRetention = 100
	}
	if o.DefaultCommandTTL <= 0 {
		o.DefaultCommandTTL = time.Hour
	}
	if o.MaxCommandTTL <= 0 {
		o.MaxCommandTTL = 7 * 24 * time.Hour
	}
	if o.DefaultCommandTTL > o.MaxCommandTTL {
		o.DefaultCommandTTL = o.MaxCommandTTL
	}
	if o.RuleTick <= 0 {
		o.RuleTick = 10 * time.Second
	}
	if o.PresenceGrace <= 0 {
		o.PresenceGrace = 10 * time.Second
	}
	if o.StepCostBudget == 0 {
		o.StepCostBudget = 2_000_000
	}
	if o.PebbleCacheBytes <= 0 {
		o.PebbleCacheBytes = 64 << 20
	}
	if o.MemTableBytes == 0 {
		o.MemTableBytes = 64 << 20
	}
}

// Validate reports every problem with o at once.
func (o *Options) Validate() error {
	var errs []error
	if o.VShards > 1<<16 {
		errs = append(errs, fmt.Errorf("twin: VShards is %d, at most 65536", o.VShards))
	}
	if o.Workers > 4096 {
		errs = append(errs, fmt.Errorf("twin: Workers is %d, at most 4096", o.Workers))
	}
	if o.Limits.MaxDocumentBytes > 16<<20 {
		errs = append(errs, fmt.Errorf("twin: MaxDocumentBytes is %d, at most 16 MiB", o.Limits.MaxDocumentBytes))
	}
	if o.Limits.MaxDepth > 100 {
		errs = append(errs, fmt.Errorf("twin: MaxDepth is %d, at most 100", o.Limits.MaxDepth))
	}
	return errors.Join(errs...)
}

// Engine holds every twin in memory, partitioned into virtual shards served
// by worker goroutines, and keeps them durable in Pebble.
//
// Every mutation of a twin is applied by the one worker that owns the twin,
// so a twin's changes are totally ordered and need no lock. Workers hand
// their batches to a single committer that merges the batches of all workers
// into one Pebble commit with a synced WAL (group commit); a request is
// answered only after its commit is durable, and only then do readers and
// watchers see it.
//
// An Engine is safe for concurrent use.
type Engine struct {
	opts    Options
	db      *pebble.DB
	vshards int
	workers []*worker
	apply   applier

	// closeMu guards closed and the sends on worker inboxes, so that Close
	// can close the inboxes with no sender left.
	closeMu sync.RWMutex
	closed  bool

	workerWG sync.WaitGroup // the workers
	syncWG   sync.WaitGroup // the workers' syncers
	readerWG sync.WaitGroup // watchers and other long readers of db
	done     chan struct{}  // closed by Close, for watchers

	// nextRev is the last revision handed out.
	nextRev atomic.Int64
	// failed holds the error that stopped the engine, if any.
	failed atomic.Pointer[error]
	// health tracks the store's failures (see Health).
	health *storeHealth

	// revMu protects the durable revision watermark and its broadcast.
	revMu   sync.Mutex
	rev     int64              // every revision <= rev is durable or never will be
	revWait chan struct{}      // closed and replaced when rev advances
	revDone map[int64]struct{} // durable revisions above rev
	// trimHistory says that the history limit was lowered since the store
	// was created: every new history entry also trims what is beyond it.
	trimHistory bool
	// oldest is the oldest revision still in the watch log.
	oldest atomic.Int64

	counters counters

	// idxMu protects ids, the ordered set of committed twin ids that List
	// pages through.
	idxMu sync.RWMutex
	ids   *btree.BTreeG[string]

	// evaluator holds the rules in force.
	evaluator atomic.Pointer[evaluatorBox]

	// waitMu protects waiters: the channels of WaitCommand calls, by
	// command id.
	waitMu  sync.Mutex
	waiters map[string][]chan *Command
}

// group is one worker step's worth of changes, with the batch that commits
// them, or the error that kept them from committing.
type group struct {
	w       *worker
	start   time.Time
	batch   *pebble.Batch
	err     error
	changes []*change
}

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
	return nil
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
	return nil
}

// loadPresence notes a device that was connected when the process last
// stopped: it is not now.
func (e *Engine) loadPresence(id, _ []byte) error {
	w := e.workerFor(string(id))
	if w.lost == nil {
		w.lost = map[string]bool{}
		w.lostAt = e.opts.Clock().Add(e.opts.PresenceGrace)
	}
	w.lost[string(id)] = true
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

// VShard returns the virtual shard of a twin id.
func (e *Engine) VShard(id string) uint16 {
	h := fnv.New32a()
	h.Write([]byte(id))
	return uint16(h.Sum32() % uint32(e.vshards))
}

func (e *Engine) workerFor(id string) *worker {
	return e.workers[int(e.VShard(id))%len(e.workers)]
}

// Close stops accepting requests, finishes the ones accepted, ends watches
// and closes the store. It returns when nothing of the engine is running.
func (e *Engine) Close() error {
	e.closeMu.Lock()
	if e.closed {
		e.closeMu.Unlock()
		return ErrClosed
	}
	e.closed = true
	for _, w := range e.workers {
		close(w.inbox)
	}
	e.closeMu.Unlock()

	e.workerWG.Wait()
	e.syncWG.Wait()
	close(e.done)
	e.readerWG.Wait()
	return e.db.Close()
}

// Len returns the number of twins.
func (e *Engine) Len() int {
	n := 0
	for _, w := range e.workers {
		w.mu.RLock()
		n += len(w.view)
		w.mu.RUnlock()
	}
	return n
}

// Revision returns the store's current revision: every change up to it is
// durable and visible to readers.
func (e *Engine) Revision() int64 {
	e.revMu.Lock()
	defer e.revMu.Unlock()
	return e.rev
}

func (e *Engine) err() error {
	if p := e.failed.Load(); p != nil {
		return fmt.Errorf("%w: the store failed: %v", ErrClosed, *p)
	}
	return nil
}

// fail stops the engine from accepting more changes after a store error it
// cannot recover from: the in-memory state may then be ahead of the store.
func (e *Engine) fail(err error) {
	if e.failed.CompareAndSwap(nil, &err) {
		e.opts.Logger.Error("store commit failed; refusing all further changes", "err", err)
		e.health.setFatal(err)
	}
}

// do hands an op to its worker and waits for the twin it answers.
func (e *Engine) do(ctx context.Context, o *op) (*Twin, error) {
	r, err := e.submit(ctx, o)
	return r.Twin, err
}

// submit hands an op to its worker and waits for the answer.
func (e *Engine) submit(ctx context.Context, o *op) (Result, error) {
	if err := e.start(ctx, o); err != nil {
		return Result{}, err
	}
	select {
	case r := <-o.done:
		return r, r.Err
	case <-ctx.Done():
		// The op may still commit; the caller cannot know.
		return Result{}, ctx.Err()
	}
}

// start hands an op to its worker without waiting for the answer, which
// arrives on o.done. A full inbox blocks until there is room or ctx is done.
func (e *Engine) start(ctx context.Context, o *op) error {
	if err := ValidateID(o.id); err != nil {
		return err
	}
	if err := e.err(); err != nil {
		return err
	}
	o.done = make(chan Result, 1)
	w := e.workerFor(o.id)
	e.closeMu.RLock()
	defer e.closeMu.RUnlock()
	if e.closed {
		return ErrClosed
	}
	select {
	case w.inbox <- o:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Pending is a request handed to the engine whose answer has not been
// waited for.
type Pending struct{ o *op }

// Done delivers the answer, once, when the request is durable or has
// failed.
func (p Pending) Done() <-chan Result { return p.o.done }

// RunTimers makes every worker do its timed work (command expiry, hold_for,
// rule ticks) as of the engine's clock now, and returns once that work is
// durable. Workers do this by themselves on time; RunTimers is for tests and
// tools that drive a fake clock.
func (e *Engine) RunTimers(ctx context.Context) error {
	ops := make([]*op, len(e.workers))
	e.closeMu.RLock()
	if e.closed {
		e.closeMu.RUnlock()
		return ErrClosed
	}
	for i, w := range e.workers {
		ops[i] = &op{kind: opPoke, done: make(chan Result, 1)}
		select {
		case w.inbox <- ops[i]:
		case <-ctx.Done():
			e.closeMu.RUnlock()
			return ctx.Err()
		}
	}
	e.closeMu.RUnlock()
	for _, o := range ops {
		select {
		case r := <-o.done:
			if r.Err != nil {
				return r.Err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// StartReport hands a report to the engine and returns without waiting for
// it to be durable. Reports of one device are applied in the order they are
// started.
func (e *Engine) StartReport(ctx context.Context, req PatchRequest) (Pending, error) {
	if req.Source == "" {
		req.Source = SourceDevice
	}
	o := &op{kind: opReport, id: req.ID, patch: &req}
	return Pending{o}, e.start(ctx, o)
}

// Create creates a twin. It fails with ErrAlreadyExists if the id is taken.
func (e *Engine) Create(ctx context.Context, req CreateRequest) (*Twin, error) {
	if req.Source == "" {
		req.Source = SourceAPI
	}
	return e.do(ctx, &op{kind: opCreate, id: req.ID, create: &req})
}

// Report merges a patch into a twin's reported state.
func (e *Engine) Report(ctx context.Context, req PatchRequest) (*Twin, error) {
	if req.Source == "" {
		req.Source = SourceDevice
	}
	return e.do(ctx, &op{kind: opReport, id: req.ID, patch: &req})
}

// UpdateDesired merges a patch into a twin's desired state.
func (e *Engine) UpdateDesired(ctx context.Context, req PatchRequest) (*Twin, error) {
	if req.Source == "" {
		req.Source = SourceAPI
	}
	return e.do(ctx, &op{kind: opDesired, id: req.ID, patch: &req})
}

// Update changes a twin's type and labels.
func (e *Engine) Update(ctx context.Context, req UpdateRequest) (*Twin, error) {
	if req.Source == "" {
		req.Source = SourceAPI
	}
	return e.do(ctx, &op{kind: opUpdate, id: req.ID, update: &req})
}

// Delete deletes a twin and its history. expectedVersion, if not 0, must be
// the twin's version.
func (e *Engine) Delete(ctx context.Context, id string, expectedVersion int64) error {
	_, err := e.do(ctx, &op{kind: opDelete, id: id, expect: expectedVersion})
	return err
}

// SetTokenHash durably replaces the hash of a twin's device token. It does
// not change the twin's version.
func (e *Engine) SetTokenHash(ctx context.Context, id string, hash []byte) error {
	_, err := e.do(ctx, &op{kind: opToken, id: id, token: hash})
	return err
}

// Get returns the committed state of a twin.
func (e *Engine) Get(id string) (*Twin, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	w := e.workerFor(id)
	w.mu.RLock()
	t, ok := w.view[id]
	w.mu.RUnlock()
	if !ok {
		return nil, notFound(id)
	}
	return t, nil
}

// List calls fn with the committed twins whose ids sort after `after`, in
// id order, until fn returns false, ctx is done or the engine closes. It
// returns the revision up to which every change is reflected in the twins
// it passed to fn, and ctx's error if ctx ended the scan, ErrClosed if Close
// did, and otherwise nil. fn runs on the caller's goroutine with no lock
// held; it must not modify the twin. A twin deleted during the scan may be
// skipped.
func (e *Engine) List(ctx context.Context, after string, fn func(*Twin) bool) (rev int64, err error) {
	rev = e.Revision()
	const batch = 256
	ids := make([]string, 0, batch)
	for {
		if err := e.readStopped(ctx); err != nil {
			return rev, err
		}
		// Take the next ids in order, then look them up without the lock.
		ids = ids[:0]
		e.idxMu.RLock()
		e.ids.AscendGreaterOrEqual(after+"\x00", func(id string) bool {
			ids = append(ids, id)
			return len(ids) < batch
		})
		e.idxMu.RUnlock()
		for _, id := range ids {
			t, err := e.Get(id)
			if err != nil {
				continue // deleted meanwhile
			}
			if err := e.readStopped(ctx); err != nil {
				return rev, err
			}
			if !fn(t) {
				return rev, nil
			}
		}
		if len(ids) < batch {
			return rev, nil
		}
		after = ids[len(ids)-1]
	}
}

// History returns up to limit of a twin's retained events with versions
// below `before` (0 for no bound), newest first. Events of a deleted twin
// are gone with it.
func (e *Engine) History(id string, before int64, limit int) ([]*Event, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if _, err := e.Get(id); err != nil {
		return nil, err
	}
	// The store holds changes whose commit is not yet durable: nothing
	// after the durable revision may be shown.
	durable := e.Revision()
	vs := e.VShard(id)
	lower := historyPrefix(vs, id)
	upper := prefixEnd(lower)
	if before > 0 {
		upper = historyKey(vs, id, before)
	}
	if !e.startReader() {
		return nil, ErrClosed
	}
	defer e.readerWG.Done()
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var evs []*Event
	for it.Last(); it.Valid() && len(evs) < limit; it.Prev() {
		if len(it.Value()) != 8 {
			return nil, fmt.Errorf("twin: corrupt history entry %q", it.Key())
		}
		rev := int64(binary.BigEndian.Uint64(it.Value()))
		if rev > durable {
			continue
		}
		v, closer, err := e.db.Get(logKey(rev))
		if errors.Is(err, pebble.ErrNotFound) {
			break // older entries have left the watch log
		}
		if err != nil {
			return nil, err
		}
		ev, err := decodeEvent(v)
		closer.Close()
		if err != nil {
			return nil, err
		}
		evs = append(evs, ev)
	}
	return evs, it.Error()
}

// startReader registers a reader of the store that Close waits for. It
// reports false once the engine is closing.
func (e *Engine) startReader() bool {
	e.closeMu.RLock()
	defer e.closeMu.RUnlock()
	if e.closed {
		return false
	}
	e.readerWG.Add(1)
	return true
}

// pebbleLogger sends Pebble's logs to slog.
type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any) {
	p.l.Debug(fmt.Sprintf(format, args...), "component", "pebble")
}
func (p pebbleLogger) Errorf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...), "component", "pebble")
}
func (p pebbleLogger) Fatalf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...), "component", "pebble")
	panic(fmt.Sprintf(format, args...))
}
