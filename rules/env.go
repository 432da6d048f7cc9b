// Package rules holds twind's CEL environment: the variables and functions
// that filters and rules see, how expressions are compiled and bounded, and
// how a twin is presented to them.
//
// One environment is built once and shared; compiled programs are safe for
// concurrent use, so every shard evaluates the same programs. Expressions
// see `twin` (the state after a change), `prev` (the state before it) and
// `now`. A twin is a map with the keys id, type, labels, reported, desired,
// delta, version, revision, desired_acked_version, presence (connected,
// since, last_seen),
// create_time and update_time; reading a field the twin does not have makes
// the expression false rather than an error. `changed` lists the leaves the
// change set, as "reported.temp_c" or "desired.pump".
package rules

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/ext"

	"github.com/twind-io/twind/twin"
)

// ErrInvalid is wrapped by every error about a bad expression.
var ErrInvalid = errors.New("rules: invalid expression")

// Limits on user-written expressions.
const (
	// MaxExpressionBytes bounds the source of one expression.
	MaxExpressionBytes = 4 << 10
	// maxRecursion bounds how deeply an expression nests.
	maxRecursion = 32
	// FilterCostLimit bounds the runtime cost of one filter evaluation.
	FilterCostLimit = 100_000
)

var (
	envOnce sync.Once
	envVal  *cel.Env
	envErr  error
)

// Env returns the shared CEL environment.
func Env() (*cel.Env, error) {
	envOnce.Do(func() {
		envVal, envErr = cel.NewEnv(
			cel.Variable("twin", cel.MapType(cel.StringType, cel.DynType)),
			cel.Variable("prev", cel.MapType(cel.StringType, cel.DynType)),
			cel.Variable("now", cel.TimestampType),
			cel.Variable("changed", cel.ListType(cel.StringType)),
			cel.OptionalTypes(),
			ext.Strings(),
			ext.Math(),
			ext.Lists(),
			ext.Sets(),
			ext.Encoders(),
			cel.ParserExpressionSizeLimit(MaxExpressionBytes),
			cel.ParserRecursionLimit(maxRecursion),
			cel.CrossTypeNumericComparisons(true),
		)
	})
	return envVal, envErr
}

// compile parses and type-checks an expression whose result must have type
// want.
func compile(expr string, want *cel.Type) (*cel.Ast, error) {
	if len(expr) > MaxExpressionBytes {
		return nil, fmt.Errorf("%w: expression is %d bytes, at most %d", ErrInvalid, len(expr), MaxExpressionBytes)
	}
	env, err := Env()
	if err != nil {
		return nil, err
	}
	ast, iss := env.Compile(expr)
	if iss.Err() != nil {
		return nil, fmt.Errorf("%w: %s", ErrInvalid, strings.TrimSpace(iss.Err().Error()))
	}
	if t := ast.OutputType(); !t.IsAssignableType(want) && t != cel.DynType {
		return nil, fmt.Errorf("%w: expression has type %s; want %s", ErrInvalid, t, want)
	}
	return ast, nil
}

// Filter is a compiled boolean expression over `twin`. It is safe for
// concurrent use.
type Filter struct {
	src string
	prg cel.Program
}

// CompileFilter compiles a filter. An empty expression matches every twin.
func CompileFilter(expr string) (*Filter, error) {
	if strings.TrimSpace(expr) == "" {
		return &Filter{}, nil
	}
	ast, err := compile(expr, cel.BoolType)
	if err != nil {
		return nil, err
	}
	env, _ := Env()
	prg, err := env.Program(ast,
		cel.EvalOptions(cel.OptOptimize),
		cel.CostLimit(FilterCostLimit),
	)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return &Filter{src: expr, prg: prg}, nil
}

// String returns the filter's source.
func (f *Filter) String() string { return f.src }

// Match reports whether the filter holds for t. An expression that fails on
// t, for example by reading a field t does not have, does not match.
func (f *Filter) Match(t *twin.Twin, now time.Time) bool {
	if f.prg == nil {
		return true
	}
	out, _, err := f.prg.Eval(map[string]any{"twin": Value(t), "prev": emptyTwin, "now": now})
	if err != nil {
		return false
	}
	b, ok := out.Value().(bool)
	return ok && b
}

var emptyTwin = map[string]any{
	"id": "", "type": "", "labels": map[string]string{}, "reported": map[string]any{},
	"desired": map[string]any{}, "delta": map[string]any{}, "version": int64(0), "desired_acked_version": int64(0),
	"revision": int64(0), "presence": map[string]any{"connected": false},
}

// Value presents a twin to CEL: a map of its fields. The result shares the
// twin's documents, which CEL never modifies.
func Value(t *twin.Twin) map[string]any {
	if t == nil {
		return emptyTwin
	}
	delta := t.Delta
	if delta == nil {
		delta = map[string]any{}
	}
	labels := t.Labels
	if labels == nil {
		labels = map[string]string{}
	}
	presence := map[string]any{"connected": t.Presence.Connected}
	if !t.Presence.Since.IsZero() {
		presence["since"] = t.Presence.Since
	}
	if !t.Presence.LastSeen.IsZero() {
		presence["last_seen"] = t.Presence.LastSeen
	}
	return map[string]any{
		"id":       t.ID,
		"type":     t.Type,
		"labels":   labels,
		"reported": map[string]any(t.Reported),
		"desired":  map[string]any(t.Desired),
		"delta":    delta,
		"version":  t.Version,
		"revision": t.Revision,

		"desired_acked_version": t.DesiredAckedVersion,
		"presence":              presence,
		"create_time":           t.CreateTime,
		"update_time":           t.UpdateTime,
	}
}
