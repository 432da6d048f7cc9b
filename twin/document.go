package twin

import (
	"fmt"
	"maps"
	"math"
	"reflect"
	"sort"
	"strings"
	"unicode/utf8"
)

// A Document is a JSON object as encoding/json decodes it: values are nil,
// bool, float64, string, []any or map[string]any.
//
// Documents held by a Twin are immutable: every change builds a new
// document that shares the unchanged subtrees with the old one. Never modify
// a Document obtained from a Twin.
type Document = map[string]any

// Limits bound the size and shape of documents. The zero value of each field
// means its default.
type Limits struct {
	// MaxDocumentBytes bounds the JSON encoding of each of reported and
	// desired after a change. Default 64 KiB.
	MaxDocumentBytes int
	// MaxDepth bounds how deeply objects and arrays nest. Default 16.
	MaxDepth int
	// MaxKeyBytes bounds the length of each key. Default 256.
	MaxKeyBytes int
	// MaxCommandBytes bounds the JSON encoding of a command's params, and
	// of the result a device reports for it. Default 16 KiB.
	MaxCommandBytes int
	// MaxMessageBytes bounds the message a device reports with a
	// command's state. Default 1 KiB.
	MaxMessageBytes int
	// MaxMetadataBytes bounds the per-leaf metadata of each of reported
	// and desired: a JSON Pointer, an update time and a version per leaf.
	// A document within the other limits can still have thousands of
	// leaves under long keys nested deep, whose pointers would make a twin
	// too large to read or send. Default 1 MiB.
	MaxMetadataBytes int
}

// EnsureDefaults fills the zero fields of l with their defaults.
func (l *Limits) EnsureDefaults() {
	if l.MaxDocumentBytes <= 0 {
		l.MaxDocumentBytes = 64 << 10
	}
	if l.MaxDepth <= 0 {
		l.MaxDepth = 16
	}
	if l.MaxKeyBytes <= 0 {
		l.MaxKeyBytes = 256
	}
	if l.MaxCommandBytes <= 0 {
		l.MaxCommandBytes = 16 << 10
	}
	if l.MaxMessageBytes <= 0 {
		l.MaxMessageBytes = 1 << 10
	}
	if l.MaxMetadataBytes <= 0 {
		l.MaxMetadataBytes = 1 << 20
	}
}

// checkCommandDoc checks a command's params or result: well formed, within
// the depth and key limits and MaxCommandBytes.
func (l *Limits) checkCommandDoc(d Document, name string) error {
	if err := l.checkPatch(d); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	n, err := jsonSize(d)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrInvalidPatch, name, err)
	}
	if n > l.MaxCommandBytes {
		return fmt.Errorf("%w: %s is %d bytes, over the command limit of %d bytes; send large data another way (a URL, or desired state)",
			ErrLimit, name, n, l.MaxCommandBytes)
	}
	return nil
}

// checkPatch checks that a merge patch is well formed and within the depth
// and key limits. Checking the patch is enough for depth and keys: every path
// of the merged document comes either from the document, which was already
// within limits, or from the patch.
func (l *Limits) checkPatch(patch Document) error {
	return l.checkValue(patch, "", 1)
}

func (l *Limits) checkValue(v any, path string, depth int) error {
	switch v := v.(type) {
	case nil, bool, string:
		return nil
	case float64:
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return fmt.Errorf("%w: %s: %v is not a JSON number", ErrInvalidPatch, displayPath(path), v)
		}
		return nil
	case map[string]any:
		if depth > l.MaxDepth {
			return fmt.Errorf("%w: %s nests deeper than the depth limit of %d", ErrLimit, displayPath(path), l.MaxDepth)
		}
		for k, e := range v {
			if len(k) > l.MaxKeyBytes {
				return fmt.Errorf("%w: key %.32q... under %s is %d bytes, over the key limit of %d bytes",
					ErrLimit, k, displayPath(path), len(k), l.MaxKeyBytes)
			}
			if k == "" {
				return fmt.Errorf("%w: empty key under %s", ErrInvalidPatch, displayPath(path))
			}
			if !utf8.ValidString(k) {
				return fmt.Errorf("%w: key under %s is not valid UTF-8", ErrInvalidPatch, displayPath(path))
			}
			if err := l.checkValue(e, path+"/"+escapePointer(k), depth+1); err != nil {
				return err
			}
		}
		return nil
	case []any:
		if depth > l.MaxDepth {
			return fmt.Errorf("%w: %s nests deeper than the depth limit of %d", ErrLimit, displayPath(path), l.MaxDepth)
		}
		for i, e := range v {
			if err := l.checkValue(e, fmt.Sprintf("%s/%d", path, i), depth+1); err != nil {
				return err
			}
		}
		return nil
	default:
		return fmt.Errorf("%w: %s: unsupported value of type %T", ErrInvalidPatch, displayPath(path), v)
	}
}

