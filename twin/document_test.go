package twin

import (
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func doc(t testing.TB, s string) Document {
	t.Helper()
	if s == "" {
		return nil
	}
	var d Document
	if err := json.Unmarshal([]byte(s), &d); err != nil {
		t.Fatalf("bad test JSON %s: %v", s, err)
	}
	return d
}

func TestMergePatch(t *testing.T) {
	tests := []struct {
		name, doc, patch, want string
		set, removed           []string
	}{
		// The examples of RFC 7396, appendix A.
		{"replace", `{"a":"b"}`, `{"a":"c"}`, `{"a":"c"}`, []string{"/a"}, nil},
		{"add", `{"a":"b"}`, `{"b":"c"}`, `{"a":"b","b":"c"}`, []string{"/b"}, nil},
		{"delete", `{"a":"b"}`, `{"a":null}`, `{}`, nil, []string{"/a"}},
		{"delete one of two", `{"a":"b","b":"c"}`, `{"a":null}`, `{"b":"c"}`, nil, []string{"/a"}},
		{"array replaces array", `{"a":["b"]}`, `{"a":"c"}`, `{"a":"c"}`, []string{"/a"}, nil},
		{"scalar replaces array", `{"a":"c"}`, `{"a":["b"]}`, `{"a":["b"]}`, []string{"/a"}, nil},
		{"nested", `{"a":{"b":"c"}}`, `{"a":{"b":"d","c":null}}`, `{"a":{"b":"d"}}`, []string{"/a/b"}, nil},
		{"array of objects", `{"a":[{"b":"c"}]}`, `{"a":[1]}`, `{"a":[1]}`, []string{"/a"}, nil},
		{"null in new object dropped", `{"e":null}`, `{"a":1}`, `{"e":null,"a":1}`, []string{"/a"}, nil},
		{"object onto scalar", `{"a":"foo"}`, `{"a":{"bb":{"ccc":null}}}`, `{"a":{"bb":{}}}`, []string{"/a/bb"}, []string{"/a"}},
		// Edge cases.
		{"null on missing key", `{"a":1}`, `{"b":null}`, `{"a":1}`, nil, nil},
		{"empty patch", `{"a":1}`, `{}`, `{"a":1}`, nil, nil},
		{"same value", `{"a":1,"b":{"c":true}}`, `{"a":1,"b":{"c":true}}`, `{"a":1,"b":{"c":true}}`, nil, nil},
		{"scalar onto object", `{"a":{"b":1}}`, `{"a":2}`, `{"a":2}`, []string{"/a"}, []string{"/a"}},
		{"object back onto scalar", `{"a":2}`, `{"a":{"b":1}}`, `{"a":{"b":1}}`, []string{"/a/b"}, []string{"/a"}},
		{"same array", `{"a":[1,2]}`, `{"a":[1,2]}`, `{"a":[1,2]}`, nil, nil},
		{"longer array", `{"a":[1,2]}`, `{"a":[1,2,3]}`, `{"a":[1,2,3]}`, []string{"/a"}, nil},
		{"unicode keys", `{"température":1}`, `{"température":2,"湿度":50}`, `{"température":2,"湿度":50}`, []string{"/température", "/湿度"}, nil},
		{"integer equals float", `{"n":1}`, `{"n":1.0}`, `{"n":1}`, nil, nil},
		{"integer to float", `{"n":1}`, `{"n":1.5}`, `{"n":1.5}`, []string{"/n"}, nil},
		{"pointer escaping", `{}`, `{"a/b":{"~c":1}}`, `{"a/b":{"~c":1}}`, []string{"/a~1b/~0c"}, nil},
		{"empty object leaf", `{}`, `{"a":{}}`, `{"a":{}}`, []string{"/a"}, nil},
		{"fill empty object", `{"a":{}}`, `{"a":{"b":1}}`, `{"a":{"b":1}}`, []string{"/a/b"}, []string{"/a"}},
		{"empty an object", `{"a":{"b":1}}`, `{"a":{"b":null}}`, `{"a":{}}`, []string{"/a"}, []string{"/a/b"}},
		{"onto nil document", ``, `{"a":{"b":null,"c":1}}`, `{"a":{"c":1}}`, []string{"/a/c"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := doc(t, tt.doc)
			before, _ := json.Marshal(d)
			var r mergeResult
			got := mergeObject(d, doc(t, tt.patch), "", &r)
			if got == nil {
				got = Document{}
			}
			if diff := cmp.Diff(doc(t, tt.want), got); diff != "" {
				t.Errorf("merge(%s, %s) mismatch (-want +got):\n%s", tt.doc, tt.patch, diff)
			}
			slices.Sort(r.set)
			slices.Sort(r.removed)
			if !slices.Equal(r.set, tt.set) || !slices.Equal(r.removed, tt.removed) {
				t.Errorf("merge(%s, %s) set %q removed %q; want set %q removed %q",
					tt.doc, tt.patch, r.set, r.removed, tt.set, tt.removed)
			}
			if after, _ := json.Marshal(d); string(after) != string(before) {
				t.Errorf("merge modified its input: %s, was %s", after, before)
			}
			res, changed := MergePatch(d, doc(t, tt.patch))
			if wantChanged := len(tt.set)+len(tt.removed) > 0; changed != wantChanged {
				t.Errorf("MergePatch(%s, %s) changed = %v; want %v", tt.doc, tt.patch, changed, wantChanged)
			}
			if res == nil {
				res = Document{}
			}
			if diff := cmp.Diff(doc(t, tt.want), res); tt.doc != "" && diff != "" {
				t.Errorf("MergePatch(%s, %s) mismatch (-want +got):\n%s", tt.doc, tt.patch, diff)
			}
		})
	}
}

func TestDelta(t *testing.T) {
	tests := []struct {
		name, desired, reported string
		tombstones              map[string]int64
		want                    string
	}{
		{"in sync", `{"a":1}`, `{"a":1,"b":2}`, nil, ``},
		{"differs", `{"a":1}`, `{"a":2}`, nil, `{"a":1}`},
		{"missing in reported", `{"a":{"b":1}}`, `{}`, nil, `{"a":{"b":1}}`},
		{"nested leaf differs", `{"loc":{"lat":1,"lon":2}}`, `{"loc":{"lat":1,"lon":3}}`, nil, `{"loc":{"lon":2}}`},
		{"object vs scalar", `{"a":{"b":1}}`, `{"a":5}`, nil, `{"a":{"b":1}}`},
		{"array differs", `{"a":[1,2]}`, `{"a":[1]}`, nil, `{"a":[1,2]}`},
		{"array same", `{"a":[1,{"x":2}]}`, `{"a":[1,{"x":2}]}`, nil, ``},
		{"integer and float", `{"t":4}`, `{"t":4.0}`, nil, ``},
		{"empty object desired", `{"a":{}}`, `{"a":{"b":1}}`, nil, ``},
		{"empty object missing", `{"a":{}}`, `{}`, nil, `{"a":{}}`},
		{"tombstone", `{"a":1}`, `{"a":1,"b":2}`, map[string]int64{"/b": 3}, `{"b":null}`},
		{"nested tombstone", `{"s":{"on":1}}`, `{"s":{"on":1,"off":2}}`, map[string]int64{"/s/off": 3}, `{"s":{"off":null}}`},
		{"tombstone next to delta", `{"s":{"on":1}}`, `{"s":{"on":2}}`, map[string]int64{"/s/off": 3}, `{"s":{"on":1,"off":null}}`},
		{"tombstone under scalar", `{"s":1}`, `{}`, map[string]int64{"/s/off": 3}, `{"s":1}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			desired := doc(t, tt.desired)
			before, _ := json.Marshal(desired)
			got := Delta(desired, doc(t, tt.reported), tt.tombstones)
			if diff := cmp.Diff(doc(t, tt.want), got); diff != "" {
				t.Errorf("Delta(%s, %s, %v) mismatch (-want +got):\n%s", tt.desired, tt.reported, tt.tombstones, diff)
			}
			if after, _ := json.Marshal(desired); string(after) != string(before) {
				t.Errorf("Delta modified desired: %s, was %s", after, before)
			}
		})
	}
}

func TestJSONSize(t *testing.T) {
	for _, s := range []string{
		`{}`, `{"a":1}`, `{"a":[1,2.5,-3e-7,null,true,false]}`,
		`{"quote\"d":"<tag>&\u0001\\","n":{"m":{}}}`, `{"big":1e300,"int":123456789012}`,
	} {
		d := doc(t, s)
		want, _ := json.Marshal(d)
		got, err := jsonSize(d)
		if err != nil || got != len(want) {
			t.Errorf("jsonSize(%s) = %d, %v; want %d (%s)", s, got, err, len(want), want)
		}
	}
}

func TestLimits(t *testing.T) {
	l := Limits{MaxDepth: 3, MaxKeyBytes: 4}
	l.EnsureDefaults()
	tests := []struct {
		patch string
		ok    bool
	}{
		{`{"a":{"b":{"c":1}}}`, true},
		{`{"a":{"b":{"c":{"d":1}}}}`, false},
		{`{"a":[[[1]]]}`, false},
		{`{"abcd":1}`, true},
		{`{"abcde":1}`, false},
		{`{"":1}`, false},
	}
	for _, tt := range tests {
		err := l.checkPatch(doc(t, tt.patch))
		if (err == nil) != tt.ok {
			t.Errorf("checkPatch(%s) = %v; want ok %v", tt.patch, err, tt.ok)
		}
	}
}

func BenchmarkMergeDelta(b *testing.B) {
	desired := doc(b, `{"target_c":4,"eco":true,"schedule":{"defrost":"02:00","days":[1,3,5]}}`)
	reported := doc(b, `{"temp_c":4.5,"door":"closed","power_w":85,"compressor":true,"target_c":4,"eco":false,
		"location":{"site":"berlin","rack":3}}`)
	patch := doc(b, `{"temp_c":5.1,"power_w":90,"compressor":false}`)
	b.ReportAllocs()
	for b.Loop() {
		var r mergeResult
		merged := mergeObject(reported, patch, "", &r)
		_ = Delta(desired, merged, nil)
	}
}

func TestStoredFormRoundTrip(t *testing.T) {
	tw := &Twin{
		ID: "car-1", Type: "car", Labels: map[string]string{"fleet": "north", "owner": "ops"},
		Reported:     doc(t, `{"fuel":0.25,"location":{"lat":52.5,"lon":13.4},"tags":["a","\"b\"\n"],"on":true,"x":null,"big":1e300,"tiny":-3e-7,"ü":"\u0001<>&"}`),
		Desired:      doc(t, `{"locked":true}`),
		ReportedMeta: map[string]FieldMeta{"/fuel": {Time: time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC), Version: 3}},
		Tombstones:   map[string]int64{"/old": 2},
		Version:      3, Revision: 99, DesiredAckedVersion: 1,
		Presence:   Presence{Connected: true, Since: time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC)},
		CreateTime: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), UpdateTime: time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC),
		TokenHash: []byte{1, 2, 3, 250, 251},
	}
	tw.Delta = Delta(tw.Desired, tw.Reported, tw.Tombstones)
	for _, enc := range []struct {
		name     string
		twin     func([]byte, *Twin) []byte
		event    func([]byte, *Event, []byte) []byte
		record   func(record) []byte
		isBinary bool
	}{
		{"format 1 (JSON)", appendTwinJSON, appendEventJSON, encodeRecordJSON, false},
		{"format 2 (binary)", appendTwin, appendEvent, encodeRecord, true},
	} {
		b := enc.twin(nil, tw)
		if isBinary(b) != enc.isBinary || (!enc.isBinary && !json.Valid(b)) {
			t.Fatalf("%s: the twin's encoding %q is not what decodeRecord takes it for", enc.name, b)
		}
		r, err := decodeRecord(b)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(tw, r.Twin); diff != "" {
			t.Errorf("%s: round trip (-want +got):\n%s", enc.name, diff)
		}
		ev := &Event{Revision: 99, Kind: KindReported, Twin: tw, Patch: doc(t, `{"fuel":0.25,"gone":null}`), Time: tw.UpdateTime, Source: SourceDevice}
		got, err := decodeEvent(enc.event(nil, ev, b))
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(ev, got); diff != "" {
			t.Errorf("%s: event round trip (-want +got):\n%s", enc.name, diff)
		}
		del, err := decodeRecord(enc.record(record{Deleted: true, LastVersion: 7, LastCommandSeq: 3}))
		if err != nil || !del.Deleted || del.LastVersion != 7 || del.LastCommandSeq != 3 {
			t.Errorf("%s: deletion marker round trip = %+v, %v", enc.name, del, err)
		}
	}
	want, _ := json.Marshal(map[string]any(tw.Reported))
	var a, c any
	json.Unmarshal(want, &a)
	json.Unmarshal(appendJSON(nil, map[string]any(tw.Reported)), &c)
	if diff := cmp.Diff(a, c); diff != "" {
		t.Errorf("appendJSON differs from encoding/json (-want +got):\n%s", diff)
	}
}

func TestDiffPatch(t *testing.T) {
	docs := []Document{
		{},
		{"a": 1.0},
		{"a": 2.0, "b": "x"},
		{"a": map[string]any{"x": 1.0, "y": map[string]any{"z": true}}},
		{"a": map[string]any{"x": 1.0}, "c": []any{1.0, 2.0}},
		{"a": "scalar", "c": []any{1.0}},
		{"pump": "on", "fan": "off"},
		{"fan": "on"},
	}
	for _, from := range docs {
		for _, to := range docs {
			p := DiffPatch(from, to)
			got, _ := MergePatch(from, p)
			if got == nil {
				got = Document{}
			}
			if !jsonEqual(map[string]any(got), map[string]any(to)) {
				t.Errorf("MergePatch(%v, DiffPatch(%v, %v) = %v) = %v; want %v", from, from, to, p, got, to)
			}
			if jsonEqual(map[string]any(from), map[string]any(to)) && len(p) != 0 {
				t.Errorf("DiffPatch(%v, %v) = %v; want {}", from, to, p)
			}
		}
	}
	// Removals are nulls.
	if p := DiffPatch(Document{"pump": "on", "fan": "off"}, Document{"fan": "on"}); !jsonEqual(map[string]any(p), map[string]any{"pump": nil, "fan": "on"}) {
		t.Errorf("DiffPatch removing pump = %v; want {pump: null, fan: on}", p)
	}
}
