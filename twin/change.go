package twin

import (
	"fmt"
	"time"
)

// EventKind says what a committed change did.
type EventKind uint8

// Kinds of committed changes.
const (
	KindCreated EventKind = iota + 1
	KindReported
	KindDesired
	KindUpdated
	KindDeleted
	KindPresence
)

func (k EventKind) String() string {
	switch k {
	case KindCreated:
		return "created"
	case KindReported:
		return "reported"
	case KindDesired:
		return "desired"
	case KindUpdated:
		return "updated"
	case KindDeleted:
		return "deleted"
	case KindPresence:
		return "presence"
	}
	return fmt.Sprintf("EventKind(%d)", uint8(k))
}

// Event is one committed change of a twin. Events are immutable.
type Event struct {
	Revision int64     `json:"r"`
	Kind     EventKind `json:"k"`
	// Twin is the twin after the change; for a deletion, as it was before.
	Twin *Twin `json:"tw"`
	// Patch is the merge patch the change applied, if any.
	Patch  Document  `json:"p,omitempty"`
	Time   time.Time `json:"t"`
	Source Source    `json:"s,omitempty"`
}

// CreateRequest describes a twin to create.
type CreateRequest struct {
	ID       string
	Type     string
	Labels   map[string]string
	Reported Document
	Desired  Document
	Source   Source
}

// PatchRequest is a merge patch of reported or desired state.
type PatchRequest struct {
	ID    string
	Patch Document
	// ExpectedVersion, if not 0, makes the change fail with
	// ErrVersionMismatch unless the twin is at exactly this version.
	ExpectedVersion int64
	// DesiredAckedVersion, for reports, if not 0, acknowledges the desired
	// state the device has applied.
	DesiredAckedVersion int64
	Source              Source
	// Stream, if set, is the device stream the report came from: the
	// report applies only while that stream is still the device's current
	// one (ErrStreamClosed otherwise), so a stream replaced by a newer one,
	// or whose token was revoked, cannot write.
	Stream Sink
	// TokenHash, if set, makes a report apply only while the twin's device
	// token has this SHA-256 (ErrTokenRevoked otherwise), so that a report
	// authenticated by a token that is rotated while it is in flight is
	// refused, as a stream's is.
	TokenHash []byte
}

// UpdateRequest changes a twin's type and labels.
type UpdateRequest struct {
	ID string
	// Type, if not nil, replaces the type.
	Type *string
	// Labels are set; RemoveLabels are removed.
	Labels          map[string]string
	RemoveLabels    []string
	ExpectedVersion int64
	Source          Source
}

// opKind says what an op asks of its shard.
type opKind uint8

const (
	opCreate opKind = iota + 1
	opReport
	opDesired
	opUpdate
	opDelete
	opToken
	opConnect
	opDisconnect
	opSendCommand
	opUpdateCommand
	opCancelCommand
	opExpire
	opRuleTimer
	opPoke
	opImport // bulk.go
)

// op is one request to a shard worker. The worker answers on done exactly
// once.
type op struct {
	kind   opKind
	id     string
	create *CreateRequest
	patch  *PatchRequest
	update *UpdateRequest
	expect int64 // for deletes
	// source is who asked, for opDelete, opToken and opCancelCommand
	// (SourceAPI if empty).
	source Source
	token  []byte // for opToken: the new hash; for opConnect: the hash the stream authenticated with
	sink   Sink   // for opConnect and opDisconnect
	cmdReq *CommandRequest
	cmdUpd *CommandUpdate
	seq    int64        // the command of opCancelCommand
	bulk   *importBatch // for opImport (bulk.go)
	done   chan Result
}

// Result is the answer to a request handed to the engine.
type Result struct {
	Twin    *Twin
	Command *Command
	Err     error
}

