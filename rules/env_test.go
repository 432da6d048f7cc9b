package rules

import (
	"errors"
	"testing"
	"time"

	"github.com/twind-io/twind/twin"
)

func TestFilter(t *testing.T) {
	fridge := &twin.Twin{
		ID: "fridge-1", Type: "fridge", Labels: map[string]string{"site": "berlin"},
		Reported: twin.Document{"temp_c": 9.5, "door": "open", "count": 3.0},
		Desired:  twin.Document{"target_c": 4.0},
		Delta:    twin.Document{"target_c": 4.0},
		Version:  7,
		Presence: twin.Presence{LastSeen: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)},
	}
	now := time.Date(2026, 1, 1, 0, 20, 0, 0, time.UTC)
	tests := []struct {
		filter string
		want   bool
	}{
		{``, true},
		{`twin.type == "fridge" && twin.reported.temp_c > 8.0`, true},
		{`twin.reported.temp_c > 8`, true}, // int literal against a double
		{`twin.reported.count == 3`, true},
		{`twin.reported.humidity > 50.0`, false}, // missing field: no match, no error
		{`twin.labels.site == "berlin"`, true},
		{`twin.labels.?owner.orValue("none") == "none"`, true},
		{`twin.version >= 7`, true},
		{`has(twin.delta.target_c)`, true},
		{`twin.id.startsWith("fridge-")`, true},
		{`now - twin.presence.last_seen > duration("10m")`, true},
		{`twin.reported.door == 1`, false}, // wrong type: no match
	}
	for _, tt := range tests {
		f, err := CompileFilter(tt.filter)
		if err != nil {
			t.Errorf("CompileFilter(%q): %v", tt.filter, err)
			continue
		}
		if got := f.Match(fridge, now); got != tt.want {
			t.Errorf("Match(%q) = %v; want %v", tt.filter, got, tt.want)
		}
	}
}

func TestFilterErrors(t *testing.T) {
	for _, expr := range []string{
		`twin.type ==`,     // syntax
		`twin.version + 1`, // not a boolean
		`"a" + 1 == "a1"`,  // type error
		`nosuchvar.x == 1`, // unknown variable
		string(make([]byte, MaxExpressionBytes+1)),
	} {
		if _, err := CompileFilter(expr); !errors.Is(err, ErrInvalid) {
			t.Errorf("CompileFilter(%.30q) = %v; want ErrInvalid", expr, err)
		}
	}
}
