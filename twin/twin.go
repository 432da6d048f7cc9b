package twin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Errors returned by this package. Callers test for them with errors.Is; the
// wrapping error's message says what to fix.
var (
	ErrNotFound        = errors.New("twin: not found")
	ErrAlreadyExists   = errors.New("twin: already exists")
	ErrVersionMismatch = errors.New("twin: version mismatch")
	ErrInvalidID       = errors.New("twin: invalid id")
	ErrInvalidArgument = errors.New("twin: invalid argument")
	ErrInvalidPatch    = errors.New("twin: invalid patch")
	ErrLimit           = errors.New("twin: over limit")
	ErrCompacted       = errors.New("twin: revision compacted")
	ErrClosed          = errors.New("twin: closed")
	ErrOverloaded      = errors.New("twin: overloaded")
	ErrFinished        = errors.New("twin: command finished")
)

// Twin is one immutable snapshot of a device's twin. A *Twin handed out by
// this package is shared: never modify it or anything it references.
type Twin struct {
	ID     string
	Type   string
	Labels map[string]string

	Reported Document
	Desired  Document
	// Delta is computed from Desired, Reported and Tombstones.
	Delta Document

	// ReportedMeta and DesiredMeta map the JSON Pointer of each leaf to when
	// it last changed.
	ReportedMeta map[string]FieldMeta
	DesiredMeta  map[string]FieldMeta
	// Tombstones maps the JSON Pointer of each key removed from desired,
	// and not yet acknowledged by the device, to the version that removed it.
	Tombstones map[string]int64
	// DesiredAckedVersion is the highest version whose desired state the
	// device acknowledged applying.
	DesiredAckedVersion int64

	Version  int64
	Revision int64
	Presence Presence

	CreateTime time.Time
	UpdateTime time.Time

	// TokenHash is the SHA-256 of the device's current token, or nil.
	TokenHash []byte
	// CommandSeq is the sequence of the device's last command.
	CommandSeq int64
}

// FieldMeta says when one leaf of a document last changed. Store format 2
// keeps it inline with the leaf (storecodec.go); the JSON of format 1 is
// {"t": <Unix nanoseconds>, "v": <version>}.
type FieldMeta struct {
	Time    time.Time
	Version int64
}

// MarshalJSON writes the JSON form.
func (m FieldMeta) MarshalJSON() ([]byte, error) {
	return appendFieldMeta(nil, m), nil
}

// UnmarshalJSON reads the JSON form.
func (m *FieldMeta) UnmarshalJSON(b []byte) error {
	// The form appendFieldMeta writes, read without reflection: a store
	// of format 1 holds one per leaf, read once when it is converted.
	if rest, ok := bytes.CutPrefix(b, []byte(`{"t":`)); ok {
		if ts, vs, ok := bytes.Cut(rest, []byte(`,"v":`)); ok {
			if vs, ok := bytes.CutSuffix(vs, []byte("}")); ok {
				t, err1 := strconv.ParseInt(string(ts), 10, 64)
				v, err2 := strconv.ParseInt(string(vs), 10, 64)
				if err1 == nil && err2 == nil {
					*m = FieldMeta{Time: time.Unix(0, t).UTC(), Version: v}
					return nil
				}
			}
		}
	}
	var j struct {
		T int64 `json:"t"`
		V int64 `json:"v"`
	}
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*m = FieldMeta{Time: time.Unix(0, j.T).UTC(), Version: j.V}
	return nil
}

// Presence says whether the device is connected.
type Presence struct {
	Connected bool      `json:"connected,omitempty"`
	Since     time.Time `json:"since,omitzero"`
	LastSeen  time.Time `json:"last_seen,omitzero"`
}

var (
	idPattern   = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)
	typePattern = regexp.MustCompile(`^[A-Za-z0-9._-]{0,64}$`)
)

// ValidateID reports whether id is a valid twin id: 1 to 128 characters of
// [A-Za-z0-9._:-].
func ValidateID(id string) error {
	if !idPattern.MatchString(id) {
		if id == "" {
			return fmt.Errorf("%w: id is empty; give 1 to 128 characters of [A-Za-z0-9._:-]", ErrInvalidID)
		}
		return fmt.Errorf("%w: %.40q must be 1 to 128 characters of [A-Za-z0-9._:-]", ErrInvalidID, id)
	}
	return nil
}