// change is the outcome of one op: what to write and whom to tell.
type change struct {
	op    *op
	prev  *Twin // nil for a creation
	next  *Twin // nil for a deletion
	event *Event
	// eventBytes is the size of the event's log entry, once written.
	eventBytes int
	// gone is what a deleted twin leaves behind.
	gone goneTwin

	// cmds is the device's new command list, if it changed; writeCmds
	// are the commands to store and dropCmds the sequences to delete.
	cmds      *commandList
	writeCmds []*Command
	dropCmds  []int64
	cmd       *Command // the command the op is about, for its answer

	// sink is the device's stream when the change was applied; the
	// publisher tells it what it needs to know.
	sink     Sink
	welcome  bool       // sink is new: send it the welcome
	replaced Sink       // a stream that sink replaced, or that was closed
	closeErr error      // why replaced is being closed
	deliver  []*Command // commands to send to sink

	// ruleWrites are the rule states to store (nil deletes); firings are
	// published once the change is durable.
	// seenOnly says the change moved only the twin's last_seen, which is
	// written to the twin's seen key instead of rewriting its record.
	seenOnly   bool
	ruleWrites map[string]*RuleState
	firings    []Firing

	// err, if not nil, is the op's failure: the change writes nothing and
	// is answered with err once the changes before it are durable.
	err error
}

// goneTwin is what a deleted twin leaves behind, so that a twin re-created
// with the same id never reuses a version or a command id.
type goneTwin struct {
	version int64
	cmdSeq  int64
}

func checkVersion(t *Twin, expected int64) error {
	if expected < 0 {
		return fmt.Errorf("%w: expected_version is %d; give the twin's version, or 0 for any", ErrInvalidArgument, expected)
	}
	if expected != 0 && t.Version != expected {
		return fmt.Errorf("%w: twin %q is at version %d, not the expected %d; read it again and retry",
			ErrVersionMismatch, t.ID, t.Version, expected)
	}
	return nil
}

func notFound(id string) error {
	return fmt.Errorf("%w: twin %q does not exist", ErrNotFound, id)
}

// applier computes changes; it holds the configuration that applying needs.
type applier struct {
	limits Limits
}

// create computes the twin that a CreateRequest makes. lastVersion is the
// last version of a deleted twin with the same id, or 0.
func (a *applier) create(req *CreateRequest, lastVersion int64, now time.Time) (*Twin, error) {
	if err := validateNewID(req.ID); err != nil {
		return nil, err
	}
	if err := ValidateType(req.Type); err != nil {
		return nil, err
	}
	if err := validateLabels(req.Labels); err != nil {
		return nil, err
	}
	t := &Twin{
		ID:         req.ID,
		Type:       req.Type,
		Labels:     cloneLabels(req.Labels, nil, nil),
		Version:    lastVersion + 1,
		CreateTime: now,
		UpdateTime: now,
	}
	stamp := FieldMeta{Time: now, Version: t.Version}
	for _, side := range []struct {
		patch Document
		doc   *Document
		meta  *map[string]FieldMeta
		name  string
	}{
		{req.Reported, &t.Reported, &t.ReportedMeta, "reported"},
		{req.Desired, &t.Desired, &t.DesiredMeta, "desired"},
	} {
		if err := a.limits.checkPatch(side.patch); err != nil {
			return nil, fmt.Errorf("%s: %w", side.name, err)
		}
		var r mergeResult
		doc := mergeObject(nil, side.patch, "", &r)
		if doc == nil {
			doc = Document{}
		}
		if err := a.checkSize(doc, side.name); err != nil {
			return nil, err
		}
		*side.doc = doc
		*side.meta = updateMeta(nil, &r, stamp)
	}
	t.Delta = Delta(t.Desired, t.Reported, nil)
	return t, nil
}

func (a *applier) checkSize(doc Document, name string) error {
	n, err := jsonSize(doc)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrInvalidPatch, name, err)
	}
	if n > a.limits.MaxDocumentBytes {
		return fmt.Errorf("%w: %s would be %d bytes, over the document limit of %d bytes",
			ErrLimit, name, n, a.limits.MaxDocumentBytes)
	}
	if m := metadataSize(doc, 0); m > a.limits.MaxMetadataBytes {
		return fmt.Errorf("%w: %s's metadata would be about %d bytes, over the limit of %d bytes: metadata holds a JSON Pointer "+
			"per leaf, so many leaves under long keys nested deep make it large; use shorter keys, less nesting or fewer leaves",
			ErrLimit, name, m, a.limits.MaxMetadataBytes)
	}
	return nil
}

// metaEntryBytes is about what one leaf's metadata costs besides its JSON
// Pointer, stored or sent: an update time and a version.
const metaEntryBytes = 24

