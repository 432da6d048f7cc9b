package rules

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"time"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/ast"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/common/types/ref"
	"cel.dev/cel-go/interpreter"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/twind-io/twind/twin"
)

// Trigger says when a rule whose condition holds fires.
type Trigger int

// Triggers. The numbers match the API's.
const (
	// Rising fires when the condition goes from false to true.
	Rising Trigger = 1
	// WhileTrue fires on every change while the condition holds.
	WhileTrue Trigger = 2
)

// Severities of emitted events. The numbers match the API's.
const (
	SeverityInfo     = 1
	SeverityWarning  = 2
	SeverityCritical = 3
)

// Definition is a rule as users write it and as it is stored.
type Definition struct {
	ID          string        `json:"id"`
	Description string        `json:"description,omitempty"`
	Types       []string      `json:"types,omitempty"`
	Condition   string        `json:"condition"`
	Trigger     Trigger       `json:"trigger,omitempty"`
	HoldFor     time.Duration `json:"hold_for,omitempty"`
	Cooldown    time.Duration `json:"cooldown,omitempty"`
	Actions     []Action      `json:"actions,omitempty"`
	Enabled     bool          `json:"enabled"`
	// Gen changes whenever what decides a firing (condition, trigger,
	// hold_for, types) changes; twins' states of another generation are
	// reset.
	Gen        int64     `json:"gen"`
	CreateTime time.Time `json:"create_time"`
	UpdateTime time.Time `json:"update_time"`
	// Status is the rule's status as last stored, so that its counts
	// survive restarts. Compile ignores it.
	Status *StatusSnapshot `json:"status,omitempty"`
}

// Action is one effect of a firing; exactly one field is set.
type Action struct {
	Command    *CommandAction    `json:"command,omitempty"`
	SetDesired *SetDesiredAction `json:"set_desired,omitempty"`
	Emit       *EmitAction       `json:"emit,omitempty"`
}

// CommandAction sends a command to the twin's device.
type CommandAction struct {
	Name string `json:"name"`
	// Params is a CEL expression evaluating to a map; empty for none.
	Params string `json:"params,omitempty"`
}

// SetDesiredAction merges a patch into the twin's desired state.
type SetDesiredAction struct {
	// Patch is a CEL expression evaluating to a map.
	Patch string `json:"patch"`
}

// EmitAction emits an event.
type EmitAction struct {
	Severity int `json:"severity,omitempty"`
	// Message is a CEL expression evaluating to a string.
	Message string `json:"message"`
}

// Issue is one problem with a rule.
type Issue struct {
	Field   string
	Message string
	Line    int // 1-based; 0 if not about a position
	Column  int // 1-based; 0 if not about a position
}

func (i Issue) String() string {
	if i.Line > 0 {
		return fmt.Sprintf("%s:%d:%d: %s", i.Field, i.Line, i.Column, i.Message)
	}
	return fmt.Sprintf("%s: %s", i.Field, i.Message)
}

// IssuesError lists everything wrong with a rule. It wraps ErrInvalid.
type IssuesError []Issue

func (e IssuesError) Error() string {
	var b strings.Builder
	b.WriteString("rules: invalid rule: ")
	for i, is := range e {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(is.String())
	}
	return b.String()
}

// Unwrap makes errors.Is(err, ErrInvalid) hold.
func (e IssuesError) Unwrap() error { return ErrInvalid }

const (
	// RuleCostLimit bounds the cost of one evaluation of one expression of
	// a rule, at run time, and the worst-case cost CEL may estimate for it
	// when the rule is created.
	RuleCostLimit = 1_000_000
	maxActions    = 16
	maxTypes      = 32
)

var (
	ruleIDPattern = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)
	typeName      = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)
	commandName   = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)
)

// Compiled is a rule ready to evaluate. It is immutable and safe for
// concurrent use.
type Compiled struct {
	Def          Definition
	CostEstimate uint64 // worst-case static cost of the condition
	// Problems lists what a new rule would be refused for (a cost estimate
	// over RuleCostLimit, arithmetic that mixes twin numbers with ints) in
	// a stored rule that was loaded anyway; nil otherwise.
	Problems error

	cond        *program
	actions     []compiledAction
	usesNow     bool
	usesChanged bool
	status      *Status
}

type compiledAction struct {
	kind     string // "command", "set_desired" or "emit"
	name     string
	severity int
	prg      *program // nil for a command without params
}

// Compile checks a rule and compiles its expressions, for twins within
// twin's default document limits. Every problem is reported at once, as an
// IssuesError.
func Compile(def Definition) (*Compiled, error) {
	return CompileWithLimits(def, twin.Limits{})
}

