package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/twind-io/twind/internal/testserver"
	"github.com/twind-io/twind/server"
)

// TestKeys creates, lists and revokes keys with twinctl, uses a created key
// with its role, and filters a history and a watch by the key that made
// the changes.
func TestKeys(t *testing.T) {
	addr := testserver.StartWith(t, t.TempDir(), "", server.Options{APIToken: "root"}).Addr
	as := func(key string, args ...string) (string, error) {
		out, errOut, err := run2(t, addr, "", append([]string{"--token", key}, args...)...)
		if err != nil {
			return out + errOut, err
		}
		return out, nil
	}
	must := func(key string, args ...string) string {
		t.Helper()
		out, err := as(key, args...)
		if err != nil {
			t.Fatalf("twinctl %v: %v\n%s", args, errorText(err), out)
		}
		return out
	}
	secret := strings.TrimSpace(must("root", "key", "create", "ops", "--role", "operator"))
	if !strings.HasPrefix(secret, "twk_") || strings.Contains(secret, "\n") {
		t.Fatalf("key create printed %q; want the secret alone", secret)
	}
	if out := must(secret, "key", "whoami"); !strings.Contains(out, "ops") || !strings.Contains(out, "operator") {
		t.Errorf("key whoami = %q", out)
	}
	var list struct {
		Kind  string
		Items []map[string]any
	}
	if err := json.Unmarshal([]byte(must("root", "-o", "json", "key", "list")), &list); err != nil || list.Kind != "KeyList" || len(list.Items) != 2 {
		t.Fatalf("key list -o json = %+v, %v", list, err)
	}
	if got := list.Items[1]; got["name"] != "ops" || got["role"] != "ROLE_OPERATOR" || got["source"] != "KEY_SOURCE_API" {
		t.Errorf("key list item = %v", got)
	}
	if out := must("root", "key", "list"); !strings.Contains(out, "api-token  admin     flag") {
		t.Errorf("key list table =\n%s", out)
	}
	if out, err := as(secret, "key", "list"); err == nil || !strings.Contains(errorText(err), "PermissionDenied") {
		t.Errorf("key list as an operator = %v, %s; want PermissionDenied", err, out)
	}
	if out, err := as("root", "key", "revoke", "api-token"); err == nil || !strings.Contains(errorText(err), "FailedPrecondition") {
		t.Errorf("key revoke api-token = %v, %s; want FailedPrecondition", err, out)
	}

	must("root", "twin", "create", "f1", "--type", "fridge")
	must(secret, "twin", "desired", "f1", `{"eco": true}`)
	must("root", "twin", "desired", "f1", `{"eco": false}`)
	out := must("root", "twin", "history", "f1", "--source", "key:ops")
	if !strings.Contains(out, "key:ops") || strings.Contains(out, "key:api-token") || strings.Count(out, "\n") != 2 {
		t.Errorf("twin history --source key:ops =\n%s", out)
	}
	if out := must("root", "twin", "history", "f1"); strings.Count(out, "key:api-token") != 2 {
		t.Errorf("twin history =\n%s; want two changes by key:api-token", out)
	}
	lines := stream(t, addr, 1, "--token", "root", "twin", "watch", "--from", "1", "--source", "key:ops")
	if len(lines) != 1 || !strings.Contains(lines[0], "key:ops") || !strings.Contains(lines[0], "DESIRED") {
		t.Errorf("twin watch --source key:ops = %q", lines)
	}

	must("root", "key", "revoke", "ops")
	if _, err := as(secret, "twin", "list"); err == nil || !strings.Contains(errorText(err), "Unauthenticated") {
		t.Errorf("a revoked key = %v; want Unauthenticated", err)
	}
}
