package rules_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twind-io/twind/rules"
	"github.com/twind-io/twind/twin"
)

func mustCompile(t *testing.T, def rules.Definition) *rules.Compiled {
	t.Helper()
	def.Enabled = def.Enabled || !strings.HasPrefix(def.ID, "off")
	c, err := rules.Compile(def)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestEvaluateDropsVoidStates checks that a twin's states for rules that
// are gone, changed or no longer watch its type are deleted the next time
// the twin is evaluated, so that they do not pile up.
func TestEvaluateDropsVoidStates(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	set := rules.NewSet([]*rules.Compiled{
		mustCompile(t, rules.Definition{ID: "changed", Gen: 2, Types: []string{"fridge"}, Condition: "twin.reported.temp_c > 20.0"}),
		mustCompile(t, rules.Definition{ID: "retyped", Gen: 2, Types: []string{"car"}, Condition: "true"}),
		mustCompile(t, rules.Definition{ID: "cars", Gen: 1, Types: []string{"car"}, Condition: "true"}),
		mustCompile(t, rules.Definition{ID: "warm", Gen: 1, Types: []string{"fridge"}, Condition: "twin.reported.temp_c > 8.0"}),
		mustCompile(t, rules.Definition{ID: "cold", Gen: 1, Types: []string{"fridge"}, Condition: "twin.reported.temp_c < 0.0"}),
		mustCompile(t, rules.Definition{ID: "off", Gen: 1, Types: []string{"fridge"}, Condition: "true"}),
	})
	fired := now.Add(-time.Hour)
	states := map[string]twin.RuleState{
		"deleted": {Gen: 1, Active: true, Fired: true, LastFired: fired}, // the rule is gone
		"changed": {Gen: 1, Active: true, Fired: true, LastFired: fired}, // gen 2 now, and false
		"retyped": {Gen: 1, Active: true, Fired: true, LastFired: fired}, // watches cars now
		"cars":    {Gen: 1, Active: true, Fired: true, LastFired: fired}, // the twin was a car
		"warm":    {Gen: 1, Active: true, Fired: true, LastFired: fired}, // still holds: unchanged
		"cold":    {Gen: 1, LastFired: fired},                            // false, remembers its cooldown
		"off":     {Gen: 1, Active: true, Fired: true, LastFired: fired}, // disabled: kept for when it is on
	}
	fridge := &twin.Twin{ID: "f-1", Type: "fridge", Version: 2, Reported: twin.Document{"temp_c": 9.0}, Desired: twin.Document{}}
	res := set.Evaluate(fridge, fridge, states, now, false)
	var got []string
	for _, id := range []string{"deleted", "changed", "retyped", "cars", "warm", "cold", "off"} {
		st, ok := res.States[id]
		switch {
		case !ok:
			got = append(got, id+" kept")
		case st == nil:
			got = append(got, id+" deleted")
		default:
			got = append(got, fmt.Sprintf("%s set %+v", id, *st))
		}
	}
	want := []string{"deleted deleted", "changed deleted", "retyped deleted", "cars deleted", "warm kept", "cold kept", "off kept"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Evaluate states:\n got %q\nwant %q", got, want)
	}
	if len(res.Firings) != 0 {
		t.Errorf("Evaluate fired %v; want nothing", res.Firings)
	}
}

// TestEvaluateCost checks that an evaluation reports the CEL cost it
// spent, conditions and actions, and that a rule cut off by the runtime
// limit counts as having spent it.
func TestEvaluateCost(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	items := make([]any, 1000)
	for i := range items {
		items[i] = float64(i)
	}
	small := &twin.Twin{ID: "f-1", Type: "fridge", Reported: twin.Document{"temp_c": 9.0, "items": []any{1.0}}, Desired: twin.Document{}}
	big := &twin.Twin{ID: "f-1", Type: "fridge", Reported: twin.Document{"temp_c": 9.0, "items": items}, Desired: twin.Document{}}
	nested := make([]any, 200)
	for i := range nested {
		nested[i] = items[:200]
	}
	huge := &twin.Twin{ID: "f-1", Type: "fridge", Reported: twin.Document{"temp_c": 9.0, "items": nested}, Desired: twin.Document{}}
	cases := []struct {
		name     string
		def      rules.Definition
		tw       *twin.Twin
		min, max uint64
	}{
		{"nothing applies", rules.Definition{ID: "car", Types: []string{"car"}, Condition: "true"}, small, 0, 0},
		{"cheap", rules.Definition{ID: "warm", Condition: "twin.reported.temp_c > 8.0"}, small, 1, 10},
		{"with actions", rules.Definition{ID: "warm", Condition: "twin.reported.temp_c > 8.0", Actions: []rules.Action{
			{Emit: &rules.EmitAction{Message: "'warm: ' + twin.id"}}}}, small, 5, 20},
		{"loop, short", rules.Definition{ID: "any", Condition: "twin.reported.items.exists(x, x < 0.0)"}, small, 1, 20},
		{"loop, long", rules.Definition{ID: "any", Condition: "twin.reported.items.exists(x, x < 0.0)"}, big, 1000, 10000},
		{"over the runtime limit", rules.Definition{ID: "any", Condition: "twin.reported.?items.orValue([]).all(a, twin.reported.items.all(b, twin.reported.items.all(c, size(a) + size(c) > 0)))"},
			huge, rules.RuleCostLimit, rules.RuleCostLimit + 100},
	}
	for _, c := range cases {
		set := rules.NewSet([]*rules.Compiled{mustCompile(t, c.def)})
		res := set.Evaluate(nil, c.tw, nil, now, false)
		if res.Cost < c.min || res.Cost > c.max {
			t.Errorf("%s: Evaluate(...).Cost = %d; want %d to %d (firings %v)", c.name, res.Cost, c.min, c.max, res.Firings)
		}
	}
}