// CompileWithLimits is Compile for twins whose documents are bounded by
// limits (zero fields mean twin's defaults). An expression whose worst-case
// cost on such twins, as CEL estimates it, exceeds RuleCostLimit is refused,
// as is arithmetic that mixes a number from a twin's documents (a double)
// with an int, which CEL cannot evaluate; the issue says what to write
// instead. An expression CEL cannot bound is accepted and runs under
// RuleCostLimit.
func CompileWithLimits(def Definition, limits twin.Limits) (*Compiled, error) {
	return compileRule(def, newSizeHints(limits), true)
}

// compileRule compiles a rule. strict refuses what earlier versions
// accepted: expressions whose bounded cost estimate exceeds RuleCostLimit
// and arithmetic that mixes twin numbers with ints. A stored rule is loaded
// without it, to keep running what was accepted before.
func compileRule(def Definition, hints sizeHints, strict bool) (*Compiled, error) {
	var issues []Issue
	add := func(field, format string, args ...any) {
		issues = append(issues, Issue{Field: field, Message: fmt.Sprintf(format, args...)})
	}
	if !ruleIDPattern.MatchString(def.ID) {
		add("id", "must be 1 to 128 characters of [A-Za-z0-9._:-]")
	}
	if len(def.Description) > 1024 {
		add("description", "is %d bytes, at most 1024", len(def.Description))
	}
	if len(def.Types) > maxTypes {
		add("types", "has %d types, at most %d", len(def.Types), maxTypes)
	}
	for i, t := range def.Types {
		if !typeName.MatchString(t) {
			add(fmt.Sprintf("types[%d]", i), "%.40q is not a device type: 1 to 64 characters of [A-Za-z0-9._-]", t)
		}
	}
	if def.Trigger == 0 {
		def.Trigger = Rising
	}
	if def.Trigger != Rising && def.Trigger != WhileTrue {
		add("trigger", "must be TRIGGER_RISING or TRIGGER_WHILE_TRUE")
	}
	if def.HoldFor < 0 || def.HoldFor > 30*24*time.Hour {
		add("hold_for", "must be between 0 and 30 days")
	}
	if def.Cooldown < 0 || def.Cooldown > 30*24*time.Hour {
		add("cooldown", "must be between 0 and 30 days")
	}
	if len(def.Actions) > maxActions {
		add("actions", "has %d actions, at most %d", len(def.Actions), maxActions)
	}
	c := &Compiled{Def: def, status: &Status{}}
	// late lists the problems strict refuses.
	var late []Issue
	cond, prgIssues := compileProgram("condition", def.Condition, cel.BoolType, hints)
	issues = append(issues, prgIssues...)
	c.cond, c.CostEstimate, c.usesNow, c.usesChanged = &cond, cond.estimate, cond.usesNow, cond.usesChanged
	late = append(late, cond.late...)
	for i, a := range def.Actions {
		field := fmt.Sprintf("actions[%d]", i)
		var ca compiledAction
		var src string
		var want *cel.Type
		n := 0
		if a.Command != nil {
			n++
			ca.kind, ca.name = "command", a.Command.Name
			src, want, field = a.Command.Params, cel.MapType(cel.StringType, cel.DynType), field+".command.params"
			if !commandName.MatchString(a.Command.Name) {
				add(strings.TrimSuffix(field, ".params")+".name", "must be 1 to 128 characters of [A-Za-z0-9._:-]")
			}
		}
		if a.SetDesired != nil {
			n++
			ca.kind, src, want, field = "set_desired", a.SetDesired.Patch, cel.MapType(cel.StringType, cel.DynType), field+".set_desired.patch"
			if strings.TrimSpace(src) == "" {
				add(field, "is required: a CEL map expression such as {\"pump\": \"on\"}")
			}
		}
		if a.Emit != nil {
			n++
			ca.kind, ca.severity, src, want, field = "emit", a.Emit.Severity, a.Emit.Message, cel.StringType, field+".emit.message"
			if ca.severity == 0 {
				ca.severity = SeverityInfo
			}
			if ca.severity < SeverityInfo || ca.severity > SeverityCritical {
				add(strings.TrimSuffix(field, ".message")+".severity", "must be INFO, WARNING or CRITICAL")
			}
			if strings.TrimSpace(src) == "" {
				add(field, "is required: a CEL string expression")
			}
		}
		if n != 1 {
			add(field, "must set exactly one of command, set_desired and emit")
			continue
		}
		if strings.TrimSpace(src) != "" {
			p, prgIssues := compileProgram(field, src, want, hints)
			issues = append(issues, prgIssues...)
			ca.prg = &p
			c.usesNow = c.usesNow || p.usesNow
			c.usesChanged = c.usesChanged || p.usesChanged
			late = append(late, p.late...)
		}
		c.actions = append(c.actions, ca)
	}
	if strict {
		issues = append(issues, late...)
	}
	if len(issues) > 0 {
		return nil, IssuesError(issues)
	}
	if len(late) > 0 {
		c.Problems = IssuesError(late)
	}
	c.Def.Trigger = def.Trigger
	return c, nil
}

