package rules

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/twind-io/twind/twin"
)

func TestFilterPin(t *testing.T) {
	type labels = map[string][]string
	tests := []struct {
		filter string
		want   twin.Pin
	}{
		{`twin.type == "fridge"`, twin.Pin{Types: []string{"fridge"}}},
		{`"fridge" == twin.type`, twin.Pin{Types: []string{"fridge"}}},
		{`twin["type"] == "fridge"`, twin.Pin{Types: []string{"fridge"}}},
		{`twin.type == ""`, twin.Pin{Types: []string{""}}},
		{`twin.labels.site == "berlin"`, twin.Pin{Labels: labels{"site": {"berlin"}}}},
		{`twin.labels["site"] == "berlin"`, twin.Pin{Labels: labels{"site": {"berlin"}}}},
		{`twin["labels"]["site"] == "berlin"`, twin.Pin{Labels: labels{"site": {"berlin"}}}},
		{`"berlin" == twin.labels.site`, twin.Pin{Labels: labels{"site": {"berlin"}}}},
		{`twin.type == "fridge" && twin.reported.temp_c > 8.0`, twin.Pin{Types: []string{"fridge"}}},
		{`twin.reported.temp_c > 8.0 && (twin.labels.site == "berlin" && twin.type == "car")`,
			twin.Pin{Types: []string{"car"}, Labels: labels{"site": {"berlin"}}}},
		{`twin.type == "car" && twin.labels.site == "berlin" && twin.labels.fleet == "x" && twin.version > 1`,
			twin.Pin{Types: []string{"car"}, Labels: labels{"site": {"berlin"}, "fleet": {"x"}}}},
		{`twin.type in ["fridge", "car"]`, twin.Pin{Types: []string{"car", "fridge"}}},
		{`twin.type in ["car", "car"]`, twin.Pin{Types: []string{"car"}}},
		{`twin.labels.site in ["paris", "berlin"]`, twin.Pin{Labels: labels{"site": {"berlin", "paris"}}}},
		{`twin.type in ["car", "fridge"] && twin.type == "fridge"`, twin.Pin{Types: []string{"fridge"}}},
		{`twin.type == "car" && twin.type == "fridge"`, twin.Pin{Types: []string{}, None: true}},
		{`twin.labels.site == "a" && twin.labels.site == "b"`, twin.Pin{Labels: labels{"site": {}}, None: true}},
		{`true && twin.type == "car"`, twin.Pin{Types: []string{"car"}}},
		// Pins nothing.
		{`twin.type == "car" || twin.type == "fridge"`, twin.Pin{}},
		{`!(twin.type == "car")`, twin.Pin{}},
		{`twin.type != "car"`, twin.Pin{}},
		{`twin.type.startsWith("car")`, twin.Pin{}},
		{`twin.type == twin.labels.site`, twin.Pin{}},
		{`twin.reported.type == "car"`, twin.Pin{}},
		{`twin.labels.site.fleet == "x"`, twin.Pin{}},
		{`prev.type == "car"`, twin.Pin{}},
		{`twin.labels.site == 3`, twin.Pin{}},
		{`twin.type in ["car", 1]`, twin.Pin{}},
		{`twin.type in twin.labels`, twin.Pin{}},
		{`"site" in twin.labels`, twin.Pin{}},
		{`has(twin.labels.site)`, twin.Pin{}},
		{`[twin].exists(t, t.type == "car")`, twin.Pin{}},
		{`twin.labels.?site.orValue("") == "berlin"`, twin.Pin{}},
		{`(twin.type == "car") == true`, twin.Pin{}},
		{`twin.version > 3`, twin.Pin{}},
	}
	env, err := Env()
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		a, iss := env.Compile(tt.filter)
		if iss.Err() != nil {
			t.Errorf("Compile(%s): %v", tt.filter, iss.Err())
			continue
		}
		if diff := cmp.Diff(tt.want, FilterPin(a)); diff != "" {
			t.Errorf("FilterPin(%s) (-want +got):\n%s", tt.filter, diff)
		}
	}
}

// TestFilterPinIsNecessary checks, over a set of twins, that every twin a
// filter matches meets the filter's pin: the index may only narrow.
func TestFilterPinIsNecessary(t *testing.T) {
	var fleet []*twin.Twin
	for _, typ := range []string{"", "car", "fridge"} {
		for _, site := range []string{"", "berlin", "paris", "-"} {
			for _, fleetLabel := range []string{"", "x", "-"} {
				l := map[string]string{}
				if site != "-" {
					l["site"] = site
				}
				if fleetLabel != "-" {
					l["fleet"] = fleetLabel
				}
				fleet = append(fleet, &twin.Twin{ID: "t", Type: typ, Labels: l,
					Reported: twin.Document{"temp_c": 9.0}, Desired: twin.Document{}})
			}
		}
	}
	filters := []string{
		`twin.type == "car"`, `twin.type == ""`, `twin.labels.site == "berlin"`, `twin.labels["site"] == ""`,
		`twin.type in ["car", "fridge"] && twin.labels.site in ["berlin", "paris"]`,
		`twin.reported.temp_c > 8.0 && twin.labels.fleet == "x" && twin.type == "fridge"`,
		`twin.type == "car" && twin.type == "fridge"`,
	}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	env, _ := Env()
	for _, src := range filters {
		f, err := CompileFilter(src)
		if err != nil {
			t.Fatal(err)
		}
		a, _ := env.Compile(src)
		pin := FilterPin(a)
		if !pin.Pinned() {
			t.Errorf("FilterPin(%s) pins nothing", src)
		}
		matched := 0
		for _, tw := range fleet {
			if f.Match(tw, now) {
				matched++
				if !pin.Matches(tw) {
					t.Errorf("filter %s matches a twin of type %q, labels %v; its pin %v does not", src, tw.Type, tw.Labels, pin)
				}
			}
		}
		if matched == 0 && !pin.None {
			t.Errorf("filter %s matches none of the test fleet; the test proves nothing for it", src)
		}
	}
}
