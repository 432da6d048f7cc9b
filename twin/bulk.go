package twin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/cockroachdb/pebble/v2"

	"github.com/twind-io/twind/internal/parallel"
)

// Bulk import and export.
//
// An import hands each worker one op per batch (opImport) with the twins of
// its shards. The worker applies them in order with its other requests:
// it refuses ids that exist (unless upsert), writes the twin records, their
// commands and rule states, and no watch-log entry: an imported twin has
// revision 0, and its one history entry, of its imported version, points at
// revision 0, as if the log had pruned its event. The
// batch is answered once durable, like every other op. When the whole import
// is done, MarkImport writes one KindImported event to the watch log, which
// tells watchers to read the fleet again.
//
// An export reads a Pebble snapshot, taken once every write in it is
// durable, so that nothing exported can be lost to a crash.

// KindImported is the kind of the one event an import leaves in the watch
// log, once its twins are durable (see MarkImport). Its Twin is nil; its
// Patch is a summary: {"twins": <count imported>}.
const KindImported EventKind = 100

// SourceImport is the source of an import's marker event.
const SourceImport Source = "import"

// ImportItem is one twin to import, with what a restore brings back with it.
type ImportItem struct {
	// Twin is the twin: ID, Type, Labels, Reported and Desired are
	// required as for a creation. ReportedMeta and DesiredMeta, if set,
	// keep their times (else every leaf is stamped with the import's
	// time), and their versions with KeepVersions (else every leaf gets
	// the twin's version); Tombstones and DesiredAckedVersion are kept with
	// KeepVersions only; CreateTime and UpdateTime, if zero, are the
	// import's time; the twin is not connected, since Presence.Since if
	// set (and not Connected), else since the import; Presence.LastSeen
	// is kept. TokenHash, if set, is the SHA-256 of the device's token
	// (32 bytes). CommandSeq is raised to the highest command sequence.
	// Delta and Revision are computed. Import takes ownership of Twin.
	Twin *Twin
	// Commands are the device's retained commands, each with Seq set
	// (DeviceID and ID are derived from the twin and Seq). An open command
	// whose ExpireTime is zero expires after the engine's default TTL.
	Commands []*Command
	// RuleStates are the twin's rule states, by rule id.
	RuleStates map[string]RuleState
}

// ImportOptions says how an import treats what it finds.
type ImportOptions struct {
	// Upsert replaces twins that exist, with their commands, rule states
	// and history; without it, an existing id is refused (an ImportError
	// wrapping ErrAlreadyExists).
	Upsert bool
	// KeepVersions gives each twin the version it carries, which must be
	// above any version the id had (versions are never reused); without
	// it, a twin gets version 1, or the next version of a twin it
	// replaces or of a deleted twin with its id.
	KeepVersions bool
}

// ImportError is why one item of an import batch was not imported.
type ImportError struct {
	// Index is the item's index in the batch.
	Index int
	// ID is the item's twin id, as given.
	ID  string
	Err error
}

func (e *ImportError) Error() string {
	return fmt.Sprintf("item %d (twin %q): %v", e.Index, e.ID, e.Err)
}

func (e *ImportError) Unwrap() error { return e.Err }

// importBatch is the part of an import batch one worker applies.
type importBatch struct {
	items []*preparedImport
	opts  ImportOptions
	// mark, if set, makes the op write the import's marker event instead.
	mark *Event
}

// preparedImport is an item checked and built outside the worker.
type preparedImport struct {
	index        int
	twin         *Twin
	cmds         []*Command
	states       map[string]RuleState
	stampMeta    bool // the metadata was stamped with twin.Version: restamp if it changes
	minCmdSeq    int64
	keepVersions bool
}

// Import imports a batch of twins and returns, once every imported twin is
// durable, the errors of the items it refused, in index order, each an
// *ImportError; the other items are imported. Items are checked in the
// caller's goroutine, then applied by their shards' workers in order with
// their other requests; an import fires no rules and writes no history or
// watch-log entry per twin. The error is for the batch as a whole (ctx
// done, engine closed or failed): then the caller cannot know which items
// are durable, but each item is either imported whole or not at all.
// Import is safe for concurrent use.
func (e *Engine) Import(ctx context.Context, items []ImportItem, opts ImportOptions) ([]*ImportError, error) {
	p, err := e.StartImport(ctx, items, opts)
	if err != nil {
		return nil, err
	}
	return p.Wait(ctx)
}

