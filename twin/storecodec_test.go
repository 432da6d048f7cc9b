package twin

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	storev1 "github.com/twind-io/twind/proto/gen/twin/store/v1"
)

// fridgeTwin is the fridge of issue 9 as the API creates it: 8 reported
// leaves (one a nested object of two), 2 desired, 1 label, metadata for
// every leaf.
func fridgeTwin() *Twin {
	at := time.Date(2026, 11, 30, 12, 0, 0, 123456789, time.UTC)
	t := &Twin{
		ID: "fridge-123", Type: "fridge", Labels: map[string]string{"site": "berlin"},
		Reported: Document{"temp_c": 2.3, "door": "closed", "power_w": 80.0, "compressor": false, "target_c": 4.0,
			"eco": true, "fw": "1.2.3", "site": map[string]any{"city": "berlin", "floor": 3.0}},
		Desired: Document{"target_c": 4.0, "eco": true},
		Version: 2, Revision: 1234567,
		Presence:   Presence{Connected: true, Since: at, LastSeen: at.Add(time.Second)},
		CreateTime: at, UpdateTime: at.Add(time.Second),
		TokenHash: make([]byte, 32), CommandSeq: 3,
	}
	t.ReportedMeta = metaOfLeaves(t.Reported, at, 1)
	t.DesiredMeta = metaOfLeaves(t.Desired, at.Add(time.Second), 2)
	t.Delta = Delta(t.Desired, t.Reported, nil)
	return t
}

// bigTwin is a twin of 40 reported leaves, in four nested objects, and 8
// desired ones.
func bigTwin() *Twin {
	t := fridgeTwin()
	t.ID = "planter-000042"
	rep := Document{}
	for g := range 4 {
		grp := map[string]any{}
		for i := range 10 {
			k := fmt.Sprintf("sensor_%d", i)
			switch i % 4 {
			case 0:
				grp[k] = float64(i*17+g) / 7
			case 1:
				grp[k] = float64(i * 100)
			case 2:
				grp[k] = fmt.Sprintf("state-%d", i)
			default:
				grp[k] = i%2 == 0
			}
		}
		rep[fmt.Sprintf("zone_%d", g)] = grp
	}
	des := Document{}
	for i := range 8 {
		des[fmt.Sprintf("setpoint_%d", i)] = float64(i) + 0.5
	}
	at := t.CreateTime
	t.Reported, t.Desired = rep, des
	t.ReportedMeta = metaOfLeaves(rep, at, 5)
	t.DesiredMeta = metaOfLeaves(des, at, 6)
	t.Delta = Delta(t.Desired, t.Reported, nil)
	return t
}

func metaOfLeaves(d Document, at time.Time, version int64) map[string]FieldMeta {
	m := map[string]FieldMeta{}
	leaves(d, "", func(p string) { m[p] = FieldMeta{Time: at, Version: version} })
	return m
}

// randomValue returns a random JSON value of at most depth levels.
func randomValue(rng *rand.Rand, depth int) any {
	switch n := rng.IntN(10); {
	case n == 0:
		return nil
	case n == 1:
		return rng.IntN(2) == 0
	case n == 2:
		return []float64{0, math.Copysign(0, -1), 1 << 53, -(1 << 53), 1<<53 + 2, 1e300, -3e-7, 0.1, 42, -1}[rng.IntN(10)]
	case n == 3:
		return rng.NormFloat64() * 1000
	case n == 4:
		return []string{"", "closed", "ü\u0001<>&\"", strings.Repeat("x", 300)}[rng.IntN(4)]
	case n < 7 && depth > 0:
		a := make([]any, rng.IntN(4))
		for i := range a {
			a[i] = randomValue(rng, depth-1)
		}
		return a
	case depth > 0:
		return randomObject(rng, depth-1)
	}
	return float64(rng.IntN(1000))
}

func randomObject(rng *rand.Rand, depth int) map[string]any {
	m := map[string]any{}
	for range rng.IntN(6) {
		m[[]string{"a", "b/c", "d~e", "temp_c", "ü", "site", "x" + strings.Repeat("y", rng.IntN(200))}[rng.IntN(7)]] = randomValue(rng, depth)
	}
	return m
}