// validateNewID reports whether id may name a new twin: a valid id that is
// not made only of dots ("." and ".." mean something else in a URL path).
// Existing twins with such ids keep working.
func validateNewID(id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	if strings.Trim(id, ".") == "" {
		return fmt.Errorf("%w: %q is made only of dots, which URLs cannot carry as a name; use another id", ErrInvalidID, id)
	}
	return nil
}

// ValidateType reports whether typ is a valid device type.
func ValidateType(typ string) error {
	if !typePattern.MatchString(typ) {
		return fmt.Errorf("%w: type %.40q must be at most 64 characters of [A-Za-z0-9._-]", ErrInvalidArgument, typ)
	}
	return nil
}

func validateLabels(labels map[string]string) error {
	if len(labels) > 64 {
		return fmt.Errorf("%w: %d labels, at most 64 allowed", ErrInvalidArgument, len(labels))
	}
	for k, v := range labels {
		if k == "" || len(k) > 63 || !typePattern.MatchString(k) {
			return fmt.Errorf("%w: label key %.40q must be 1 to 63 characters of [A-Za-z0-9._-]", ErrInvalidArgument, k)
		}
		if len(v) > 256 {
			return fmt.Errorf("%w: label %q has a value of %d bytes, at most 256 allowed", ErrInvalidArgument, k, len(v))
		}
	}
	return nil
}

// clone returns a shallow copy of t that the caller may change field by
// field before sharing it.
func (t *Twin) clone() *Twin {
	c := *t
	return &c
}

// updateMeta returns meta with the effects of a merge: metadata of removed
// subtrees dropped and that of set leaves stamped.
func updateMeta(meta map[string]FieldMeta, r *mergeResult, stamp FieldMeta) map[string]FieldMeta {
	out := make(map[string]FieldMeta, len(meta)+len(r.set))
	if len(r.removed) == 0 {
		maps.Copy(out, meta)
	} else {
		for p, m := range meta {
			if !removedBy(p, r.removed) {
				out[p] = m
			}
		}
	}
	for _, p := range r.set {
		out[p] = stamp
	}
	return out
}

func removedBy(p string, removed []string) bool {
	for _, q := range removed {
		if underOrAt(p, q) {
			return true
		}
	}
	return false
}

// updateTombstones returns the tombstones after a desired merge at version.
// A key removed from desired gets a tombstone; a key set again loses the
// tombstones at, under and above it.
func updateTombstones(ts map[string]int64, r *mergeResult, version int64) map[string]int64 {
	if len(r.removed) == 0 && len(ts) == 0 {
		return ts
	}
	out := make(map[string]int64, len(ts)+len(r.removed))
	for p, v := range ts {
		keep := true
		for _, s := range r.set {
			if underOrAt(p, s) || underOrAt(s, p) {
				keep = false
				break
			}
		}
		if keep {
			out[p] = v
		}
	}
	for _, p := range r.removed {
		// Tombstones under a removed key are covered by the new one.
		for q := range out {
			if underOrAt(q, p) {
				delete(out, q)
			}
		}
		out[p] = version
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// ackTombstones drops the tombstones that the device acknowledged by
// applying desired state up to version.
func ackTombstones(ts map[string]int64, version int64) map[string]int64 {
	var out map[string]int64
	for p, v := range ts {
		if v > version {
			if out == nil {
				out = map[string]int64{}
			}
			out[p] = v
		}
	}
	return out
}

// cloneLabels returns a copy of labels with set applied and remove removed.
func cloneLabels(labels, set map[string]string, remove []string) map[string]string {
	out := maps.Clone(labels)
	if out == nil {
		out = map[string]string{}
	}
	maps.Copy(out, set)
	for _, k := range remove {
		delete(out, k)
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// Source names who made a change: "api" (the operator API, when it asks
// for no key), "key:<name>" (the operator API key named), "device", or
// "rule:<id>".
type Source string

// Sources of changes.
const (
	SourceAPI    Source = "api"
	SourceDevice Source = "device"
)

// RuleSource is the source of a change made by a rule.
func RuleSource(ruleID string) Source { return Source("rule:" + ruleID) }

// KeySource is the source of a change made through the operator API with
// the API key named.
func KeySource(name string) Source { return Source("key:" + name) }

// IsRule reports whether s is a rule's source.
func (s Source) IsRule() bool { return strings.HasPrefix(string(s), "rule:") }
