package twin

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// Options configure an Engine. The zero value of every field is its default.
type Options struct {
	// Dir is the directory of the Pebble store. Default "twind-data".
	Dir string
	// Log, if set, makes the engine clustered: every change goes into this
	// replicated log, and is durable once the log holds it; the store is
	// the node's copy of the log (replicate.go).
	Log Log
	// Follow opens the engine as a follower of the replicated log: it
	// takes no requests and runs no timed work, and the log's entries
	// reach its store through ApplyEntry. A node that takes over closes
	// its follower and opens the store again with Log.
	Follow bool
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
	// CacheBytes bounds the memory of the twin cache and Pebble's block
	// cache together: a quarter goes to the block cache, the rest to the
	// workers' twin caches, in equal parts. Twins beyond it are read from
	// the store when they are needed. Default 512 MiB.
	CacheBytes int64
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
	if o.CacheBytes <= 0 {
		o.CacheBytes = 512 << 20
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
	if o.Follow && o.Log != nil {
		errs = append(errs, errors.New("twin: an engine that follows a log (Follow) cannot also append to one (Log)"))
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

// blockCacheBytes is the part of CacheBytes that goes to Pebble's block
// cache.
func (o *Options) blockCacheBytes() int64 { return o.CacheBytes / 4 }

// twinCacheBytes is the part of CacheBytes that goes to the twin caches.
func (o *Options) twinCacheBytes() int64 { return o.CacheBytes - o.blockCacheBytes() }
