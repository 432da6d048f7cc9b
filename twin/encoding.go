package twin

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"time"
	"unicode/utf8"
)

// Key layout. Every key of a twin lives under its virtual shard's prefix, so
// that a shard's keys and state can be moved as one range:
//
//	m/format                       store format (JSON): {"vshards": 256, "format": 3, "max_history_limit": 100}
//	m/log                          the oldest revision watchers may resume from, once
//	                               the watch log was pruned (8 bytes; logchain.go)
//	l/<rev:8>                      watch log: the Event of each revision
//	s/<vs:2>/t/<id>                the twin record, or a deletion marker
//	s/<vs:2>/t/<id>\x00s           the twin's last_seen (Unix nanoseconds, 8 bytes), when
//	                               a report that changed nothing else moved it since
//	                               the record was written
//	s/<vs:2>/c/<id>\x00<seq:8>     the device's retained commands, by sequence
//	s/<vs:2>/o/<id>\x00<seq:8>     open-command mark: the command is not finished; its
//	                               expiry (Unix nanoseconds, 8 bytes)
//	s/<vs:2>/h/<id>\x00<ver:8>     history: the revision of each version of a twin,
//	                               whose Event is in the watch log
//	s/<vs:2>/x/<id>\x00<rule>      the twin's state for a rule
//	s/<vs:2>/p/<id>                presence mark: the device is connected (empty)
//	s/<vs:2>/w/<id>                pending mark: a rule state of the twin waits for
//	                               a hold_for to run out (empty)
//	s/<vs:2>/n/                    the number of twins in the shard (8 bytes)
//	s/<vs:2>/y/<type>\x00<id>      index: the twin's type (empty; index.go)
//	s/<vs:2>/b/<key>\x00<value>\x00<id>
//	                               index: one of the twin's labels (empty)
//	m/index                        the index is complete
//	r/<rule>                       rule definitions, owned by the rules package
//	k/<name>                       API keys made through the API, owned by the server
//	                               package (keys.go)
//
// Check (check.go) verifies the invariants between these keys.
// Numbers in keys are big-endian so that keys sort in numeric order. Values
// of format 2 are protobuf messages behind an encoding byte, documented in
// proto/twin/store/v1/store.proto and written by storecodec.go; format 1
// wrote JSON (storejson.go), which Open converts once (convert.go).
var (
	keyFormat    = []byte("m/format")
	keyLogOldest = []byte("m/log")
	prefixLog    = []byte("l/")
	prefixShards = []byte("s/")
)

// formatVersion is the store format this build writes: 3 since the watch
// log holds changes (logchain.go), 2 since the values are binary. Format 1
// (JSON values) is converted at Open, and format 2 is format 3 as it is.
const formatVersion = 3

type storeFormat struct {
	VShards int `json:"vshards"`
	Format  int `json:"format"`
	// MaxHistoryLimit is the largest history limit the store was ever
	// opened with (0 when not recorded). While the limit is lower, twins
	// may hold older history entries, which their next change trims.
	MaxHistoryLimit int `json:"max_history_limit,omitempty"`
}

func appendUint64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }

func shardPrefix(vs uint16, section byte) []byte {
	b := make([]byte, 0, 8)
	b = append(b, prefixShards...)
	b = binary.BigEndian.AppendUint16(b, vs)
	return append(b, '/', section, '/')
}

func twinKey(vs uint16, id string) []byte {
	return append(shardPrefix(vs, 't'), id...)
}

// seenKey holds a twin's last_seen when a report that changed nothing
// else moved it: such a report writes 8 bytes instead of the whole record.
// It sorts right after the twin's record, so a scan of records meets it
// next; writing the record deletes it.
func seenKey(vs uint16, id string) []byte {
	return append(append(twinKey(vs, id), 0), 's')
}

// isSubKey reports whether a key of the twin section, after the section's
// prefix, belongs to a twin without being its record (a seen key).
func isSubKey(rest []byte) bool { return bytes.IndexByte(rest, 0) >= 0 }

// withSeen returns t with the last_seen of its seen key's value applied.
func withSeen(t *Twin, v []byte) (*Twin, error) {
	if len(v) != 8 {
		return nil, fmt.Errorf("twin: corrupt last_seen of twin %q: %d bytes", t.ID, len(v))
	}
	seen := time.Unix(0, int64(binary.BigEndian.Uint64(v))).UTC()
	if !seen.After(t.Presence.LastSeen) {
		return t, nil
	}
	t = t.clone()
	t.Presence.LastSeen = seen
	return t, nil
}

// presenceKey marks a twin whose device is connected. The marks are the
// only presence a restart must look at: a device marked connected when the
// process stopped is no longer, whatever its twin says.
func presenceKey(vs uint16, id string) []byte {
	return append(shardPrefix(vs, 'p'), id...)
}

// pendingKey marks a twin with a rule state waiting for its hold_for: a
// restart evaluates these twins again at once, without reading the others.
func pendingKey(vs uint16, id string) []byte {
	return append(shardPrefix(vs, 'w'), id...)
}

// countKey holds the number of twins in a virtual shard, so that start-up
// knows the fleet's size without counting it.
func countKey(vs uint16) []byte { return shardPrefix(vs, 'n') }

func historyPrefix(vs uint16, id string) []byte {
	return append(append(shardPrefix(vs, 'h'), id...), 0)
}