func displayPath(p string) string {
	if p == "" {
		return "the document"
	}
	return p
}

// escapePointer escapes a key for use in a JSON Pointer (RFC 6901).
func escapePointer(k string) string {
	if !strings.ContainsAny(k, "~/") {
		return k
	}
	return strings.NewReplacer("~", "~0", "/", "~1").Replace(k)
}

// splitPointer splits a JSON Pointer into its unescaped keys.
func splitPointer(p string) []string {
	if p == "" {
		return nil
	}
	parts := strings.Split(p[1:], "/")
	for i, s := range parts {
		if strings.Contains(s, "~") {
			parts[i] = strings.NewReplacer("~1", "/", "~0", "~").Replace(s)
		}
	}
	return parts
}

// mergeResult says what a merge patch did.
type mergeResult struct {
	// set holds the pointers of the leaves given a new value. A leaf is a
	// value that is not a non-empty object.
	set []string
	// removed holds the pointers of the keys deleted, each with everything
	// under it.
	removed []string
}

func (r *mergeResult) changed() bool { return len(r.set) > 0 || len(r.removed) > 0 }

// MergePatch applies an RFC 7396 JSON merge patch to doc and returns the
// result, which shares unchanged subtrees with doc; doc itself is not
// modified. changed reports whether the result differs from doc; if it does
// not, the result is doc itself.
func MergePatch(doc, patch Document) (result Document, changed bool) {
	var r mergeResult
	out := mergeObject(doc, patch, "", &r)
	if !r.changed() {
		return doc, false
	}
	return out, true
}

func mergeObject(doc, patch map[string]any, path string, r *mergeResult) map[string]any {
	var out map[string]any // copied from doc on first change
	for k, pv := range patch {
		p := path + "/" + escapePointer(k)
		old, had := doc[k]
		var nv any
		switch pv := pv.(type) {
		case nil:
			if !had {
				continue
			}
			r.removed = append(r.removed, p)
			if out == nil {
				out = maps.Clone(doc)
			}
			delete(out, k)
			continue
		case map[string]any:
			oldObj, isObj := old.(map[string]any)
			if !isObj {
				if had {
					// A scalar or array becomes an object: its
					// metadata goes and the new leaves come.
					r.removed = append(r.removed, p)
				}
				oldObj = nil
			}
			n := len(r.set) + len(r.removed)
			merged := mergeObject(oldObj, pv, p, r)
			if isObj && n == len(r.set)+len(r.removed) {
				continue // nothing under k changed
			}
			if merged == nil {
				merged = map[string]any{}
			}
			if len(merged) == 0 && (!isObj || len(oldObj) != 0) {
				r.set = append(r.set, p) // an empty object is a leaf
			} else if isObj && len(oldObj) == 0 && len(merged) > 0 {
				r.removed = append(r.removed, p) // the empty-object leaf is gone
			}
			nv = merged
		default:
			if had && jsonEqual(old, pv) {
				continue
			}
			if _, wasObj := old.(map[string]any); wasObj {
				r.removed = append(r.removed, p)
			}
			r.set = append(r.set, p)
			nv = pv
		}
		if out == nil {
			out = maps.Clone(doc)
			if out == nil {
				out = make(map[string]any, len(patch))
			}
		}
		out[k] = nv
	}
	if out == nil {
		return doc
	}
	return out
}

