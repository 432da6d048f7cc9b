package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/twind-io/twind/internal/testserver"
	"github.com/twind-io/twind/server"
)

func startTwind(t *testing.T) string { return testserver.Start(t, t.TempDir(), "").Addr }

// run runs twinctl with args and returns what it printed and its error.
func run(t *testing.T, addr string, stdin string, args ...string) (string, error) {
	t.Helper()
	out, errOut, err := run2(t, addr, stdin, args...)
	return out + errOut, err
}

// run2 runs twinctl with args and returns what it printed on standard
// output and on standard error, and its error.
func run2(t *testing.T, addr string, stdin string, args ...string) (string, string, error) {
	t.Helper()
	root := newRoot()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetIn(strings.NewReader(stdin))
	root.SetArgs(append([]string{"--addr", addr}, args...))
	err := root.ExecuteContext(context.Background())
	return out.String(), errOut.String(), err
}

func TestTwinctl(t *testing.T) {
	addr := startTwind(t)
	must := func(stdin string, args ...string) string {
		t.Helper()
		out, err := run(t, addr, stdin, args...)
		if err != nil {
			t.Fatalf("twinctl %v: %v\n%s", args, errorText(err), out)
		}
		return out
	}
	contains := func(out string, want ...string) {
		t.Helper()
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("output lacks %q:\n%s", w, out)
			}
		}
	}

	contains(must("", "twin", "create", "fridge-1", "--type", "fridge", "--label", "site=berlin", "--desired", `{"target_c": 4}`),
		"fridge-1", "site=berlin", `{"target_c":4}`)
	must("", "twin", "create", "car-1", "--type", "car")
	contains(must(`{"temp_c": 9.5, "door": "open"}`, "twin", "report", "fridge-1", "-"), `"temp_c":9.5`)
	contains(must("", "twin", "desired", "fridge-1", `{"eco": true}`, "--expect-version", "2"), `"eco":true`)
	out := must("", "twin", "list", "--filter", `twin.reported.temp_c > 8.0`)
	contains(out, "fridge-1")
	if strings.Contains(out, "car-1") {
		t.Errorf("filtered list shows car-1:\n%s", out)
	}
	var tw map[string]any
	if err := json.Unmarshal([]byte(must("", "-o", "json", "twin", "get", "fridge-1")), &tw); err != nil || tw["version"] != "3" {
		t.Errorf("-o json twin get = %v, %v", tw, err)
	}
	contains(must("", "twin", "history", "fridge-1"), "DESIRED", "REPORTED", "CREATED")
	if tok := strings.TrimSpace(must("", "twin", "token", "fridge-1")); !strings.HasPrefix(tok, "twd_") {
		t.Errorf("token = %q", tok)
	}

	// Rules from YAML and JSON files.
	dir := t.TempDir()
	yamlRule := filepath.Join(dir, "warm.yaml")
	os.WriteFile(yamlRule, []byte(`id: warm
types: [fridge]
condition: twin.reported.temp_c > 8.0
trigger: TRIGGER_RISING
actions:
  - set_desired: {patch: "{'eco': false}"}
  - emit: {severity: SEVERITY_WARNING, message: "'warm ' + twin.id"}
`), 0o644)
	contains(must("", "rule", "create", "-f", yamlRule), "warm", "RISING", "true")
	contains(must("", "rule", "create", "-f", filepath.Join("..", "..", "rules", "examples", "car-low-fuel.json")), "car-low-fuel")
	contains(must("", "rule", "list"), "car-low-fuel", "warm")
	contains(must("", "rule", "validate", "-f", yamlRule), "valid")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("id: bad\ncondition: 'twin.reported.x >'\n"), 0o644)
	out, err := run(t, addr, "", "rule", "validate", "-f", bad)
	if err == nil || !strings.Contains(out, "condition:1:18") {
		t.Errorf("validate of a bad rule: %v\n%s", err, out)
	}
	contains(must("", "rule", "test", "--id", "warm",
		"--before", `{"id": "f", "type": "fridge", "reported": {"temp_c": 5}}`,
		"--after", `{"id": "f", "type": "fridge", "reported": {"temp_c": 9}}`),
		"fired: true", `set desired: {"eco":false}`, "emit WARNING: warm f")
	contains(must("", "rule", "get", "warm"), "warm")
	os.WriteFile(yamlRule, []byte("id: warm\ncondition: twin.reported.temp_c > 10.0\nenabled: false\n"), 0o644)
	contains(must("", "rule", "update", "-f", yamlRule), "false")
	contains(must("", "rule", "delete", "warm"), "deleted warm")

	// Commands.
	contains(must("", "command", "send", "car-1", "navigate", "--params", `{"lat": 52.5, "lon": 13.4}`, "--request-id", "trip-1"),
		"car-1~1", "QUEUED")
	contains(must("", "command", "send", "car-1", "navigate", "--params", `{"lat": 52.5, "lon": 13.4}`, "--request-id", "trip-1"), "car-1~1")
	contains(must("", "command", "get", "car-1~1"), "navigate")
	contains(must("", "command", "list", "car-1", "--state", "queued"), "car-1~1")
	contains(must("", "command", "cancel", "car-1~1"), "CANCELED")
	contains(must("", "twin", "delete", "car-1"), "deleted car-1")

	// Errors: a clear message and a non-zero exit (an error from Execute).
	for _, args := range [][]string{
		{"twin", "get", "nope"},
		{"twin", "report", "fridge-1", "not json"},
		{"twin", "list", "--filter", "twin.type =="},
		{"twin", "get"},
		{"rule", "create"},
		{"command", "list", "fridge-1", "--state", "nonsense"},
		{"-o", "yaml", "twin", "list"},
	} {
		if out, err := run(t, addr, "", args...); err == nil {
			t.Errorf("twinctl %v succeeded:\n%s", args, out)
		}
	}
	out, err = run(t, addr, "", "twin", "get", "nope")
	if got := errorText(err); !strings.Contains(got, "NotFound") || !strings.Contains(got, "nope") {
		t.Errorf("error text %q", got)
	}
	contains(must("", "completion", "bash"), "bash completion")
}

func TestTwinctlToken(t *testing.T) {
	addr := testserver.StartWith(t, t.TempDir(), "", server.Options{APIToken: "s3cret"}).Addr
	if out, err := run(t, addr, "", "twin", "list"); err == nil || !strings.Contains(errorText(err), "Unauthenticated") {
		t.Errorf("without --token: %v\n%s", err, out)
	}
	if out, err := run(t, addr, "", "--token", "s3cret", "twin", "create", "x1"); err != nil {
		t.Errorf("with --token: %v\n%s", errorText(err), out)
	}
}
