package twin

import (
	"encoding/base64"
	"math"
	"sort"
	"strconv"
	"time"
	"unicode/utf8"
)

// The stored forms of twins and events of store format 1 were written by
// these appenders rather than by encoding/json: they run once per change in the write path, where
// reflection and re-validation of nested output cost more than the rest of
// the change. Their output is plain JSON that encoding/json decodes.

// appendJSON appends the JSON encoding of a document value to b.
func appendJSON(b []byte, v any) []byte {
	switch v := v.(type) {
	case nil:
		return append(b, "null"...)
	case bool:
		return strconv.AppendBool(b, v)
	case float64:
		return appendFloat(b, v)
	case string:
		return appendString(b, v)
	case []any:
		b = append(b, '[')
		for i, e := range v {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSON(b, e)
		}
		return append(b, ']')
	case map[string]any:
		b = append(b, '{')
		first := true
		for k, e := range v {
			if !first {
				b = append(b, ',')
			}
			first = false
			b = appendString(b, k)
			b = append(b, ':')
			b = appendJSON(b, e)
		}
		return append(b, '}')
	}
	// Documents hold only the types above; checkValue refuses the rest.
	return append(b, "null"...)
}

// appendFloat formats a number as encoding/json does.
func appendFloat(b []byte, f float64) []byte {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return append(b, "null"...)
	}
	format := byte('f')
	if a := math.Abs(f); a != 0 && (a < 1e-6 || a >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if n := len(b); format == 'e' && n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
		b[n-2] = b[n-1]
		b = b[:n-1]
	}
	return b
}

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string. Invalid UTF-8 becomes U+FFFD.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 || r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			switch r {
			case '\u2028':
				b = append(b, `\u2028`...)
			case '\u2029':
				b = append(b, `\u2029`...)
			default:
				b = append(b, `\ufffd`...)
			}
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

func appendTime(b []byte, t time.Time) []byte {
	b = append(b, '"')
	b = t.AppendFormat(b, time.RFC3339Nano)
	return append(b, '"')
}

// appendKey appends `,"key":` (without the comma for the first key).
func appendKey(b []byte, key string) []byte {
	if b[len(b)-1] != '{' {
		b = append(b, ',')
	}
	b = append(b, '"')
	b = append(b, key...)
	return append(b, '"', ':')
}

// appendTwinJSON appends the stored form of a twin in store format 1; see
// twinJSON.
func appendTwinJSON(b []byte, t *Twin) []byte {
	b = append(b, '{')
	b = appendKey(b, "id")
	b = appendString(b, t.ID)
	if t.Type != "" {
		b = appendKey(b, "type")
		b = appendString(b, t.Type)
	}
	if len(t.Labels) > 0 {
		b = appendKey(b, "labels")
		b = append(b, '{')
		for _, k := range sortedKeys(t.Labels) {
			if b[len(b)-1] != '{' {
				b = append(b, ',')
			}
			b = appendString(b, k)
			b = append(b, ':')
			b = appendString(b, t.Labels[k])
		}
		b = append(b, '}')
	}
	b = appendKey(b, "reported")
	b = appendJSON(b, map[string]any(t.Reported))
	b = appendKey(b, "desired")
	b = appendJSON(b, map[string]any(t.Desired))
	b = appendMeta(b, "reported_meta", t.ReportedMeta)
	b = appendMeta(b, "desired_meta", t.DesiredMeta)
	if len(t.Tombstones) > 0 {
		b = appendKey(b, "tombstones")
		b = append(b, '{')
		for p, v := range t.Tombstones {
			if b[len(b)-1] != '{' {
				b = append(b, ',')
			}
			b = appendString(b, p)
			b = append(b, ':')
			b = strconv.AppendInt(b, v, 10)
		}
		b = append(b, '}')
	}
	if t.DesiredAckedVersion != 0 {
		b = appendKey(b, "desired_acked_version")
		b = strconv.AppendInt(b, t.DesiredAckedVersion, 10)
	}
	b = appendKey(b, "version")
	b = strconv.AppendInt(b, t.Version, 10)
	b = appendKey(b, "revision")
	b = strconv.AppendInt(b, t.Revision, 10)
	b = appendKey(b, "presence")
	b = append(b, '{')
	if t.Presence.Connected {
		b = appendKey(b, "connected")
		b = append(b, "true"...)
	}
	if !t.Presence.Since.IsZero() {
		b = appendKey(b, "since")
		b = appendTime(b, t.Presence.Since)
	}
	if !t.Presence.LastSeen.IsZero() {
		b = appendKey(b, "last_seen")
		b = appendTime(b, t.Presence.LastSeen)
	}
	b = append(b, '}')
	b = appendKey(b, "create_time")
	b = appendTime(b, t.CreateTime)
	b = appendKey(b, "update_time")
	b = appendTime(b, t.UpdateTime)
	if t.CommandSeq != 0 {
		b = appendKey(b, "command_seq")
		b = strconv.AppendInt(b, t.CommandSeq, 10)
	}
	if len(t.TokenHash) > 0 {
		b = appendKey(b, "token_hash")
		b = append(b, '"')
		b = base64.StdEncoding.AppendEncode(b, t.TokenHash)
		b = append(b, '"')
	}
	return append(b, '}')
}

func appendMeta(b []byte, key string, meta map[string]FieldMeta) []byte {
	if len(meta) == 0 {
		return b
	}
	b = appendKey(b, key)
	b = append(b, '{')
	for p, m := range meta {
		if b[len(b)-1] != '{' {
			b = append(b, ',')
		}
		b = appendString(b, p)
		b = append(b, ':')
		b = appendFieldMeta(b, m)
	}
	return append(b, '}')
}

func appendFieldMeta(b []byte, m FieldMeta) []byte {
	b = append(b, `{"t":`...)
	b = strconv.AppendInt(b, m.Time.UnixNano(), 10)
	b = append(b, `,"v":`...)
	b = strconv.AppendInt(b, m.Version, 10)
	return append(b, '}')
}

// appendEventJSON appends the stored form of an event in store format 1,
// whose twin is already encoded as tw (by appendTwinJSON).
func appendEventJSON(b []byte, ev *Event, tw []byte) []byte {
	b = append(b, `{"r":`...)
	b = strconv.AppendInt(b, ev.Revision, 10)
	b = append(b, `,"k":`...)
	b = strconv.AppendInt(b, int64(ev.Kind), 10)
	b = append(b, `,"t":`...)
	b = appendTime(b, ev.Time)
	if ev.Source != "" {
		b = append(b, `,"s":`...)
		b = appendString(b, string(ev.Source))
	}
	if ev.Patch != nil {
		b = append(b, `,"p":`...)
		b = appendJSON(b, map[string]any(ev.Patch))
	}
	b = append(b, `,"tw":`...)
	b = append(b, tw...)
	return append(b, '}')
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