// metadataSize returns about how many bytes the metadata of doc takes: a
// JSON Pointer and an entry per leaf. path is the length of doc's own
// pointer.
func metadataSize(doc map[string]any, path int) int {
	n := 0
	for k, v := range doc {
		p := path + 1 + len(escapePointer(k))
		if sub, ok := v.(map[string]any); ok && len(sub) > 0 {
			n += metadataSize(sub, p)
			continue
		}
		n += p + metaEntryBytes
	}
	return n
}

// patch computes the twin after a reported or desired merge patch. It returns
// cur itself when nothing changes.
func (a *applier) patch(cur *Twin, req *PatchRequest, desired bool, now time.Time) (*Twin, error) {
	if req.DesiredAckedVersion < 0 {
		return nil, fmt.Errorf("%w: desired_acked_version is %d; give the version of the desired state applied, or 0 for none",
			ErrInvalidArgument, req.DesiredAckedVersion)
	}
	if err := checkVersion(cur, req.ExpectedVersion); err != nil {
		return nil, err
	}
	name := "reported"
	if desired {
		name = "desired"
	}
	if err := a.limits.checkPatch(req.Patch); err != nil {
		return nil, fmt.Errorf("%s patch: %w", name, err)
	}
	doc := cur.Reported
	if desired {
		doc = cur.Desired
	}
	var r mergeResult
	merged := mergeObject(doc, req.Patch, "", &r)
	ackChanged := !desired && req.DesiredAckedVersion > cur.DesiredAckedVersion
	if !r.changed() && !ackChanged {
		return cur, nil
	}
	if r.changed() {
		if err := a.checkSize(merged, name); err != nil {
			return nil, err
		}
	}
	next := cur.clone()
	next.Version++
	next.UpdateTime = now
	stamp := FieldMeta{Time: now, Version: next.Version}
	if desired {
		next.Desired = merged
		next.DesiredMeta = updateMeta(cur.DesiredMeta, &r, stamp)
		next.Tombstones = updateTombstones(cur.Tombstones, &r, next.Version)
		if len(next.Tombstones) > len(cur.Tombstones) {
			// Removed keys stay as tombstones (nulls in the delta) until
			// the device acknowledges: they count with the metadata.
			m := metadataSize(merged, 0)
			for p := range next.Tombstones {
				m += len(p) + metaEntryBytes
			}
			if m > a.limits.MaxMetadataBytes {
				return nil, fmt.Errorf("%w: desired's metadata and tombstones would be about %d bytes, over the limit of %d bytes: "+
					"%d removed keys wait for the device to acknowledge them (desired_acked_version); let it catch up first",
					ErrLimit, m, a.limits.MaxMetadataBytes, len(next.Tombstones))
			}
		}
	} else {
		if r.changed() {
			next.Reported = merged
			next.ReportedMeta = updateMeta(cur.ReportedMeta, &r, stamp)
		}
		if ackChanged {
			v := min(req.DesiredAckedVersion, cur.Version)
			next.DesiredAckedVersion = max(v, cur.DesiredAckedVersion)
			next.Tombstones = ackTombstones(cur.Tombstones, next.DesiredAckedVersion)
		}
	}
	next.Delta = Delta(next.Desired, next.Reported, next.Tombstones)
	return next, nil
}

// update computes the twin after a change of type or labels.
func (a *applier) update(cur *Twin, req *UpdateRequest, now time.Time) (*Twin, error) {
	if err := checkVersion(cur, req.ExpectedVersion); err != nil {
		return nil, err
	}
	typ := cur.Type
	if req.Type != nil {
		if err := ValidateType(*req.Type); err != nil {
			return nil, err
		}
		typ = *req.Type
	}
	labels := cloneLabels(cur.Labels, req.Labels, req.RemoveLabels)
	if err := validateLabels(labels); err != nil {
		return nil, err
	}
	if typ == cur.Type && equalLabels(labels, cur.Labels) {
		return cur, nil
	}
	next := cur.clone()
	next.Type = typ
	next.Labels = labels
	next.Version++
	next.UpdateTime = now
	return next, nil
}

func equalLabels(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// sourceOr is o.source, or def if it is not set.
func (o *op) sourceOr(def Source) Source {
	if o.source == "" {
		return def
	}
	return o.source
}