// randomTwin returns a twin with random documents, metadata for a random
// subset of their members and a few paths that name none.
func randomTwin(rng *rand.Rand) *Twin {
	at := time.Unix(0, rng.Int64()).UTC()
	t := &Twin{ID: "t-1", Version: rng.Int64N(1000), Revision: rng.Int64(), UpdateTime: at, CreateTime: time.Unix(0, 0).UTC()}
	t.Reported, t.Desired = randomObject(rng, 4), randomObject(rng, 3)
	for _, d := range []struct {
		doc  Document
		meta *map[string]FieldMeta
	}{{t.Reported, &t.ReportedMeta}, {t.Desired, &t.DesiredMeta}} {
		var paths []string
		var walk func(v any, p string)
		walk = func(v any, p string) {
			if m, ok := v.(map[string]any); ok {
				for k, e := range m {
					q := p + "/" + escapePointer(k)
					paths = append(paths, q)
					walk(e, q)
				}
			}
		}
		walk(d.doc, "")
		for _, p := range paths {
			if rng.IntN(3) > 0 {
				if *d.meta == nil {
					*d.meta = map[string]FieldMeta{}
				}
				(*d.meta)[p] = FieldMeta{Time: at.Add(time.Duration(rng.IntN(1e9))), Version: rng.Int64N(100)}
			}
		}
		if rng.IntN(4) == 0 {
			if *d.meta == nil {
				*d.meta = map[string]FieldMeta{}
			}
			for _, p := range []string{"", "/no/such", "/tags/0"} {
				(*d.meta)[p] = FieldMeta{Time: at, Version: 1}
			}
		}
	}
	if rng.IntN(2) == 0 {
		t.Labels = map[string]string{"site": "berlin", "owner": "ops"}
		t.Tombstones = map[string]int64{"/old": 2, "/a/b": 3}
		t.TokenHash = []byte{1, 2, 3}
		t.Presence = Presence{Connected: true, Since: at, LastSeen: at}
	}
	t.Delta = Delta(t.Desired, t.Reported, t.Tombstones)
	return t
}

// The binary encoding gives back every twin, event, command and rule
// state it is given, and so does the JSON of format 1 that it replaces.
func TestStoreEncodingRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	twins := []*Twin{fridgeTwin(), bigTwin()}
	for range 300 {
		twins = append(twins, randomTwin(rng))
	}
	for i, tw := range twins {
		b := encodeRecord(record{Twin: tw})
		if !isBinary(b) {
			t.Fatalf("twin %d: the record does not start with the encoding byte: %q", i, b)
		}
		r, err := decodeRecord(b)
		if err != nil {
			t.Fatalf("twin %d: %v", i, err)
		}
		if d := cmp.Diff(tw, r.Twin); d != "" {
			t.Fatalf("twin %d: round trip (-want +got):\n%s", i, d)
		}
		var patch Document
		if i%3 != 0 {
			patch = randomObject(rng, 3)
		}
		ev := &Event{Revision: int64(i + 1), Kind: EventKind(i%6 + 1), Twin: tw, Patch: patch, Time: tw.UpdateTime, Source: RuleSource("r")}
		got, err := decodeEvent(appendEvent(nil, ev, b))
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if d := cmp.Diff(ev, got); d != "" {
			t.Fatalf("event %d: round trip (-want +got):\n%s", i, d)
		}
		// An event of a twin whose record was not written (a deletion's).
		if got, err = decodeEvent(appendEvent(nil, ev, nil)); err != nil || !cmp.Equal(ev, got) {
			t.Fatalf("event %d without an encoded record: %v, %s", i, err, cmp.Diff(ev, got))
		}
		h, err := decodeEventHead(appendEvent(nil, ev, b))
		if err != nil || h != (eventHead{Revision: ev.Revision, Kind: ev.Kind, TwinID: tw.ID, Version: tw.Version}) {
			t.Fatalf("event %d: head %+v, %v", i, h, err)
		}
	}
	at := time.Date(2026, 11, 30, 12, 0, 0, 1, time.UTC)
	for _, c := range []*Command{
		{ID: "car-1~1", DeviceID: "car-1", Seq: 1, Name: "honk", State: CommandQueued, TTL: time.Hour, CreateTime: at, UpdateTime: at, ExpireTime: at.Add(time.Hour)},
		{ID: "car-1~2", DeviceID: "car-1", Seq: 2, Name: "navigate", Params: Document{"lat": 52.5, "lon": 13.4}, State: CommandSucceeded,
			Result: Document{"eta": []any{1.0, "x", nil}}, Message: "done", Source: RuleSource("r"), RequestID: "nav-1",
			TTL: 7 * 24 * time.Hour, CreateTime: at, UpdateTime: at.Add(time.Second), ExpireTime: at.Add(time.Hour)},
	} {
		b, _ := encodeCommand(c)
		got, err := decodeCommand(b)
		if err != nil || !cmp.Equal(c, got) {
			t.Errorf("command round trip: %v (-want +got):\n%s", err, cmp.Diff(c, got))
		}
		j, _ := encodeCommandJSON(c)
		if got, err := decodeCommand(j); err != nil || !cmp.Equal(c, got) {
			t.Errorf("command of format 1: %v (-want +got):\n%s", err, cmp.Diff(c, got))
		}
	}
	for _, s := range []RuleState{{}, {Gen: 3, Active: true, PendingSince: at, Fired: true, LastFired: at.Add(time.Minute)}} {
		b, _ := encodeRuleState(&s)
		if got, err := decodeRuleState(b); err != nil || got != s {
			t.Errorf("rule state round trip = %+v, %v; want %+v", got, err, s)
		}
		j, _ := encodeRuleStateJSON(&s)
		if got, err := decodeRuleState(j); err != nil || got != s {
			t.Errorf("rule state of format 1 = %+v, %v; want %+v", got, err, s)
		}
	}
}