// untrackedCost is the cost estimate up to which an expression runs
// without a runtime limit, and without tracking the cost it spends, which
// costs more than the expression: it is counted at its estimate. An
// expression that loops over twin data, or calls a function on a string
// from it, is always above.
const untrackedCost = 1_000

// program is a compiled expression of a rule.
type program struct {
	prg cel.Program
	// estimate is CEL's worst-case cost of one evaluation on twins within
	// the document limits; unbounded if CEL cannot bound it.
	estimate uint64
	// tracked says the program runs under RuleCostLimit, tracking what
	// each evaluation spends; one that is not costs its estimate.
	tracked     bool
	usesNow     bool
	usesChanged bool
	// late lists the problems that only new rules are refused for.
	late []Issue
}

// compileProgram compiles one expression of a rule.
func compileProgram(field, src string, want *cel.Type, hints sizeHints) (p program, issues []Issue) {
	if strings.TrimSpace(src) == "" {
		return p, []Issue{{Field: field, Message: "is required"}}
	}
	if len(src) > MaxExpressionBytes {
		return p, []Issue{{Field: field, Message: fmt.Sprintf("is %d bytes, at most %d", len(src), MaxExpressionBytes)}}
	}
	env, err := Env()
	if err != nil {
		return p, []Issue{{Field: field, Message: err.Error()}}
	}
	a, iss := env.Compile(src)
	if iss.Err() != nil {
		for _, e := range iss.Errors() {
			issues = append(issues, Issue{Field: field, Message: e.Message, Line: e.Location.Line(), Column: e.Location.Column() + 1})
		}
		return p, issues
	}
	if t := a.OutputType(); !t.IsAssignableType(want) && t != cel.DynType && !(t.Kind() == types.MapKind && want.Kind() == types.MapKind) {
		return p, []Issue{{Field: field, Message: fmt.Sprintf("has type %s; want %s", t, want)}}
	}
	p.late = mixedNumbers(field, a)
	est, err := estimateCost(env, a, hints)
	if err != nil {
		return p, []Issue{{Field: field, Message: "cost: " + err.Error()}}
	}
	p.estimate = est
	if est > RuleCostLimit && est != unbounded {
		p.late = append(p.late, Issue{Field: field, Message: costMessage(est, hints)})
	}
	// A program runs under the runtime limit, which also tracks the cost
	// each evaluation spends, unless its worst case is small.
	opts := []cel.ProgramOption{cel.EvalOptions(cel.OptOptimize)}
	if p.tracked = est > untrackedCost; p.tracked {
		opts = append(opts, cel.CostLimit(RuleCostLimit))
	}
	prg, err := env.Program(a, opts...)
	if err != nil {
		return p, []Issue{{Field: field, Message: err.Error()}}
	}
	p.prg, p.usesNow, p.usesChanged = prg, references(a, "now"), references(a, "changed")
	if a.OutputType() == cel.DynType {
		// The twin's fields are dynamic, so the checker cannot always tell
		// an expression's type. Evaluating it on an empty twin catches
		// those that read a field every twin has, like `twin.version`.
		if out, _, err := prg.Eval(probeActivation); err == nil {
			if got := out.Type().TypeName(); (want == cel.BoolType && got != "bool") ||
				(want == cel.StringType && got != "string") ||
				(want.Kind() == types.MapKind && got != "map") {
				return p, []Issue{{Field: field, Message: fmt.Sprintf("evaluates to %s; want %s", got, want)}}
			}
		}
	}
	return p, nil
}

var probeActivation = &activation{
	twin: Value(&twin.Twin{Reported: twin.Document{}, Desired: twin.Document{}}),
	prev: Value(nil),
	now:  time.Unix(0, 0).UTC(),
}

