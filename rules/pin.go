package rules

import (
	"slices"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/ast"
	"cel.dev/cel-go/common/operators"
	"cel.dev/cel-go/common/types"

	"github.com/twind-io/twind/twin"
)

// FilterPin returns what a checked filter over `twin` pins of a twin's type
// and labels: a necessary condition of the filter that the engine's index
// can answer. It reads the terms of the filter's top-level conjunction
// (`&&`) of the forms
//
//	twin.type == "fridge"           (either side; twin["type"] too)
//	twin.type in ["fridge", "car"]
//	twin.labels.site == "berlin"    (twin.labels["site"] too)
//	twin.labels.site in ["berlin", "paris"]
//
// and ignores every other term; anything under `||`, `!` or a function
// pins nothing. Two terms on the same field pin the values both allow; if
// none is left, the Pin's None is set. A filter that pins nothing gives the
// zero Pin.
func FilterPin(a *cel.Ast) twin.Pin {
	if a == nil {
		return twin.Pin{}
	}
	var b pinBuilder
	b.conjunction(a.NativeRep().Expr())
	return b.pin
}

type pinBuilder struct {
	pin twin.Pin
}

// conjunction reads e, a term of the top-level conjunction.
func (b *pinBuilder) conjunction(e ast.Expr) {
	if e.Kind() != ast.CallKind {
		return
	}
	c := e.AsCall()
	args := c.Args()
	switch c.FunctionName() {
	case operators.LogicalAnd:
		for _, a := range args {
			b.conjunction(a)
		}
	case operators.Equals:
		if len(args) != 2 {
			return
		}
		for _, lr := range [][2]ast.Expr{{args[0], args[1]}, {args[1], args[0]}} {
			label, isType, ok := pinnedField(lr[0])
			v, isString := stringLiteral(lr[1])
			if ok && isString {
				b.add(label, isType, []string{v})
				return
			}
		}
	case operators.In:
		if len(args) != 2 || args[1].Kind() != ast.ListKind {
			return
		}
		label, isType, ok := pinnedField(args[0])
		if !ok {
			return
		}
		l := args[1].AsList()
		if len(l.OptionalIndices()) > 0 {
			return
		}
		var vals []string
		for _, el := range l.Elements() {
			v, ok := stringLiteral(el)
			if !ok {
				return
			}
			vals = append(vals, v)
		}
		b.add(label, isType, vals)
	}
}

// add pins the type (isType) or a label to one of vals.
func (b *pinBuilder) add(label string, isType bool, vals []string) {
	vals = slices.Clone(vals)
	slices.Sort(vals)
	vals = slices.Compact(vals)
	p := &b.pin
	if isType {
		if p.Types != nil {
			vals = intersect(p.Types, vals)
		}
		p.Types = vals
	} else {
		if p.Labels == nil {
			p.Labels = map[string][]string{}
		}
		if have, ok := p.Labels[label]; ok {
			vals = intersect(have, vals)
		}
		p.Labels[label] = vals
	}
	if len(vals) == 0 {
		p.None = true
	}
}

// intersect returns the strings of sorted a that sorted b holds, never nil.
func intersect(a, b []string) []string {
	out := []string{}
	for _, v := range a {
		if _, ok := slices.BinarySearch(b, v); ok {
			out = append(out, v)
		}
	}
	return out
}

// pinnedField reports whether e reads the twin's type (isType) or one of
// its labels (label).
func pinnedField(e ast.Expr) (label string, isType, ok bool) {
	operand, field, ok := fieldOf(e)
	if !ok {
		return "", false, false
	}
	if isTwin(operand) {
		return "", field == "type", field == "type"
	}
	if inner, f, ok := fieldOf(operand); ok && f == "labels" && isTwin(inner) {
		return field, false, true
	}
	return "", false, false
}

// fieldOf splits e, if it is x.f or x["f"], into x and f.
func fieldOf(e ast.Expr) (ast.Expr, string, bool) {
	switch e.Kind() {
	case ast.SelectKind:
		s := e.AsSelect()
		if s.IsTestOnly() {
			return nil, "", false
		}
		return s.Operand(), s.FieldName(), true
	case ast.CallKind:
		c := e.AsCall()
		if c.FunctionName() != operators.Index || len(c.Args()) != 2 {
			return nil, "", false
		}
		f, ok := stringLiteral(c.Args()[1])
		return c.Args()[0], f, ok
	}
	return nil, "", false
}

func isTwin(e ast.Expr) bool { return e.Kind() == ast.IdentKind && e.AsIdent() == "twin" }

func stringLiteral(e ast.Expr) (string, bool) {
	if e.Kind() != ast.LiteralKind {
		return "", false
	}
	s, ok := e.AsLiteral().(types.String)
	return string(s), ok
}