// PendingImport is a batch handed to the workers by StartImport.
type PendingImport struct {
	errs []*ImportError
	ops  []sentImport
	// next and got say how far Wait has read the answers: the op it is
	// at and how many of that op's answers it has, so that a Wait that
	// its ctx cut short can be called again to go on.
	next, got int
}

type sentImport struct {
	o *op
	n int
}

// StartImport checks a batch and hands it to the workers without waiting
// for it to be durable: Wait does. Batches started one after the other by
// one goroutine are applied in that order, so that a caller can check and
// hand over its next batch while the workers commit this one. The error is
// ctx's, or ErrClosed; then some of the batch may have been handed over.
func (e *Engine) StartImport(ctx context.Context, items []ImportItem, opts ImportOptions) (*PendingImport, error) {
	now := e.opts.Clock().UTC()
	p := &PendingImport{}
	prepared := make([]*preparedImport, len(items))
	errs := make([]error, len(items))
	parallel.Ranges(len(items), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			prepared[i], errs[i] = e.prepareImport(i, &items[i], opts, now)
		}
	})
	byWorker := make([][]*preparedImport, len(e.workers))
	for i, pi := range prepared {
		if errs[i] != nil {
			p.errs = append(p.errs, &ImportError{Index: i, ID: itemID(&items[i]), Err: errs[i]})
			continue
		}
		wi := int(e.VShard(pi.twin.ID)) % len(e.workers)
		byWorker[wi] = append(byWorker[wi], pi)
	}
	for wi, ps := range byWorker {
		if len(ps) == 0 {
			continue
		}
		o := &op{kind: opImport, bulk: &importBatch{items: ps, opts: opts}, done: make(chan Result, len(ps))}
		if err := e.enqueue(ctx, e.workers[wi], o); err != nil {
			return nil, err
		}
		p.ops = append(p.ops, sentImport{o, len(ps)})
	}
	return p, nil
}