// references reports whether an expression reads a variable.
func references(a *cel.Ast, name string) bool {
	found := false
	ast.PostOrderVisit(a.NativeRep().Expr(), ast.NewExprVisitor(func(e ast.Expr) {
		if e.Kind() == ast.IdentKind && e.AsIdent() == name {
			found = true
		}
	}))
	return found
}

// Status counts how a rule is doing. It is shared by every compiled version
// of a rule and safe for concurrent use.
type Status struct {
	mu            sync.Mutex
	fires         int64
	lastFire      time.Time
	errs          int64
	lastErr       string
	lastErrorTime time.Time
}

// StatusSnapshot is a copy of a Status.
type StatusSnapshot struct {
	Fires         int64     `json:"fires,omitempty"`
	LastFire      time.Time `json:"last_fire,omitzero"`
	Errors        int64     `json:"errors,omitempty"`
	LastError     string    `json:"last_error,omitempty"`
	LastErrorTime time.Time `json:"last_error_time,omitzero"`
}

func statusFrom(s *StatusSnapshot) *Status {
	if s == nil {
		return &Status{}
	}
	return &Status{fires: s.Fires, lastFire: s.LastFire, errs: s.Errors, lastErr: s.LastError, lastErrorTime: s.LastErrorTime}
}

func (s *Status) fired(now time.Time) {
	s.mu.Lock()
	s.fires++
	s.lastFire = now
	s.mu.Unlock()
}

func (s *Status) failed(err error, now time.Time) {
	s.mu.Lock()
	s.errs++
	s.lastErr = err.Error()
	s.lastErrorTime = now
	s.mu.Unlock()
}

// Snapshot returns the current counts.
func (s *Status) Snapshot() StatusSnapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return StatusSnapshot{s.fires, s.lastFire, s.errs, s.lastErr, s.lastErrorTime}
}

// activation presents a change to CEL. The twin maps are built once per
// change, however many rules read them; `changed` only if a rule reads it.
type activation struct {
	twin     map[string]any
	prev     map[string]any // built from prevTwin when first read
	prevTwin *twin.Twin
	next     *twin.Twin
	now      time.Time
	changed  []string
	cost     uint64 // CEL cost spent on the change so far
}

// eval evaluates a program on the change, adding the cost it spent.
func (a *activation) eval(p *program) (ref.Val, error) {
	out, det, err := p.prg.Eval(a)
	if !p.tracked {
		a.cost += p.estimate
	} else if c := det.ActualCost(); c != nil {
		a.cost += *c
	}
	if err != nil {
		if strings.Contains(err.Error(), "no such overload") {
			err = fmt.Errorf("%w; if this is arithmetic on a twin's number: %s", err, numbersHint)
		}
		return nil, err
	}
	return out, nil
}

func (a *activation) ResolveName(name string) (any, bool) {
	switch name {
	case "twin":
		return a.twin, true
	case "prev":
		if a.prev == nil {
			a.prev = Value(a.prevTwin)
		}
		return a.prev, true
	case "now":
		return a.now, true
	case "changed":
		if a.changed == nil {
			a.changed = changedPaths(a.next)
		}
		return a.changed, true
	}
	return nil, false
}

func (a *activation) Parent() interpreter.Activation { return nil }

// changedPaths lists the leaves the twin's last change set, as
// "reported.location.lat" and "desired.pump".
func changedPaths(t *twin.Twin) []string {
	out := []string{}
	if t == nil {
		return out
	}
	for _, side := range []struct {
		name string
		meta map[string]twin.FieldMeta
	}{{"reported", t.ReportedMeta}, {"desired", t.DesiredMeta}} {
		for p, m := range side.meta {
			if m.Version == t.Version {
				out = append(out, side.name+strings.ReplaceAll(strings.ReplaceAll(strings.ReplaceAll(p, "/", "."), "~1", "/"), "~0", "~"))
			}
		}
	}
	return out
}

// missingField reports whether an evaluation error only means the twin
// lacks a field the expression reads: the condition is then false.
func missingField(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "no such key") || strings.Contains(msg, "no such attribute")
}

// evalMap evaluates an expression to a document.
func evalMap(p *program, act *activation) (twin.Document, error) {
	out, err := act.eval(p)
	if err != nil {
		return nil, err
	}
	return toDocument(out)
}

func toDocument(v ref.Val) (twin.Document, error) {
	native, err := v.ConvertToNative(reflect.TypeFor[*structpb.Struct]())
	if err != nil {
		return nil, fmt.Errorf("result is not a JSON object: %v", err)
	}
	s, ok := native.(*structpb.Struct)
	if !ok {
		return nil, errors.New("result is not a JSON object")
	}
	return s.AsMap(), nil
}
