package twin

import (
	"sync/atomic"
	"time"
)

// Stats are the engine's running counts, for metrics. Counters only grow.
type Stats struct {
	Twins            int     // twins now
	ConnectedDevices int64   // device streams now
	Changes          int64   // committed changes that got a revision
	Commits          int64   // Pebble commits (worker steps)
	CommitSeconds    float64 // time from commit to durable, summed over commits
	CommandsSent     int64   // commands queued
	CommandsFinished int64   // commands that reached a final state
	RuleFirings      int64
	RuleErrors       int64
	Revision         int64
	// CachedTwins and CacheBytes are what the twin cache holds now;
	// CacheHits and CacheMisses count the workers' lookups of twins, a
	// miss being a read from the store.
	CachedTwins            int
	CacheBytes             int64
	CacheHits, CacheMisses int64
}

// counters are the engine's atomic counts behind Stats.
type counters struct {
	connected        atomic.Int64
	changes          atomic.Int64
	commits          atomic.Int64
	commitNanos      atomic.Int64
	commandsSent     atomic.Int64
	commandsFinished atomic.Int64
	ruleFirings      atomic.Int64
	ruleErrors       atomic.Int64
}

// Stats returns the engine's counts. It is safe for concurrent use.
func (e *Engine) Stats() Stats {
	c := &e.counters
	var cached int
	var bytes, hits, misses int64
	for _, w := range e.workers {
		w.mu.RLock()
		cached += len(w.cache.m)
		w.mu.RUnlock()
		bytes += w.cache.bytes.Load()
		hits += w.cache.hits.Load()
		misses += w.cache.misses.Load()
	}
	return Stats{
		CachedTwins:      cached,
		CacheBytes:       bytes,
		CacheHits:        hits,
		CacheMisses:      misses,
		Twins:            e.Len(),
		ConnectedDevices: c.connected.Load(),
		Changes:          c.changes.Load(),
		Commits:          c.commits.Load(),
		CommitSeconds:    time.Duration(c.commitNanos.Load()).Seconds(),
		CommandsSent:     c.commandsSent.Load(),
		CommandsFinished: c.commandsFinished.Load(),
		RuleFirings:      c.ruleFirings.Load(),
		RuleErrors:       c.ruleErrors.Load(),
		Revision:         e.Revision(),
	}
}

// count adds a durable group to the counters.
func (e *Engine) count(g *group) {
	c := &e.counters
	c.commits.Add(1)
	c.commitNanos.Add(int64(time.Since(g.start)))
	for _, ch := range g.changes {
		if ch.event != nil {
			c.changes.Add(1)
		}
		for _, cmd := range ch.writeCmds {
			switch {
			case cmd.State.Final():
				c.commandsFinished.Add(1)
			case cmd.State == CommandQueued || (cmd.State == CommandSent && cmd.CreateTime.Equal(cmd.UpdateTime)):
				c.commandsSent.Add(1)
			}
		}
		for _, f := range ch.firings {
			if f.Err != nil {
				c.ruleErrors.Add(1)
			} else {
				c.ruleFirings.Add(1)
			}
		}
		// Counted from presence itself, whatever changed it: a connect,
		// a disconnect, a deletion, a revoked token, a restart's lost
		// devices.
		was := ch.prev != nil && ch.prev.Presence.Connected
		is := ch.next != nil && ch.next.Presence.Connected
		switch {
		case is && !was:
			c.connected.Add(1)
		case was && !is:
			c.connected.Add(-1)
		}
	}
}
