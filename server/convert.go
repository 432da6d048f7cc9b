package server

import (
	"fmt"
	"math"
	"strconv"
	"time"
	"unicode"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// twinProto converts a twin to its wire form.
func twinProto(t *twin.Twin) *twinv1.Twin {
	return &twinv1.Twin{
		Id:                  t.ID,
		Type:                t.Type,
		Labels:              t.Labels,
		Reported:            structProto(t.Reported),
		Desired:             structProto(t.Desired),
		Delta:               structProto(t.Delta),
		Version:             t.Version,
		Metadata:            &twinv1.TwinMetadata{Reported: metaProto(t.ReportedMeta), Desired: metaProto(t.DesiredMeta)},
		Presence:            presenceProto(t.Presence),
		CreateTime:          timeProto(t.CreateTime),
		UpdateTime:          timeProto(t.UpdateTime),
		Revision:            t.Revision,
		DesiredAckedVersion: t.DesiredAckedVersion,
	}
}

// structProto converts a document to a Struct. Documents hold only JSON
// values, which always convert.
func structProto(d twin.Document) *structpb.Struct {
	s, err := structpb.NewStruct(d)
	if err != nil {
		panic(fmt.Sprintf("server: document does not convert to a Struct: %v", err))
	}
	return s
}

func metaProto(m map[string]twin.FieldMeta) map[string]*twinv1.FieldMetadata {
	if len(m) == 0 {
		return nil
	}
	out := make(map[string]*twinv1.FieldMetadata, len(m))
	for p, fm := range m {
		out[p] = &twinv1.FieldMetadata{UpdateTime: timeProto(fm.Time), Version: fm.Version}
	}
	return out
}

func presenceProto(p twin.Presence) *twinv1.Presence {
	return &twinv1.Presence{Connected: p.Connected, Since: timeProto(p.Since), LastSeen: timeProto(p.LastSeen)}
}

func timeProto(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// document converts a Struct from a client to a document. nil is an empty
// document. Unlike structpb's AsMap, which turns NaN and ±Infinity into the
// strings "NaN" and "Infinity", it keeps them as numbers, so that the engine
// refuses them (JSON has no such numbers) rather than store a string the
// client never sent. Handlers that can name the field call checkFinite
// first, for a clearer message.
func document(s *structpb.Struct) twin.Document {
	if s == nil {
		return twin.Document{}
	}
	return structMap(s)
}

func structMap(s *structpb.Struct) map[string]any {
	m := make(map[string]any, len(s.GetFields()))
	for k, v := range s.GetFields() {
		m[k] = value(v)
	}
	return m
}

func value(v *structpb.Value) any {
	switch k := v.GetKind().(type) {
	case *structpb.Value_NumberValue:
		return k.NumberValue
	case *structpb.Value_StringValue:
		return k.StringValue
	case *structpb.Value_BoolValue:
		return k.BoolValue
	case *structpb.Value_StructValue:
		return structMap(k.StructValue)
	case *structpb.Value_ListValue:
		l := make([]any, len(k.ListValue.GetValues()))
		for i, e := range k.ListValue.GetValues() {
			l[i] = value(e)
		}
		return l
	}
	return nil // null, or no kind set
}

// checkFinite refuses a Struct from a client that holds NaN or ±Infinity,
// with INVALID_ARGUMENT naming the number's path under field (the request
// field the Struct came from, e.g. "patch"). A client's protobuf library
// sends them as they are, Python's float("nan") in a Struct for example.
func checkFinite(field string, s *structpb.Struct) error {
	if path, f, ok := nonFinite(field, structpb.NewStructValue(s)); ok {
		return invalid("%s is %v, which JSON cannot hold: send a finite number, or null to delete the key", path, f)
	}
	return nil
}

// nonFinite returns the path and value of the first NaN or infinite number
// in v.
func nonFinite(path string, v *structpb.Value) (string, float64, bool) {
	switch k := v.GetKind().(type) {
	case *structpb.Value_NumberValue:
		if math.IsNaN(k.NumberValue) || math.IsInf(k.NumberValue, 0) {
			return path, k.NumberValue, true
		}
	case *structpb.Value_StructValue:
		for key, e := range k.StructValue.GetFields() {
			if p, f, ok := nonFinite(path+pathKey(key), e); ok {
				return p, f, true
			}
		}
	case *structpb.Value_ListValue:
		for i, e := range k.ListValue.GetValues() {
			if p, f, ok := nonFinite(path+"["+strconv.Itoa(i)+"]", e); ok {
				return p, f, true
			}
		}
	}
	return "", 0, false
}

// pathKey spells a key in a path: .key, or ["key"] if it is not a plain
// identifier.
func pathKey(k string) string {
	for i, r := range k {
		if !(r == '_' || unicode.IsLetter(r) || (i > 0 && unicode.IsDigit(r))) {
			return "[" + strconv.Quote(k) + "]"
		}
	}
	if k == "" {
		return `[""]`
	}
	return "." + k
}

var eventKinds = map[twin.EventKind]twinv1.TwinEventKind{
	twin.KindCreated:  twinv1.TwinEventKind_TWIN_EVENT_KIND_CREATED,
	twin.KindReported: twinv1.TwinEventKind_TWIN_EVENT_KIND_REPORTED,
	twin.KindDesired:  twinv1.TwinEventKind_TWIN_EVENT_KIND_DESIRED,
	twin.KindUpdated:  twinv1.TwinEventKind_TWIN_EVENT_KIND_UPDATED,
	twin.KindDeleted:  twinv1.TwinEventKind_TWIN_EVENT_KIND_DELETED,
	twin.KindPresence: twinv1.TwinEventKind_TWIN_EVENT_KIND_PRESENCE,
	twin.KindImported: twinv1.TwinEventKind_TWIN_EVENT_KIND_IMPORTED,
}

func eventProto(ev *twin.Event) *twinv1.TwinEvent {
	out := &twinv1.TwinEvent{
		Revision: ev.Revision,
		Kind:     eventKinds[ev.Kind],
		Time:     timeProto(ev.Time),
		Source:   string(ev.Source),
	}
	if ev.Twin != nil { // an import's marker has none
		out.Twin = twinProto(ev.Twin)
	}
	if ev.Patch != nil {
		out.Patch = structProto(ev.Patch)
	}
	return out
}

func commandProto(c *twin.Command) *twinv1.Command {
	out := &twinv1.Command{
		Id:         c.ID,
		DeviceId:   c.DeviceID,
		Name:       c.Name,
		State:      twinv1.CommandState(c.State),
		Message:    c.Message,
		Source:     string(c.Source),
		RequestId:  c.RequestID,
		Ttl:        durationpb.New(c.TTL),
		CreateTime: timeProto(c.CreateTime),
		UpdateTime: timeProto(c.UpdateTime),
		ExpireTime: timeProto(c.ExpireTime),
		Sequence:   c.Seq,
	}
	if c.Params != nil {
		out.Params = structProto(c.Params)
	}
	if c.Result != nil {
		out.Result = structProto(c.Result)
	}
	return out
}