func historyKey(vs uint16, id string, version int64) []byte {
	return appendUint64(historyPrefix(vs, id), uint64(version))
}

func commandPrefix(vs uint16, id string) []byte {
	return append(append(shardPrefix(vs, 'c'), id...), 0)
}

func commandKey(vs uint16, id string, seq int64) []byte {
	return appendUint64(commandPrefix(vs, id), uint64(seq))
}

// openPrefix and openKey mark a device's commands that are not finished,
// with their expiry: start-up schedules the expiries from these marks
// without reading the commands.
func openPrefix(vs uint16, id string) []byte {
	return append(append(shardPrefix(vs, 'o'), id...), 0)
}

func openKey(vs uint16, id string, seq int64) []byte {
	return appendUint64(openPrefix(vs, id), uint64(seq))
}

func logKey(rev int64) []byte {
	return appendUint64(append([]byte(nil), prefixLog...), uint64(rev))
}

// prefixEnd returns the first key after every key with the prefix p.
func prefixEnd(p []byte) []byte {
	end := append([]byte(nil), p...)
	for i := len(end) - 1; i >= 0; i-- {
		end[i]++
		if end[i] != 0 {
			return end[:i+1]
		}
	}
	return nil
}

// record is the stored form of a twin, or of a deleted twin's last version.
type record struct {
	Twin           *Twin
	Deleted        bool
	LastVersion    int64
	LastCommandSeq int64
	// Log is where a live twin stands in the watch log's chains.
	Log logPosition
}

// twinJSON is the stored form of a Twin in store format 1 (JSON).
type twinJSON struct {
	ID                  string               `json:"id"`
	Type                string               `json:"type,omitempty"`
	Labels              map[string]string    `json:"labels,omitempty"`
	Reported            Document             `json:"reported"`
	Desired             Document             `json:"desired"`
	ReportedMeta        map[string]FieldMeta `json:"reported_meta,omitempty"`
	DesiredMeta         map[string]FieldMeta `json:"desired_meta,omitempty"`
	Tombstones          map[string]int64     `json:"tombstones,omitempty"`
	DesiredAckedVersion int64                `json:"desired_acked_version,omitempty"`
	Version             int64                `json:"version"`
	Revision            int64                `json:"revision"`
	Presence            Presence             `json:"presence"`
	CreateTime          time.Time            `json:"create_time"`
	UpdateTime          time.Time            `json:"update_time"`
	TokenHash           []byte               `json:"token_hash,omitempty"`
	CommandSeq          int64                `json:"command_seq,omitempty"`
}

// MarshalJSON encodes the twin in the JSON of store format 1. Delta is not
// stored.
func (t *Twin) MarshalJSON() ([]byte, error) { return appendTwinJSON(nil, t), nil }

// UnmarshalJSON decodes the JSON of store format 1 and recomputes the delta.
func (t *Twin) UnmarshalJSON(b []byte) error {
	var j twinJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*t = Twin{
		ID: j.ID, Type: j.Type, Labels: j.Labels,
		Reported: j.Reported, Desired: j.Desired,
		ReportedMeta: j.ReportedMeta, DesiredMeta: j.DesiredMeta,
		Tombstones: j.Tombstones, DesiredAckedVersion: j.DesiredAckedVersion,
		Version: j.Version, Revision: j.Revision, Presence: j.Presence,
		CreateTime: j.CreateTime, UpdateTime: j.UpdateTime,
		TokenHash: j.TokenHash, CommandSeq: j.CommandSeq,
	}
	if t.Reported == nil {
		t.Reported = Document{}
	}
	if t.Desired == nil {
		t.Desired = Document{}
	}
	t.Delta = Delta(t.Desired, t.Reported, t.Tombstones)
	return nil
}

// jsonSize returns the length of the compact JSON encoding of v, as
// encoding/json would produce it, without building it.
func jsonSize(v any) (int, error) {
	switch v := v.(type) {
	case nil:
		return 4, nil
	case bool:
		if v {
			return 4, nil
		}
		return 5, nil
	case float64:
		// As encoding/json formats floats.
		var buf [32]byte
		f := byte('f')
		if a := math.Abs(v); a != 0 && (a < 1e-6 || a >= 1e21) {
			f = 'e'
		}
		b := strconv.AppendFloat(buf[:0], v, f, -1, 64)
		if n := len(b); f == 'e' && n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			return n - 1, nil
		}
		return len(b), nil
	case string:
		return quotedSize(v), nil
	case []any:
		n := 2 + max(len(v)-1, 0)
		for _, e := range v {
			s, err := jsonSize(e)
			if err != nil {
				return 0, err
			}
			n += s
		}
		return n, nil
	case map[string]any:
		n := 2 + max(len(v)-1, 0)
		for k, e := range v {
			s, err := jsonSize(e)
			if err != nil {
				return 0, err
			}
			n += quotedSize(k) + 1 + s
		}
		return n, nil
	}
	return 0, fmt.Errorf("unsupported value of type %T", v)
}

func quotedSize(s string) int {
	n := 2
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\' || c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t':
				n += 2
			case c < 0x20 || c == '<' || c == '>' || c == '&':
				n += 6
			default:
				n++
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1, r == '\u2028', r == '\u2029':
			n += 6
		default:
			n += size
		}
		i += size
	}
	return n
}