// jsonEqual reports whether two JSON values are equal.
func jsonEqual(a, b any) bool {
	switch a := a.(type) {
	case nil:
		return b == nil
	case bool:
		b, ok := b.(bool)
		return ok && a == b
	case float64:
		b, ok := b.(float64)
		return ok && a == b
	case string:
		b, ok := b.(string)
		return ok && a == b
	case []any:
		b, ok := b.([]any)
		if !ok || len(a) != len(b) {
			return false
		}
		for i := range a {
			if !jsonEqual(a[i], b[i]) {
				return false
			}
		}
		return true
	case map[string]any:
		b, ok := b.(map[string]any)
		if !ok || len(a) != len(b) {
			return false
		}
		for k, av := range a {
			bv, ok := b[k]
			if !ok || !jsonEqual(av, bv) {
				return false
			}
		}
		return true
	default:
		return reflect.DeepEqual(a, b)
	}
}

// Delta computes what a device must change to reach desired: every leaf of
// desired whose value differs from reported, and a null for each tombstone
// (a key removed from desired that the device has not yet acknowledged).
// The result never shares memory with its inputs' mutable parts and is nil
// when there is nothing to do.
func Delta(desired, reported Document, tombstones map[string]int64) Document {
	d := deltaObject(desired, reported)
	if len(tombstones) == 0 {
		return d
	}
	paths := make([]string, 0, len(tombstones))
	for p := range tombstones {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		keys := splitPointer(p)
		if len(keys) == 0 {
			continue
		}
		if d == nil {
			d = map[string]any{}
		}
		m := d
		ok := true
		for _, k := range keys[:len(keys)-1] {
			next, exists := m[k]
			if !exists {
				nm := map[string]any{}
				m[k] = nm
				m = nm
				continue
			}
			nm, isObj := next.(map[string]any)
			if !isObj || next == nil {
				ok = false // desired set a value here since; it wins
				break
			}
			// The delta's objects are its own unless they came from
			// desired whole; copy before writing into one of those.
			nm = maps.Clone(nm)
			m[k] = nm
			m = nm
		}
		last := keys[len(keys)-1]
		if _, exists := m[last]; ok && !exists {
			m[last] = nil
		}
	}
	return d
}

func deltaObject(desired, reported map[string]any) map[string]any {
	var d map[string]any
	for k, dv := range desired {
		rv, had := reported[k]
		if dm, ok := dv.(map[string]any); ok {
			if rm, ok := rv.(map[string]any); ok {
				if sub := deltaObject(dm, rm); sub != nil {
					if d == nil {
						d = map[string]any{}
					}
					d[k] = sub
				}
				continue
			}
		}
		if had && jsonEqual(dv, rv) {
			continue
		}
		if d == nil {
			d = map[string]any{}
		}
		d[k] = dv
	}
	return d
}

// leaves calls fn with the pointer of every leaf under v, which is at path.
func leaves(v any, path string, fn func(string)) {
	m, ok := v.(map[string]any)
	if !ok || len(m) == 0 {
		fn(path)
		return
	}
	for k, e := range m {
		leaves(e, path+"/"+escapePointer(k), fn)
	}
}

// lookup returns the value at a JSON Pointer in doc.
func lookup(doc Document, p string) (any, bool) {
	var v any = doc
	for _, k := range splitPointer(p) {
		m, ok := v.(map[string]any)
		if !ok {
			return nil, false
		}
		if v, ok = m[k]; !ok {
			return nil, false
		}
	}
	return v, true
}

// underOrAt reports whether pointer p is q or below it.
func underOrAt(p, q string) bool {
	return p == q || (strings.HasPrefix(p, q) && p[len(q)] == '/')
}

// DiffPatch returns the smallest merge patch that turns from into to:
// MergePatch(from, DiffPatch(from, to)) equals to. Keys of from that to
// lacks are removed with nulls. It returns an empty patch when the two are
// equal. Neither argument is modified, and the result may share values with
// to.
func DiffPatch(from, to Document) Document {
	out := Document{}
	for k := range from {
		if _, ok := to[k]; !ok {
			out[k] = nil
		}
	}
	for k, tv := range to {
		fv, ok := from[k]
		if !ok {
			out[k] = tv
			continue
		}
		fo, fIsObj := fv.(map[string]any)
		to, tIsObj := tv.(map[string]any)
		if fIsObj && tIsObj {
			if sub := DiffPatch(fo, to); len(sub) > 0 {
				out[k] = sub
			}
			continue
		}
		if !jsonEqual(fv, tv) {
			// A scalar or an array replaces; an object that replaces a
			// scalar merges into nothing, so it arrives whole.
			out[k] = tv
		}
	}
	return out
}
