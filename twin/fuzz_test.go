package twin

import (
	"encoding/json"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// FuzzMergePatch checks properties of merge patches on arbitrary JSON:
// applying a patch twice changes nothing the second time; "changed" tells
// the truth; the input is never modified; the stored encoding and the size
// computation agree with encoding/json; and the delta of a document against
// itself is empty.
func FuzzMergePatch(f *testing.F) {
	for _, seed := range [][2]string{
		{`{"a":"b"}`, `{"a":"c"}`},
		{`{"a":{"b":"c"}}`, `{"a":{"b":"d","c":null}}`},
		{`{"a":"foo"}`, `{"a":{"bb":{"ccc":null}}}`},
		{`{"a":[1,2]}`, `{"a":{"x":[{"y":null}]}}`},
		{`{}`, `{"ü":"\u0001<>&","n":1e300,"m":-3e-7}`},
		{`{"a":{}}`, `{"a":{"b":{}}}`},
	} {
		f.Add(seed[0], seed[1])
	}
	f.Fuzz(func(t *testing.T, docJS, patchJS string) {
		var d, p Document
		if json.Unmarshal([]byte(docJS), &d) != nil || json.Unmarshal([]byte(patchJS), &p) != nil || d == nil || p == nil {
			return
		}
		before, _ := json.Marshal(d)
		once, changed := MergePatch(d, p)
		if after, _ := json.Marshal(d); string(after) != string(before) {
			t.Fatalf("MergePatch modified its input: %s, was %s", after, before)
		}
		if changed == jsonEqual(map[string]any(once), map[string]any(d)) {
			t.Fatalf("MergePatch(%s, %s) changed=%v but result %v", docJS, patchJS, changed, once)
		}
		if twice, again := MergePatch(once, p); again || !jsonEqual(map[string]any(twice), map[string]any(once)) {
			t.Fatalf("applying %s a second time changed %v to %v", patchJS, once, twice)
		}
		want, err := json.Marshal(once)
		if err != nil {
			return
		}
		if n, err := jsonSize(map[string]any(once)); err != nil || n != len(want) {
			t.Fatalf("jsonSize = %d, %v; encoding/json writes %d bytes", n, err, len(want))
		}
		var back any
		if err := json.Unmarshal(appendJSON(nil, map[string]any(once)), &back); err != nil {
			t.Fatalf("appendJSON wrote invalid JSON: %v", err)
		}
		var viaStd any
		json.Unmarshal(want, &viaStd)
		if diff := cmp.Diff(viaStd, back); diff != "" {
			t.Fatalf("appendJSON differs from encoding/json (-std +ours):\n%s", diff)
		}
		if delta := Delta(once, once, nil); delta != nil {
			t.Fatalf("Delta of %v against itself = %v", once, delta)
		}
	})
}
