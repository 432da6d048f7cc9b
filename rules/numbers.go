package rules

import (
	"fmt"
	"strings"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/ast"
	"cel.dev/cel-go/common/operators"
	"cel.dev/cel-go/common/types"
)

// arithmetic maps CEL's arithmetic functions to their operators.
var arithmetic = map[string]string{
	operators.Add: "+", operators.Subtract: "-", operators.Multiply: "*", operators.Divide: "/", operators.Modulo: "%",
}

// numbersHint is added to CEL's bare "no such overload" at run time.
const numbersHint = "numbers in twin documents are doubles, and CEL does not mix them with ints: " +
	"write 1.0 instead of 1 and orValue(0.0) instead of orValue(0), or convert with double() or int()"

// mixedNumbers finds arithmetic that mixes a number from a twin document,
// always a double (JSON numbers are), with an int, which CEL has no
// overload for: `twin.desired.?n.orValue(0) + 1` type-checks, but fails on
// every twin that has n. It says what to write instead.
func mixedNumbers(field string, a *cel.Ast) []Issue {
	native := a.NativeRep()
	isInt := func(e ast.Expr) bool {
		t := native.GetType(e.ID())
		return t != nil && (t.Kind() == types.IntKind || t.Kind() == types.UintKind)
	}
	var issues []Issue
	ast.PostOrderVisit(native.Expr(), ast.NewExprVisitor(func(e ast.Expr) {
		if e.Kind() != ast.CallKind {
			return
		}
		call := e.AsCall()
		op, ok := arithmetic[call.FunctionName()]
		if !ok || len(call.Args()) != 2 {
			return
		}
		args := call.Args()
		var fixes []string
		for i, arg := range args {
			if !fromDocument(arg) {
				continue
			}
			if d, ok := intDefault(arg, isInt); ok {
				fixes = append(fixes, "orValue("+double(d)+") instead of orValue("+literal(d)+")")
			}
			if other := args[1-i]; isInt(other) && !fromDocument(other) {
				if other.Kind() == ast.LiteralKind {
					fixes = append(fixes, double(other)+" instead of "+literal(other))
				} else {
					fixes = append(fixes, "double(...) around the int operand")
				}
			}
		}
		if len(fixes) == 0 {
			return
		}
		loc := native.SourceInfo().GetStartLocation(e.ID())
		issues = append(issues, Issue{Field: field, Line: loc.Line(), Column: loc.Column() + 1,
			Message: fmt.Sprintf("%s mixes a number from the twin, which is a double, with an int; CEL has no such overload, "+
				"so this fails at run time: write %s, or convert the twin's number with int()", op, strings.Join(fixes, " and "))})
	}))
	return issues
}

// fromDocument reports whether e reads a value inside a twin's reported,
// desired or delta document, as twin.reported.temp_c,
// twin.desired.?n.orValue(0) or prev.reported['x'] do.
func fromDocument(e ast.Expr) bool {
	var path []string // from the value up to the root
	for {
		switch e.Kind() {
		case ast.SelectKind:
			sel := e.AsSelect()
			if sel.IsTestOnly() {
				return false
			}
			path = append(path, sel.FieldName())
			e = sel.Operand()
		case ast.CallKind:
			call := e.AsCall()
			switch call.FunctionName() {
			case "orValue", "value":
				if !call.IsMemberFunction() {
					return false
				}
				e = call.Target()
			case operators.OptSelect, operators.Index, operators.OptIndex:
				if len(call.Args()) != 2 {
					return false
				}
				key := "*"
				if k := call.Args()[1]; k.Kind() == ast.LiteralKind {
					if s, ok := k.AsLiteral().Value().(string); ok {
						key = s
					}
				}
				path = append(path, key)
				e = call.Args()[0]
			default:
				return false
			}
		case ast.IdentKind:
			n := len(path)
			if root := e.AsIdent(); (root != "twin" && root != "prev") || n < 2 {
				return false
			}
			switch path[n-1] {
			case "reported", "desired", "delta":
				return true
			}
			return false
		default:
			return false
		}
	}
}

// intDefault returns the int default d of e = <document value>.orValue(d).
func intDefault(e ast.Expr, isInt func(ast.Expr) bool) (ast.Expr, bool) {
	if e.Kind() != ast.CallKind {
		return nil, false
	}
	call := e.AsCall()
	if call.FunctionName() != "orValue" || !call.IsMemberFunction() || len(call.Args()) != 1 || !isInt(call.Args()[0]) {
		return nil, false
	}
	return call.Args()[0], true
}

// literal returns an int literal's source form, or "an int".
func literal(e ast.Expr) string {
	if e.Kind() == ast.LiteralKind {
		return fmt.Sprint(e.AsLiteral().Value())
	}
	return "an int"
}

// double returns the double form of an int literal, or a conversion.
func double(e ast.Expr) string {
	if e.Kind() == ast.LiteralKind {
		return fmt.Sprintf("%v.0", e.AsLiteral().Value())
	}
	return "double(...)"
}
