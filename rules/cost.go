package rules

import (
	"fmt"
	"math"
	"strconv"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/cost"

	"github.com/twind-io/twind/twin"
)

// unbounded is the estimate of an expression whose cost CEL cannot bound,
// such as one that converts a value of unknown size to a string.
const unbounded = math.MaxUint64

// estimateCost returns CEL's worst-case cost of one evaluation of an
// expression on twins within the limits h describes, or unbounded.
func estimateCost(env *cel.Env, a *cel.Ast, h sizeHints) (uint64, error) {
	est, err := env.EstimateCost(a, h)
	if err != nil || est.Max != unbounded {
		return est.Max, err
	}
	// CEL's arithmetic saturates: tell a cost too large to count, as
	// nested loops over twin data make, from one that CEL cannot bound,
	// by estimating again with every hinted size 1.
	small, err := env.EstimateCost(a, sizeHints{docBytes: 1, entries: 1, depth: h.depth, keyBytes: 1})
	if err != nil || small.Max == unbounded {
		return unbounded, err
	}
	return unbounded - 1, nil
}

// costMessage explains a refused estimate.
func costMessage(est uint64, h sizeHints) string {
	n := "more than " + thousands(unbounded-1)
	if est < unbounded-1 {
		n = thousands(est)
	}
	return fmt.Sprintf("may cost %s per evaluation on a twin at the document limits (%d-byte documents, depth %d, %d-byte keys), "+
		"over the limit of %s: a comprehension runs its body once per element, for twin data once per value a document may hold, "+
		"and nested ones multiply; loop over fewer values, read the values you need by name, and do not nest loops or matches() in loops",
		n, h.docBytes, h.depth, h.keyBytes, thousands(RuleCostLimit))
}

// thousands formats n with thousands separators.
func thousands(n uint64) string {
	s := strconv.FormatUint(n, 10)
	out := make([]byte, 0, len(s)+len(s)/3)
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	return string(out)
}

// sizeHints bounds the sizes of what an expression reads, from the document
// limits, so that CEL can bound the cost of an expression over twin data: a
// comprehension over twin.reported runs at most once per key a document
// within the limits can hold. The bounds are per value, so an expression
// that nests loops over twin data multiplies them; its real cost is lower
// (a document's values share its byte limit), which is why evaluations also
// run under a runtime cost limit.
type sizeHints struct {
	docBytes uint64 // longest string, and bound of every value inside a document
	entries  uint64 // most keys a document's top-level object holds
	depth    int    // deepest nesting of objects and arrays
	keyBytes uint64 // longest key
}

func newSizeHints(l twin.Limits) sizeHints {
	l.EnsureDefaults()
	b := uint64(l.MaxDocumentBytes)
	// The shortest member of an object is `"k":0,`: 6 bytes.
	return sizeHints{docBytes: b, entries: b/6 + 1, depth: l.MaxDepth, keyBytes: uint64(l.MaxKeyBytes)}
}

// Bounds of the twin's own fields (see twin's validation).
const (
	twinFields     = 12 // keys of the map Value returns
	twinFieldBytes = 21 // len("desired_acked_version")
	idBytes        = 128
	typeBytes      = 64
	maxLabels      = 64
	labelKeyBytes  = 63
	labelValBytes  = 256
	presenceFields = 3
)

func sizeRange(max uint64) *cost.SizeEstimate {
	s := cost.RangedSizeEstimate(0, max)
	return &s
}

// EstimateSize implements cost.Estimator. It returns nil for what it knows
// nothing about, which CEL then treats as unbounded.
func (h sizeHints) EstimateSize(n cost.AstNode) *cost.SizeEstimate {
	p := n.Path()
	if len(p) == 0 {
		return nil
	}
	switch p[0] {
	case "twin", "prev":
		return h.twinSize(p[1:])
	case "changed":
		switch {
		case len(p) == 1:
			return sizeRange(2 * h.entries) // leaves of reported and desired
		case len(p) == 2 && (p[1] == "@items" || p[1] == "@keys"):
			return sizeRange(min(h.docBytes, uint64(len("reported."))+uint64(h.depth)*(h.keyBytes+1)))
		}
	}
	return nil
}

// twinSize bounds a value under `twin` or `prev`, given its path below it.
func (h sizeHints) twinSize(p []string) *cost.SizeEstimate {
	if len(p) == 0 {
		return sizeRange(twinFields)
	}
	switch p[0] {
	case "@keys":
		if len(p) == 1 {
			return sizeRange(twinFieldBytes)
		}
		return nil
	case "@values", "@items":
		// Any of the fields: as large as a document.
		return h.docSize(p[1:], 1)
	case "id":
		return leaf(p, idBytes)
	case "type":
		return leaf(p, typeBytes)
	case "labels":
		switch {
		case len(p) == 1:
			return sizeRange(maxLabels)
		case len(p) == 2 && p[1] == "@keys":
			return sizeRange(labelKeyBytes)
		case len(p) == 2:
			return sizeRange(labelValBytes)
		}
		return nil
	case "reported", "desired", "delta":
		return h.docSize(p[1:], 1)
	case "presence":
		switch {
		case len(p) == 1:
			return sizeRange(presenceFields)
		case len(p) == 2 && p[1] == "@keys":
			return sizeRange(uint64(len("last_seen")))
		}
		return nil
	}
	return nil
}

func leaf(p []string, max uint64) *cost.SizeEstimate {
	if len(p) != 1 {
		return nil
	}
	return sizeRange(max)
}

// docSize bounds a value inside a document: p is its path below a value
// at nesting level `level` (the document itself is at level 1).
func (h sizeHints) docSize(p []string, level int) *cost.SizeEstimate {
	if len(p) == 0 {
		if level == 1 {
			return sizeRange(h.entries)
		}
		// A string, an array or an object: none is longer than the
		// document.
		return sizeRange(h.docBytes)
	}
	if level > h.depth {
		return nil // a scalar: nothing is inside it
	}
	if level == 1 {
		// The document is an object: its keys are strings, and it has no
		// elements.
		switch p[0] {
		case "@keys":
			if len(p) == 1 {
				return sizeRange(h.keyBytes)
			}
			return nil
		case "@items":
			return nil
		}
	}
	// A field, an element, a key (CEL iterates over a value of unknown
	// type by "@keys", whether it is an object or an array) or a value.
	return h.docSize(p[1:], level+1)
}

// EstimateCallCost implements cost.Estimator: CEL's own estimates of
// functions apply.
func (sizeHints) EstimateCallCost(string, string, *cost.AstNode, []cost.AstNode) *cost.CallEstimate {
	return nil
}
