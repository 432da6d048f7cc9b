package rules

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/twind-io/twind/twin"
)

// Errors of the registry.
var (
	ErrNotFound = errors.New("rules: not found")
	ErrExists   = errors.New("rules: already exists")
)

// Store keeps rule definitions durably. twin.Engine implements it.
type Store interface {
	PutRule(id string, def []byte) error
	DeleteRule(id string) error
	Rules() (map[string][]byte, error)
}

// Registry holds the rules in force: it checks and stores definitions, and
// installs a new Set, atomically for every twin, after each change. The
// rules in force keep running until a new definition has compiled. It is
// safe for concurrent use.
type Registry struct {
	store   Store
	install func(*Set)
	clock   func() time.Time
	hints   sizeHints

	// mu serializes changes and protects rules and statuses.
	mu       sync.Mutex
	rules    map[string]*Compiled
	statuses map[string]*Status
	flushed  map[string]StatusSnapshot // statuses as last stored
}

// NewRegistry loads the stored rules and installs them. limits are the
// document limits of the store's twins (zero fields mean twin's defaults):
// rules are cost-checked for twins within them (see CompileWithLimits). A
// stored rule that no longer compiles is logged and left out, so that one
// bad rule cannot keep the server from starting; one that compiles but
// would be refused today (see Compiled.Problems) is logged and keeps
// running, under the runtime cost limit.
//
// Rule statuses count the firings passed to the installed Set's Record.
func NewRegistry(store Store, install func(*Set), clock func() time.Time, log *slog.Logger, limits twin.Limits) (*Registry, error) {
	r := &Registry{store: store, install: install, clock: clock, hints: newSizeHints(limits),
		rules: map[string]*Compiled{}, statuses: map[string]*Status{}, flushed: map[string]StatusSnapshot{}}
	defs, err := store.Rules()
	if err != nil {
		return nil, fmt.Errorf("rules: load: %w", err)
	}
	for id, b := range defs {
		var def Definition
		if err := json.Unmarshal(b, &def); err != nil {
			log.Error("stored rule is corrupt; skipping it", "rule", id, "err", err)
			continue
		}
		c, err := compileRule(def, r.hints, false)
		if err != nil {
			log.Error("stored rule does not compile; skipping it", "rule", id, "err", err)
			continue
		}
		if c.Problems != nil {
			log.Warn("stored rule would be refused today; it keeps running: update it", "rule", id, "err", c.Problems)
		}
		c.status = statusFrom(def.Status)
		r.rules[id] = c
		r.statuses[id] = c.status
		r.flushed[id] = c.status.Snapshot()
	}
	r.installLocked()
	return r, nil
}

func (r *Registry) installLocked() {
	all := make([]*Compiled, 0, len(r.rules))
	for _, c := range r.rules {
		all = append(all, c)
	}
	r.install(NewSet(all))
}

// Create checks, stores and installs a new rule.
func (r *Registry) Create(def Definition) (*Compiled, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.rules[def.ID]; ok {
		return nil, fmt.Errorf("%w: rule %q; update it or choose another id", ErrExists, def.ID)
	}
	now := r.clock().UTC()
	def.Gen, def.CreateTime, def.UpdateTime = 1, now, now
	return r.putLocked(def, &Status{})
}

// Update replaces a rule. Twins' states for the rule are reset if what
// decides its firing (condition, trigger, hold_for, types) changed.
func (r *Registry) Update(def Definition) (*Compiled, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	old, ok := r.rules[def.ID]
	if !ok {
		return nil, fmt.Errorf("%w: rule %q", ErrNotFound, def.ID)
	}
	if def.Trigger == 0 {
		def.Trigger = Rising
	}
	def.Gen, def.CreateTime, def.UpdateTime = old.Def.Gen, old.Def.CreateTime, r.clock().UTC()
	if def.Condition != old.Def.Condition || def.Trigger != old.Def.Trigger || def.HoldFor != old.Def.HoldFor ||
		!slices.Equal(def.Types, old.Def.Types) {
		def.Gen++
	}
	return r.putLocked(def, r.statuses[def.ID])
}

// Compile checks and compiles a rule as Create and Update do, for the
// registry's document limits, without storing it.
func (r *Registry) Compile(def Definition) (*Compiled, error) {
	return compileRule(def, r.hints, true)
}

func (r *Registry) putLocked(def Definition, st *Status) (*Compiled, error) {
	c, err := r.Compile(def)
	if err != nil {
		return nil, err
	}
	c.status = st
	if err := r.storeLocked(c); err != nil {
		return nil, err
	}
	r.rules[def.ID] = c
	r.statuses[def.ID] = st
	r.installLocked()
	return c, nil
}

// storeLocked stores a rule with its current status.
func (r *Registry) storeLocked(c *Compiled) error {
	def := c.Def
	snap := c.status.Snapshot()
	def.Status = &snap
	b, err := json.Marshal(def)
	if err != nil {
		return err
	}
	if err := r.store.PutRule(def.ID, b); err != nil {
		return fmt.Errorf("rules: store %q: %w", def.ID, err)
	}
	r.flushed[def.ID] = snap
	return nil
}

// Flush stores the status of every rule whose counts changed since they
// were last stored. The server calls it periodically and when it stops, so
// that the counts survive restarts (a crash loses at most one period).
func (r *Registry) Flush() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for id, c := range r.rules {
		if c.status.Snapshot() != r.flushed[id] {
			errs = append(errs, r.storeLocked(c))
		}
	}
	return errors.Join(errs...)
}

// Delete deletes a rule; twins' states for it are dropped as they change.
func (r *Registry) Delete(id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.rules[id]; !ok {
		return fmt.Errorf("%w: rule %q", ErrNotFound, id)
	}
	if err := r.store.DeleteRule(id); err != nil {
		return fmt.Errorf("rules: delete %q: %w", id, err)
	}
	delete(r.rules, id)
	delete(r.statuses, id)
	delete(r.flushed, id)
	r.installLocked()
	return nil
}

// Get returns a rule.
func (r *Registry) Get(id string) (*Compiled, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c, ok := r.rules[id]
	if !ok {
		return nil, fmt.Errorf("%w: rule %q", ErrNotFound, id)
	}
	return c, nil
}

// List returns up to limit rules with ids after `after`, by id, and whether
// more follow.
func (r *Registry) List(after string, limit int) ([]*Compiled, bool) {
	r.mu.Lock()
	var all []*Compiled
	for id, c := range r.rules {
		if id > after {
			all = append(all, c)
		}
	}
	r.mu.Unlock()
	slices.SortFunc(all, func(a, b *Compiled) int { return strings.Compare(a.Def.ID, b.Def.ID) })
	if len(all) > limit {
		return all[:limit], true
	}
	return all, false
}