// Wait returns once every item of the batch is durable or refused, as
// Import does. A Wait that returned ctx's error may be called again, with
// another ctx, to go on waiting: the batch is applied whether or not
// anyone waits. Wait must not be called concurrently.
func (p *PendingImport) Wait(ctx context.Context) ([]*ImportError, error) {
	for ; p.next < len(p.ops); p.next, p.got = p.next+1, 0 {
		s := p.ops[p.next]
		for ; p.got < s.n; p.got++ {
			select {
			case r := <-s.o.done:
				if r.Err == nil {
					continue
				}
				var ie *ImportError
				if !errors.As(r.Err, &ie) {
					return nil, r.Err // the engine failed: no more answers come
				}
				p.errs = append(p.errs, ie)
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
	}
	slices.SortFunc(p.errs, func(a, b *ImportError) int { return a.Index - b.Index })
	return p.errs, nil
}

func itemID(it *ImportItem) string {
	if it.Twin == nil {
		return ""
	}
	return it.Twin.ID
}

// MarkImport writes the one watch-log event of an import of n twins, once
// everything the import wrote is durable (call it after the import's last
// Import returned), and returns its revision. Watchers see it as a
// KindImported event with no twin.
func (e *Engine) MarkImport(ctx context.Context, n int) (int64, error) {
	o := &op{kind: opImport, bulk: &importBatch{mark: &Event{
		Kind: KindImported, Source: SourceImport, Patch: Document{"twins": float64(n)},
	}}, done: make(chan Result, 1)}
	if err := e.enqueue(ctx, e.workers[0], o); err != nil {
		return 0, err
	}
	select {
	case r := <-o.done:
		if r.Err != nil {
			return 0, r.Err
		}
		return o.bulk.mark.Revision, nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// enqueue hands an op to a worker (start's, and each of a bulk
// import's). A full inbox blocks until there is room or ctx is done.
func (e *Engine) enqueue(ctx context.Context, w *worker, o *op) error {
	if err := e.err(); err != nil {
		return err
	}
	if e.opts.Follow {
		return ErrFollowing
	}
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

// tokenHashBytes is the size of a token hash (SHA-256).
const tokenHashBytes = 32

// prepareImport checks an item and builds its twin, as far as it can
// without the worker's state.
func (e *Engine) prepareImport(index int, it *ImportItem, opts ImportOptions, now time.Time) (*preparedImport, error) {
	src := it.Twin
	if src == nil {
		return nil, fmt.Errorf("%w: the item has no twin", ErrInvalidArgument)
	}
	if err := validateNewID(src.ID); err != nil {
		return nil, err
	}
	if err := ValidateType(src.Type); err != nil {
		return nil, err
	}
	if err := validateLabels(src.Labels); err != nil {
		return nil, err
	}
	if n := len(src.TokenHash); n != 0 && n != tokenHashBytes {
		return nil, fmt.Errorf("%w: token hash is %d bytes; a token hash is the %d-byte SHA-256 of the token, or empty",
			ErrInvalidArgument, n, tokenHashBytes)
	}
	version := int64(1)
	if opts.KeepVersions {
		if src.Version < 1 {
			return nil, fmt.Errorf("%w: version is %d; keep_versions needs each twin's version, 1 or more",
				ErrInvalidArgument, src.Version)
		}
		version = src.Version
	}
	t := &Twin{
		ID:         src.ID,
		Type:       src.Type,
		Labels:     cloneLabels(src.Labels, nil, nil),
		Version:    version,
		CreateTime: src.CreateTime,
		UpdateTime: src.UpdateTime,
		TokenHash:  src.TokenHash,
		CommandSeq: src.CommandSeq,
		Presence:   Presence{Since: src.Presence.Since, LastSeen: src.Presence.LastSeen},
	}
	if src.Presence.Connected || t.Presence.Since.IsZero() {
		t.Presence.Since = now // disconnected by the import
	}
	if t.CreateTime.IsZero() {
		t.CreateTime = now
	}
	if t.UpdateTime.IsZero() {
		t.UpdateTime = now
	}
	p := &preparedImport{index: index, twin: t, states: it.RuleStates, keepVersions: opts.KeepVersions}
	stamp := FieldMeta{Time: now, Version: version}
	for _, side := range []struct {
		in     Document
		inMeta map[string]FieldMeta
		doc    *Document
		meta   *map[string]FieldMeta
		name   string
	}{
		{src.Reported, src.ReportedMeta, &t.Reported, &t.ReportedMeta, "reported"},
		{src.Desired, src.DesiredMeta, &t.Desired, &t.DesiredMeta, "desired"},
	} {
		if err := e.apply.limits.checkPatch(side.in); err != nil {
			return nil, fmt.Errorf("%s: %w", side.name, err)
		}
		var r mergeResult
		doc := side.in
		if !plainLeaves(doc, "", &r.set) {
			// Nulls in a new document delete nothing; merging drops
			// them.
			r = mergeResult{}
			doc = mergeObject(nil, side.in, "", &r)
		}
		if doc == nil {
			doc = Document{}
		}
		if err := e.apply.checkSize(doc, side.name); err != nil {
			return nil, err
		}
		*side.doc = doc
		// Metadata is of the document's members: of a path that names
		// none, as of a leaf the document no longer has, it is dropped.
		maps.DeleteFunc(side.inMeta, func(p string, _ FieldMeta) bool {
			_, ok := lookup(doc, p)
			return p == "" || !ok
		})
		switch {
		case len(side.inMeta) > 0 && opts.KeepVersions:
			*side.meta = side.inMeta
		case len(side.inMeta) > 0:
			// The times carry over; the versions are the twin's.
			*side.meta = side.inMeta
			restamp(side.inMeta, version)
			p.stampMeta = true
		default:
			*side.meta = updateMeta(nil, &r, stamp)
			p.stampMeta = true
		}
	}
	if opts.KeepVersions {
		t.Tombstones = src.Tombstones
		t.DesiredAckedVersion = min(max(src.DesiredAckedVersion, 0), version)
	}
	t.Delta = Delta(t.Desired, t.Reported, t.Tombstones)

	seen := map[int64]bool{}
	for i, c := range it.Commands {
		if c == nil || c.Seq < 1 {
			return nil, fmt.Errorf("%w: command %d has no sequence (1 or more)", ErrInvalidArgument, i)
		}
		if seen[c.Seq] {
			return nil, fmt.Errorf("%w: command sequence %d appears twice", ErrInvalidArgument, c.Seq)
		}
		seen[c.Seq] = true
		if c.DeviceID != "" && c.DeviceID != t.ID {
			return nil, fmt.Errorf("%w: command %d is for device %q, not %q", ErrInvalidArgument, c.Seq, c.DeviceID, t.ID)
		}
		if c.State < CommandQueued || c.State > CommandCanceled {
			return nil, fmt.Errorf("%w: command %d has no valid state", ErrInvalidArgument, c.Seq)
		}
		if !namePattern.MatchString(c.Name) {
			return nil, fmt.Errorf("%w: command %d's name %.40q must be 1 to 128 characters of [A-Za-z0-9._:-]", ErrInvalidArgument, c.Seq, c.Name)
		}
		if err := e.apply.limits.checkPatch(c.Params); err != nil {
			return nil, fmt.Errorf("command %d params: %w", c.Seq, err)
		}
		cmd := c.clone()
		cmd.DeviceID, cmd.ID = t.ID, CommandID(t.ID, c.Seq)
		if cmd.CreateTime.IsZero() {
			cmd.CreateTime = now
		}
		if cmd.UpdateTime.IsZero() {
			cmd.UpdateTime = cmd.CreateTime
		}
		if !cmd.State.Final() && cmd.ExpireTime.IsZero() {
			if cmd.TTL <= 0 {
				cmd.TTL = e.opts.DefaultCommandTTL
			}
			cmd.ExpireTime = now.Add(cmd.TTL)
		}
		p.cmds = append(p.cmds, cmd)
		t.CommandSeq = max(t.CommandSeq, cmd.Seq)
		if p.minCmdSeq == 0 || cmd.Seq < p.minCmdSeq {
			p.minCmdSeq = cmd.Seq
		}
	}
	slices.SortFunc(p.cmds, func(a, b *Command) int { return int(min(max(a.Seq-b.Seq, -1), 1)) })
	for r := range it.RuleStates {
		if r == "" || bytes.IndexByte([]byte(r), 0) >= 0 {
			return nil, fmt.Errorf("%w: rule state of rule %q: not a rule id", ErrInvalidArgument, r)
		}
	}
	return p, nil
}

// plainLeaves appends to set the pointers of the leaves of doc, at path, as
// merging doc into nothing would, and reports whether doc holds no null,
// so that it is its own merge.
func plainLeaves(doc map[string]any, path string, set *[]string) bool {
	for k, v := range doc {
		p := path + "/" + escapePointer(k)
		switch v := v.(type) {
		case nil:
			return false
		case map[string]any:
			if len(v) == 0 {
				*set = append(*set, p)
			} else if !plainLeaves(v, p, set) {
				return false
			}
		default:
			*set = append(*set, p)
		}
	}
	return true
}

// importTwins applies an import op: one change per item, or the marker
// event. The worker calls it in place of apply, so that the items are
// applied in order with its other requests. Each change is answered on the
// op's done channel once durable.
//
// The items' twins (or what deleted twins left behind) are read into the
// worker's cache in one pass, like a step's misses; each item then replaces
// its entry's working state, as apply does, and write hands opImport
// changes to writeImport.
func (w *worker) importTwins(o *op, now time.Time) []*change {
	b := o.bulk
	if b.mark != nil {
		ev := b.mark
		ev.Revision, ev.Time = w.e.nextRev.Add(1), now
		return []*change{{op: o, event: ev}}
	}
	changes := make([]*change, 0, len(b.items))
	ids := make([]string, len(b.items))
	for i, p := range b.items {
		ids[i] = p.twin.ID
	}
	err := w.fetch(ids) // every item's twin, or what a deleted one left, in the cache
	for _, p := range b.items {
		if err != nil {
			// The store cannot be read: refuse the batch, item by item.
			changes = append(changes, &change{op: &op{kind: opImport, id: p.twin.ID, done: o.done, bulk: b},
				err: &ImportError{Index: p.index, ID: p.twin.ID, Err: err}})
			continue
		}
		// Each item is answered on its own: publish sends one result per
		// change to its op's done channel, which the batch's ops share.
		io := &op{kind: opImport, id: p.twin.ID, done: o.done, bulk: b}
		c, err := w.importTwin(io, p)
		if err != nil {
			c = &change{op: io, err: &ImportError{Index: p.index, ID: p.twin.ID, Err: err}}
		}
		changes = append(changes, c)
	}
	return changes
}

func (w *worker) importTwin(o *op, p *preparedImport) (*change, error) {
	id := p.twin.ID
	ent := w.cache.m[id] // fetched by importTwins
	cur := ent.work
	if cur != nil && !o.bulk.opts.Upsert {
		return nil, fmt.Errorf("%w: twin %q already exists at version %d; import with upsert to replace it",
			ErrAlreadyExists, id, cur.Version)
	}
	last := ent.gone
	if cur != nil {
		last = goneTwin{version: cur.Version, cmdSeq: cur.CommandSeq}
	}
	t := p.twin
	if p.keepVersions {
		if t.Version <= last.version {
			return nil, fmt.Errorf("%w: twin %q was at version %d already, and versions are never reused; "+
				"import it without keep_versions, or with a version above %d", ErrVersionMismatch, id, last.version, last.version)
		}
	} else if t.Version != last.version+1 {
		t.Version = last.version + 1
		if p.stampMeta {
			restamp(t.ReportedMeta, t.Version)
			restamp(t.DesiredMeta, t.Version)
		}
	}
	if p.minCmdSeq != 0 && p.minCmdSeq <= last.cmdSeq {
		return nil, fmt.Errorf("%w: twin %q had commands up to sequence %d, and command ids are never reused; "+
			"its commands must have higher sequences", ErrAlreadyExists, id, last.cmdSeq)
	}
	t.CommandSeq = max(t.CommandSeq, last.cmdSeq)

	c := &change{op: o, prev: cur, next: t}
	if s := w.sinks[id]; s != nil {
		c.replaced, c.closeErr = s, fmt.Errorf("%w: twin %q was replaced by an import; connect again", ErrTokenRevoked, id)
		delete(w.sinks, id)
	}
	if l := ent.cmds; l != nil {
		for _, cmd := range l.cmds {
			w.expiries.remove(cmd)
			// Gone with the twin it replaces (writeImport deletes
			// them by range): their waiters learn it once durable.
			c.dropCmds = append(c.dropCmds, cmd.Seq)
		}
	}
	ent.cmds = nil
	if len(p.cmds) > 0 {
		c.cmds = &commandList{cmds: p.cmds}
		c.writeCmds = p.cmds
		ent.cmds = c.cmds
		for _, cmd := range p.cmds {
			if !cmd.State.Final() {
				w.expiries.add(cmd)
			}
		}
	} else if cur != nil {
		c.cmds = &commandList{} // the replaced twin's commands are gone
	}
	var states map[string]RuleState
	if len(p.states) > 0 {
		states = make(map[string]RuleState, len(p.states))
		c.ruleWrites = make(map[string]*RuleState, len(p.states))
		for r, s := range p.states {
			states[r] = s
			c.ruleWrites[r] = &s
			if !s.PendingSince.IsZero() {
				w.wakeRules(id, s.PendingSince)
			}
		}
	}
	ent.work, ent.states, ent.statesLoaded = t, states, true
	w.touch(ent)
	return c, nil
}

// restamp sets the version of every leaf's metadata.
func restamp(meta map[string]FieldMeta, version int64) {
	for p, m := range meta {
		m.Version = version
		meta[p] = m
	}
}

// writeImport adds an import change's keys to b: the twin record, its
// commands and rule states, and, for a twin it replaces, the removal of the
// old one's history, commands, rule states and presence mark; or, for the
// marker, its watch-log entry. buf is scratch space, returned for reuse.
func (w *worker) writeImport(b writer, c *change, buf []byte) ([]byte, error) {
	if c.err != nil {
		return buf, nil
	}
	if c.event != nil {
		buf = appendEvent(buf[:0], c.event, []byte("null"))
		c.eventBytes = len(buf)
		return buf, b.Set(logKey(c.event.Revision), buf, nil)
	}
	id := c.next.ID
	vs := w.e.VShard(id)
	ent := w.cache.m[id] // cached until the step is published
	w.touch(ent)
	if ent.seen {
		ent.seen = false
		if err := b.Delete(seenKey(vs, id), nil); err != nil {
			return buf, err
		}
	}
	if c.prev == nil {
		w.counts[vs]++
		if err := b.Set(countKey(vs), appendUint64(nil, uint64(w.counts[vs])), nil); err != nil {
			return buf, err
		}
	}
	if hasPending(ent.states) {
		if err := b.Set(pendingKey(vs, id), nil, nil); err != nil {
			return buf, err
		}
	} else if c.prev != nil {
		if err := b.Delete(pendingKey(vs, id), nil); err != nil {
			return buf, err
		}
	}
	if c.prev != nil {
		for _, p := range [][]byte{historyPrefix(vs, id), commandPrefix(vs, id), openPrefix(vs, id), ruleStatePrefix(vs, id)} {
			if err := b.DeleteRange(p, prefixEnd(p), nil); err != nil {
				return buf, err
			}
		}
		if c.prev.Presence.Connected {
			if err := b.Delete(presenceKey(vs, id), nil); err != nil {
				return buf, err
			}
		}
	}
	if err := writeIndex(b, vs, c.prev, c.next); err != nil {
		return buf, err
	}
	// An imported twin has no event: its next one holds the whole twin.
	ent.log = logPosition{}
	rec := encodeRecord(record{Twin: c.next})
	if err := b.Set(twinKey(vs, id), rec, nil); err != nil {
		return buf, err
	}
	w.resize(ent, len(rec))
	// The twin's history starts at its imported version, whose event is
	// not in the watch log: its entry points at revision 0, as an entry
	// whose event the log has pruned would (History stops there, Check
	// accepts it).
	var rev0 [8]byte
	if err := b.Set(historyKey(vs, id, c.next.Version), rev0[:], nil); err != nil {
		return buf, err
	}
	if err := writeCommands(b, vs, id, c.writeCmds); err != nil {
		return buf, err
	}
	return buf, writeRuleStates(b, vs, id, c.ruleWrites)
}

// ExportItem is one record of an export: a twin with its retained commands
// and rule states, or a rule definition (RuleID set).
type ExportItem struct {
	// Twin is the twin as stored, its presence as of the export.
	Twin       *Twin
	Commands   []*Command
	RuleStates map[string]RuleState
	// RuleID and RuleDef are a rule definition, as the rules package
	// stores it (see PutRule).
	RuleID  string
	RuleDef []byte
	// KeyName and KeyDef are an API key made through the API, as the
	// server stores it (see PutAPIKey).
	KeyName string
	KeyDef  []byte
}

// Export is a consistent, durable view of the whole store for a backup.
// Close it when done; Engine.Close waits for open exports.
type Export struct {
	e    *Engine
	snap *pebble.Snapshot
	rev  int64
}

// Export takes a snapshot of the store and returns once everything in it is
// durable: every revision up to the one it reports, and every write before
// it. It fails with ErrClosed if the engine closes or has failed, or with
// ctx's error.
func (e *Engine) Export(ctx context.Context) (*Export, error) {
	if err := e.err(); err != nil {
		return nil, err
	}
	if !e.startReader() {
		return nil, ErrClosed
	}
	snap := e.db.NewSnapshot()
	rev := e.nextRev.Load()
	x := &Export{e: e, snap: snap, rev: rev}
	// Writes without a revision (imports, command updates) are in the
	// WAL before the snapshot: a synced write after it makes them durable.
	b := e.db.NewBatch()
	err := b.LogData(nil, nil)
	if err == nil {
		err = e.db.Apply(b, pebble.Sync)
	}
	b.Close()
	if err != nil {
		x.Close()
		return nil, fmt.Errorf("twin: sync before export: %w", err)
	}
	// And every revision in the snapshot is published.
	for {
		e.revMu.Lock()
		done, wait := e.rev >= rev, e.revWait
		e.revMu.Unlock()
		if done {
			return x, nil
		}
		if err := e.err(); err != nil {
			x.Close()
			return nil, err
		}
		select {
		case <-wait:
		case <-ctx.Done():
			x.Close()
			return nil, ctx.Err()
		case <-e.done:
			x.Close()
			return nil, ErrClosed
		}
	}
}

// Revision is the revision the export is consistent at.
func (x *Export) Revision() int64 { return x.rev }

// Close releases the snapshot.
func (x *Export) Close() error {
	if x.snap == nil {
		return nil
	}
	err := x.snap.Close()
	x.snap = nil
	x.e.readerWG.Done()
	return err
}

// Each calls fn with every rule definition, every API key made through the
// API, then every twin with its
// commands and rule states, shard by shard, until fn returns an error, ctx
// is done or the engine closes. It holds one twin's records in memory at a
// time. The item passed to fn is valid only during the call.
func (x *Export) Each(ctx context.Context, fn func(*ExportItem) error) error {
	e := x.e
	it, err := x.snap.NewIter(&pebble.IterOptions{LowerBound: prefixRules, UpperBound: prefixEnd(prefixRules)})
	if err != nil {
		return err
	}
	for it.First(); it.Valid(); it.Next() {
		item := &ExportItem{RuleID: string(it.Key()[len(prefixRules):]), RuleDef: slices.Clone(it.Value())}
		if err := fn(item); err != nil {
			it.Close()
			return err
		}
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return err
	}
	if it, err = x.snap.NewIter(&pebble.IterOptions{LowerBound: prefixAPIKeys, UpperBound: prefixEnd(prefixAPIKeys)}); err != nil {
		return err
	}
	for it.First(); it.Valid(); it.Next() {
		item := &ExportItem{KeyName: string(it.Key()[len(prefixAPIKeys):]), KeyDef: slices.Clone(it.Value())}
		if err := fn(item); err != nil {
			it.Close()
			return err
		}
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return err
	}
	for vs := range e.vshards {
		if err := e.readStopped(ctx); err != nil {
			return err
		}
		if err := x.shard(ctx, uint16(vs), fn); err != nil {
			return err
		}
	}
	return nil
}

// shard exports one virtual shard: its twin records, commands and rule
// states are three key ranges in the same id order, read side by side.
func (x *Export) shard(ctx context.Context, vs uint16, fn func(*ExportItem) error) (err error) {
	var its [3]*pebble.Iterator
	defer func() {
		for _, it := range its {
			if it != nil {
				err = errors.Join(err, it.Close())
			}
		}
	}()
	for i, sec := range []byte{'t', 'c', 'x'} {
		p := shardPrefix(vs, sec)
		if its[i], err = x.snap.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)}); err != nil {
			return err
		}
		its[i].First()
	}
	tIt, cIt, xIt := its[0], its[1], its[2]
	head := len(shardPrefix(vs, 't'))
	// owner returns the twin id of a command or rule state key.
	owner := func(k []byte) []byte {
		k = k[head:]
		if i := bytes.IndexByte(k, 0); i >= 0 {
			return k[:i]
		}
		return k
	}
	for ; tIt.Valid(); tIt.Next() {
		if err := x.e.readStopped(ctx); err != nil {
			return err
		}
		id := tIt.Key()[head:]
		if isSubKey(id) {
			continue // a seen key, read with its twin's record
		}
		r, err := decodeRecord(tIt.Value())
		if err != nil {
			return fmt.Errorf("twin: export %q: %w", id, err)
		}
		if !r.Deleted {
			if r.Twin, err = readSeen(x.snap, vs, r.Twin); err != nil {
				return fmt.Errorf("twin: export %q: %w", id, err)
			}
		}
		// Commands and states of ids before this one belong to no live
		// twin (deleted ones have none): skip them.
		for cIt.Valid() && bytes.Compare(owner(cIt.Key()), id) < 0 {
			cIt.Next()
		}
		for xIt.Valid() && bytes.Compare(owner(xIt.Key()), id) < 0 {
			xIt.Next()
		}
		item := &ExportItem{Twin: r.Twin}
		for ; cIt.Valid() && bytes.Equal(owner(cIt.Key()), id); cIt.Next() {
			cmd, err := decodeCommand(cIt.Value())
			if err != nil {
				return fmt.Errorf("twin: export %q: %w", id, err)
			}
			item.Commands = append(item.Commands, cmd)
		}
		for ; xIt.Valid() && bytes.Equal(owner(xIt.Key()), id); xIt.Next() {
			k := xIt.Key()[head:]
			s, err := decodeRuleState(xIt.Value())
			if err != nil {
				return fmt.Errorf("twin: export %q: rule state: %w", id, err)
			}
			if item.RuleStates == nil {
				item.RuleStates = map[string]RuleState{}
			}
			item.RuleStates[string(k[bytes.IndexByte(k, 0)+1:])] = s
		}
		if r.Deleted {
			continue
		}
		t := r.Twin.clone()
		if t.Presence.Connected {
			// Connected now: after a restore, not connected since then.
			t.Presence = Presence{LastSeen: t.Presence.LastSeen}
		}
		item.Twin = t
		if err := fn(item); err != nil {
			return err
		}
	}
	for _, it := range its {
		if err := it.Error(); err != nil {
			return err
		}
	}
	return nil
}