// Strings that are not valid UTF-8 are stored as the JSON of format 1
// stored them: each invalid byte becomes U+FFFD.
func TestStoreEncodingInvalidUTF8(t *testing.T) {
	tw := fridgeTwin()
	tw.Reported = Document{"a\xffb": "c\xfe", "ok": "ü"}
	tw.ReportedMeta = nil
	r, err := decodeRecord(encodeRecord(record{Twin: tw}))
	if err != nil {
		t.Fatal(err)
	}
	j, err := decodeRecord(encodeRecordJSON(record{Twin: tw}))
	if err != nil {
		t.Fatal(err)
	}
	if want := (Document{"a\uFFFDb": "c\uFFFD", "ok": "ü"}); !cmp.Equal(r.Twin.Reported, want) || !cmp.Equal(j.Twin.Reported, want) {
		t.Errorf("stored %q; format 1 stored %q; want %q", r.Twin.Reported, j.Twin.Reported, want)
	}
}

// Corrupt values are errors, never panics.
func TestStoreEncodingCorrupt(t *testing.T) {
	b := encodeRecord(record{Twin: bigTwin()})
	for n := range len(b) {
		if _, err := decodeRecord(b[:n]); err == nil && n > 1 {
			r, _ := decodeRecord(b[:n])
			if r.Twin != nil && r.Twin.Version == 2 && len(r.Twin.Reported) == 4 && len(r.Twin.Desired) == 8 {
				t.Errorf("a record cut to %d of %d bytes decodes whole", n, len(b))
			}
		}
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 2000 {
		c := append([]byte(nil), b...)
		for range 1 + rng.IntN(4) {
			c[1+rng.IntN(len(c)-1)] = byte(rng.IntN(256))
		}
		decodeRecord(c)
		decodeEvent(c)
		decodeCommand(c)
		decodeRuleState(c)
		decodeEventHead(c)
	}
	if _, err := decodeRecord([]byte{storeEncoding}); err == nil {
		t.Error("an empty record decodes")
	}
	// A twin whose id (field 1, a string) is a varint.
	bad := protowire.AppendVarint(protowire.AppendTag(nil, twinID, protowire.VarintType), 7)
	bad = protowire.AppendBytes(protowire.AppendTag([]byte{storeEncoding}, recordTwin, protowire.BytesType), bad)
	if _, err := decodeRecord(bad); err == nil || !strings.Contains(err.Error(), "wire type") {
		t.Errorf("a twin whose id is a number decodes: %v", err)
	}
	// A field that a later format adds is skipped.
	later := protowire.AppendBytes(protowire.AppendTag(nil, 99, protowire.BytesType), []byte("x"))
	later = append(appendTwinMessage(nil, fridgeTwin()), later...)
	later = protowire.AppendBytes(protowire.AppendTag([]byte{storeEncoding}, recordTwin, protowire.BytesType), later)
	if r, err := decodeRecord(later); err != nil || !cmp.Equal(r.Twin, fridgeTwin()) {
		t.Errorf("a twin with a field of a later format = %v (-want +got):\n%s", err, cmp.Diff(fridgeTwin(), r.Twin))
	}
}

func FuzzStoreDecode(f *testing.F) {
	f.Add(encodeRecord(record{Twin: fridgeTwin()}))
	f.Add(appendEvent(nil, &Event{Revision: 1, Twin: fridgeTwin(), Patch: Document{"a": nil}}, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		b = append([]byte{storeEncoding}, b...)
		decodeRecord(b)
		decodeEvent(b)
		decodeCommand(b)
		decodeRuleState(b)
		decodeEventHead(b)
	})
}

// The generated code of store.proto reads what storecodec.go writes and
// writes what it reads: the .proto file is the format's documentation.
func TestStoreEncodingMatchesProto(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	twins := []*Twin{fridgeTwin(), bigTwin()}
	for range 100 {
		twins = append(twins, randomTwin(rng))
	}
	for i, tw := range twins {
		b := encodeRecord(record{Twin: tw})
		var rec storev1.Record
		if err := proto.Unmarshal(b[1:], &rec); err != nil {
			t.Fatalf("twin %d: the generated code does not read the record: %v", i, err)
		}
		if d := cmp.Diff(tw, twinFromProto(rec.GetTwin())); d != "" {
			t.Fatalf("twin %d: read by the generated code (-want +got):\n%s", i, d)
		}
		pb, err := proto.Marshal(&storev1.Record{Record: &storev1.Record_Twin{Twin: twinToProto(tw)}})
		if err != nil {
			t.Fatal(err)
		}
		r, err := decodeRecord(append([]byte{storeEncoding}, pb...))
		if err != nil {
			t.Fatalf("twin %d: written by the generated code: %v", i, err)
		}
		if d := cmp.Diff(tw, r.Twin); d != "" {
			t.Fatalf("twin %d: written by the generated code (-want +got):\n%s", i, d)
		}
	}
	var del storev1.Record
	if err := proto.Unmarshal(encodeRecord(record{Deleted: true, LastVersion: 7, LastCommandSeq: 2})[1:], &del); err != nil ||
		del.GetDeletion().GetLastVersion() != 7 || del.GetDeletion().GetLastCommandSeq() != 2 {
		t.Errorf("deletion read by the generated code: %v, %v", &del, err)
	}
	ev := &Event{Revision: 9, Kind: KindDesired, Twin: fridgeTwin(), Patch: Document{"eco": nil}, Time: time.Unix(5, 6).UTC(), Source: SourceAPI}
	var pev storev1.Event
	if err := proto.Unmarshal(appendEvent(nil, ev, encodeRecord(record{Twin: ev.Twin}))[1:], &pev); err != nil ||
		pev.GetRevision() != 9 || pev.GetKind() != storev1.EventKind_EVENT_KIND_DESIRED || pev.GetTime() != 5e9+6 ||
		pev.GetSource() != "api" || len(pev.GetPatch().GetMembers()) != 1 || pev.GetTwin().GetId() != "fridge-123" {
		t.Errorf("event read by the generated code: %v, %v", &pev, err)
	}
	c := &Command{ID: "a~1", DeviceID: "a", Seq: 1, Name: "n", Params: Document{"x": 1.0}, State: CommandSent, TTL: time.Second, ExpireTime: time.Unix(1, 0)}
	cb, _ := encodeCommand(c)
	var pc storev1.Command
	if err := proto.Unmarshal(cb[1:], &pc); err != nil || pc.GetId() != "a~1" || pc.GetState() != storev1.CommandState_COMMAND_STATE_SENT ||
		pc.GetTtlNanos() != 1e9 || pc.GetExpireTime() != 1e9 || len(pc.GetParams().GetMembers()) != 1 {
		t.Errorf("command read by the generated code: %v, %v", &pc, err)
	}
	s := RuleState{Gen: 2, Fired: true, LastFired: time.Unix(3, 0)}
	var ps storev1.RuleState
	sb, _ := encodeRuleState(&s)
	if err := proto.Unmarshal(sb[1:], &ps); err != nil || ps.GetGen() != 2 || !ps.GetFired() || ps.GetLastFired() != 3e9 || ps.PendingSince != nil {
		t.Errorf("rule state read by the generated code: %v, %v", &ps, err)
	}
}

// ---- the same encoding through the generated code, to compare with the
// hand-written one (and to check that they agree)

func timeToProto(t time.Time) *int64 {
	if t.IsZero() {
		return nil
	}
	n := t.UnixNano()
	return &n
}

func timeFromProto(n *int64) time.Time {
	if n == nil {
		return time.Time{}
	}
	return time.Unix(0, *n).UTC()
}

func objectToProto(m map[string]any, meta map[string]FieldMeta, path string, used map[string]bool) *storev1.Object {
	o := &storev1.Object{Members: make([]*storev1.Node, 0, len(m))}
	for k, v := range m {
		p := path + "/" + escapePointer(k)
		n := valueToProto(v, meta, p, used)
		n.Key = k
		if fm, ok := meta[p]; ok {
			used[p] = true
			t := fm.Time.UnixNano()
			n.ChangedTime, n.ChangedVersion = &t, fm.Version
		}
		o.Members = append(o.Members, n)
	}
	return o
}

func valueToProto(v any, meta map[string]FieldMeta, path string, used map[string]bool) *storev1.Node {
	switch v := v.(type) {
	case bool:
		return &storev1.Node{Value: &storev1.Node_BoolValue{BoolValue: v}}
	case float64:
		if v == math.Trunc(v) && math.Abs(v) <= 1<<53 && (v != 0 || !math.Signbit(v)) {
			return &storev1.Node{Value: &storev1.Node_IntegerValue{IntegerValue: int64(v)}}
		}
		return &storev1.Node{Value: &storev1.Node_NumberValue{NumberValue: v}}
	case string:
		return &storev1.Node{Value: &storev1.Node_StringValue{StringValue: v}}
	case []any:
		a := &storev1.Array{Elements: make([]*storev1.Node, len(v))}
		for i, e := range v {
			a.Elements[i] = valueToProto(e, nil, "", nil)
		}
		return &storev1.Node{Value: &storev1.Node_ArrayValue{ArrayValue: a}}
	case map[string]any:
		return &storev1.Node{Value: &storev1.Node_ObjectValue{ObjectValue: objectToProto(v, meta, path, used)}}
	}
	return &storev1.Node{Value: &storev1.Node_NullValue{}}
}

func documentToProto(d Document, meta map[string]FieldMeta) (*storev1.Object, []*storev1.PathMeta) {
	used := map[string]bool{}
	var o *storev1.Object
	if len(d) > 0 {
		o = objectToProto(d, meta, "", used)
	}
	var rest []*storev1.PathMeta
	for p, m := range meta {
		if !used[p] {
			rest = append(rest, &storev1.PathMeta{Path: p, ChangedTime: m.Time.UnixNano(), ChangedVersion: m.Version})
		}
	}
	return o, rest
}

func twinToProto(t *Twin) *storev1.Twin {
	p := &storev1.Twin{
		Id: t.ID, Type: t.Type, Labels: t.Labels, Tombstones: t.Tombstones,
		DesiredAckedVersion: t.DesiredAckedVersion, Version: t.Version, Revision: t.Revision,
		Connected: t.Presence.Connected, ConnectedSince: timeToProto(t.Presence.Since), LastSeen: timeToProto(t.Presence.LastSeen),
		CreateTime: timeToProto(t.CreateTime), UpdateTime: timeToProto(t.UpdateTime), TokenHash: t.TokenHash, CommandSeq: t.CommandSeq,
	}
	p.Reported, p.ReportedMeta = documentToProto(t.Reported, t.ReportedMeta)
	p.Desired, p.DesiredMeta = documentToProto(t.Desired, t.DesiredMeta)
	return p
}

func objectFromProto(o *storev1.Object, meta map[string]FieldMeta, path string) map[string]any {
	m := make(map[string]any, len(o.GetMembers()))
	for _, n := range o.GetMembers() {
		p := path + "/" + escapePointer(n.Key)
		m[n.Key] = valueFromProto(n, meta, p)
		if n.ChangedTime != nil && meta != nil {
			meta[p] = FieldMeta{Time: time.Unix(0, *n.ChangedTime).UTC(), Version: n.ChangedVersion}
		}
	}
	return m
}

func valueFromProto(n *storev1.Node, meta map[string]FieldMeta, path string) any {
	switch v := n.Value.(type) {
	case *storev1.Node_BoolValue:
		return v.BoolValue
	case *storev1.Node_NumberValue:
		return v.NumberValue
	case *storev1.Node_IntegerValue:
		return float64(v.IntegerValue)
	case *storev1.Node_StringValue:
		return v.StringValue
	case *storev1.Node_ArrayValue:
		a := make([]any, len(v.ArrayValue.GetElements()))
		for i, e := range v.ArrayValue.GetElements() {
			a[i] = valueFromProto(e, nil, "")
		}
		return a
	case *storev1.Node_ObjectValue:
		return objectFromProto(v.ObjectValue, meta, path)
	}
	return nil
}

func documentFromProto(o *storev1.Object, rest []*storev1.PathMeta) (Document, map[string]FieldMeta) {
	meta := map[string]FieldMeta{}
	d := objectFromProto(o, meta, "")
	for _, m := range rest {
		meta[m.Path] = FieldMeta{Time: time.Unix(0, m.ChangedTime).UTC(), Version: m.ChangedVersion}
	}
	if len(meta) == 0 {
		meta = nil
	}
	return d, meta
}

func twinFromProto(p *storev1.Twin) *Twin {
	t := &Twin{
		ID: p.Id, Type: p.Type, Labels: p.Labels, Tombstones: p.Tombstones,
		DesiredAckedVersion: p.DesiredAckedVersion, Version: p.Version, Revision: p.Revision,
		Presence:   Presence{Connected: p.Connected, Since: timeFromProto(p.ConnectedSince), LastSeen: timeFromProto(p.LastSeen)},
		CreateTime: timeFromProto(p.CreateTime), UpdateTime: timeFromProto(p.UpdateTime), TokenHash: p.TokenHash, CommandSeq: p.CommandSeq,
	}
	t.Reported, t.ReportedMeta = documentFromProto(p.Reported, p.ReportedMeta)
	t.Desired, t.DesiredMeta = documentFromProto(p.Desired, p.DesiredMeta)
	t.Delta = Delta(t.Desired, t.Reported, t.Tombstones)
	return t
}

// ---- benchmarks: go test -run '^$' -bench StoreCodec ./twin/

func BenchmarkStoreCodec(b *testing.B) {
	for _, tc := range []struct {
		name string
		twin *Twin
	}{{"fridge", fridgeTwin()}, {"40leaves", bigTwin()}} {
		tw := tc.twin
		jsonRec, binRec := encodeRecordJSON(record{Twin: tw}), encodeRecord(record{Twin: tw})
		pbRec, _ := proto.Marshal(&storev1.Record{Record: &storev1.Record_Twin{Twin: twinToProto(tw)}})
		b.Run(tc.name+"/encode/json", func(b *testing.B) {
			for b.Loop() {
				encodeRecordJSON(record{Twin: tw})
			}
			b.ReportMetric(float64(len(jsonRec)), "bytes")
		})
		b.Run(tc.name+"/encode/binary", func(b *testing.B) {
			for b.Loop() {
				encodeRecord(record{Twin: tw})
			}
			b.ReportMetric(float64(len(binRec)), "bytes")
		})
		b.Run(tc.name+"/encode/generated", func(b *testing.B) {
			for b.Loop() {
				proto.Marshal(&storev1.Record{Record: &storev1.Record_Twin{Twin: twinToProto(tw)}})
			}
			b.ReportMetric(float64(len(pbRec)+1), "bytes")
		})
		b.Run(tc.name+"/decode/json", func(b *testing.B) {
			for b.Loop() {
				if _, err := decodeRecord(jsonRec); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(tc.name+"/decode/binary", func(b *testing.B) {
			for b.Loop() {
				if _, err := decodeRecord(binRec); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(tc.name+"/decode/generated", func(b *testing.B) {
			for b.Loop() {
				var r storev1.Record
				if err := proto.Unmarshal(pbRec, &r); err != nil {
					b.Fatal(err)
				}
				twinFromProto(r.GetTwin())
			}
		})
		ev := &Event{Revision: 99, Kind: KindReported, Twin: tw, Patch: Document{"temp_c": 2.4}, Time: tw.UpdateTime, Source: SourceDevice}
		jsonEv, binEv := appendEventJSON(nil, ev, jsonRec), appendEvent(nil, ev, binRec)
		b.Run(tc.name+"/event-encode/json", func(b *testing.B) {
			var buf []byte
			for b.Loop() {
				buf = appendEventJSON(buf[:0], ev, appendTwinJSON(nil, tw))
			}
			b.ReportMetric(float64(len(jsonEv)), "bytes")
		})
		b.Run(tc.name+"/event-encode/binary", func(b *testing.B) {
			var buf []byte
			for b.Loop() {
				buf = appendEvent(buf[:0], ev, encodeRecord(record{Twin: tw}))
			}
			b.ReportMetric(float64(len(binEv)), "bytes")
		})
		b.Run(tc.name+"/event-decode/json", func(b *testing.B) {
			for b.Loop() {
				decodeEvent(jsonEv)
			}
		})
		b.Run(tc.name+"/event-decode/binary", func(b *testing.B) {
			for b.Loop() {
				decodeEvent(binEv)
			}
		})
	}
}

// The readers' tables of wire types are those of store.proto.
func TestStoreWireTables(t *testing.T) {
	for _, tc := range []struct {
		wire string
		msg  protoreflect.MessageDescriptor
	}{
		{recordWire, (&storev1.Record{}).ProtoReflect().Descriptor()},
		{deletionWire, (&storev1.Deletion{}).ProtoReflect().Descriptor()},
		{twinWire, (&storev1.Twin{}).ProtoReflect().Descriptor()},
		{labelWire, (&storev1.Twin{}).ProtoReflect().Descriptor().Fields().ByName("labels").Message()},
		{tombstoneWire, (&storev1.Twin{}).ProtoReflect().Descriptor().Fields().ByName("tombstones").Message()},
		{pathMetaWire, (&storev1.PathMeta{}).ProtoReflect().Descriptor()},
		{nodeWire, (&storev1.Node{}).ProtoReflect().Descriptor()},
		{eventWire, (&storev1.Event{}).ProtoReflect().Descriptor()},
		{changeWire, (&storev1.TwinChange{}).ProtoReflect().Descriptor()},
		{commandWire, (&storev1.Command{}).ProtoReflect().Descriptor()},
		{ruleStateWire, (&storev1.RuleState{}).ProtoReflect().Descriptor()},
	} {
		fields := tc.msg.Fields()
		want := []byte{'-'}
		for n := 1; n <= fields.Len(); n++ {
			fd := fields.ByNumber(protoreflect.FieldNumber(n))
			if fd == nil {
				t.Fatalf("%s: no field %d", tc.msg.FullName(), n)
			}
			switch fd.Kind() {
			case protoreflect.StringKind, protoreflect.BytesKind, protoreflect.MessageKind:
				want = append(want, 'B')
			case protoreflect.Sfixed64Kind, protoreflect.DoubleKind:
				want = append(want, 'F')
			default:
				want = append(want, 'V')
			}
		}
		if tc.wire != string(want) {
			t.Errorf("%s: the readers' wire types are %q; store.proto's %q", tc.msg.FullName(), tc.wire, want)
		}
	}
}

// decodeEvent decodes a watch log entry that holds the whole twin.
func decodeEvent(b []byte) (*Event, error) {
	ev, ch, err := decodeLogEntry(b)
	if err == nil && ch != nil {
		err = errors.New("the entry holds a change, not the whole twin")
	}
	return ev, err
}
