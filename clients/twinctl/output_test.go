package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/twind-io/twind/clients/twind"
)

// rows counts the data rows of a table (the lines after the header).
func rows(table string) int {
	n := strings.Count(table, "\n")
	return max(n-1, 0)
}

// fleet creates n twins t-00, t-01, ... and a twin h with changes
// versions, and returns a client to the server.
func fleet(t *testing.T, addr string, n, changes int) *twind.Client {
	t.Helper()
	c, err := twind.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx := context.Background()
	for i := range n {
		if _, err := c.CreateTwin(ctx, fmt.Sprintf("t-%02d", i), "fridge", nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.CreateTwin(ctx, "h", "gauge", nil); err != nil {
		t.Fatal(err)
	}
	for i := 1; i < changes; i++ {
		if _, err := c.ReportState(ctx, "h", map[string]any{"n": i}); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// twin list and twin history each have their own --limit; "0: all" holds;
// a list that stops short says so on standard error.
func TestTwinctlLimits(t *testing.T) {
	addr := startTwind(t)
	fleet(t, addr, 24, 30) // 25 twins with h; h has 30 versions

	for _, tc := range []struct {
		args     []string
		rows     int
		moreNote bool
	}{
		{[]string{"twin", "list"}, 25, false},
		{[]string{"twin", "list", "--limit", "0"}, 25, false},
		{[]string{"twin", "list", "--limit", "10"}, 10, true},
		{[]string{"twin", "list", "--limit", "25"}, 25, false},
		{[]string{"twin", "list", "--limit", "30"}, 25, false},
		{[]string{"twin", "list", "--filter", `twin.type == "fridge"`, "--limit", "23"}, 23, true},
		{[]string{"twin", "history", "h"}, 20, true},
		{[]string{"twin", "history", "h", "--limit", "0"}, 30, false},
		{[]string{"twin", "history", "h", "--limit", "5"}, 5, true},
		{[]string{"twin", "history", "h", "--limit", "30"}, 30, false},
		{[]string{"-o", "jsonl", "twin", "list", "--limit", "4"}, 3, true}, // four lines, no header
	} {
		out, errOut, err := run2(t, addr, "", tc.args...)
		if err != nil {
			t.Errorf("twinctl %v: %v", tc.args, errorText(err))
			continue
		}
		if got := rows(out); got != tc.rows {
			t.Errorf("twinctl %v shows %d rows; want %d\n%s", tc.args, got, tc.rows, out)
		}
		if got := strings.Contains(errOut, "there are more") && strings.Contains(errOut, "--page-token"); got != tc.moreNote {
			t.Errorf("twinctl %v says there are more: %v; want %v (stderr %q)", tc.args, got, tc.moreNote, errOut)
		}
	}
	for _, args := range [][]string{{"twin", "list", "--limit", "-1"}, {"twin", "history", "h", "--limit", "-1"}} {
		if _, err := run(t, addr, "", args...); err == nil || !strings.Contains(err.Error(), "0 for all") {
			t.Errorf("twinctl %v = %v; want an error saying 0 is all", args, err)
		}
	}

	// A list that stopped short goes on from its next_page_token.
	var first, rest listDoc
	out, _, err := run2(t, addr, "", "-o", "json", "twin", "list", "--limit", "10")
	if err != nil || json.Unmarshal([]byte(out), &first) != nil {
		t.Fatalf("-o json twin list --limit 10 = %v\n%s", err, out)
	}
	if len(first.Items) != 10 || first.NextPageToken == "" {
		t.Fatalf("-o json twin list --limit 10: %d items, next_page_token %q; want 10 and a token", len(first.Items), first.NextPageToken)
	}
	out, _, err = run2(t, addr, "", "-o", "json", "twin", "list", "--page-token", first.NextPageToken)
	if err != nil || json.Unmarshal([]byte(out), &rest) != nil {
		t.Fatalf("-o json twin list --page-token = %v\n%s", err, out)
	}
	var id struct{ ID string }
	if json.Unmarshal(rest.Items[0], &id); len(rest.Items) != 15 || id.ID != "t-09" || rest.NextPageToken != "" {
		t.Errorf("the rest of the list: %d items from %q, next_page_token %q; want 15 from t-09 (h comes first) and none", len(rest.Items), id.ID, rest.NextPageToken)
	}
}

// oneDocument decodes out as exactly one JSON document in encoding/json's
// indented form.
func oneDocument(t *testing.T, args []string, out string, v any) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(out))
	if err := dec.Decode(v); err != nil {
		t.Errorf("twinctl %v: not JSON: %v\n%s", args, err, out)
		return
	}
	if _, err := dec.Token(); err != io.EOF {
		t.Errorf("twinctl %v prints more than one JSON document:\n%s", args, out)
	}
	var want bytes.Buffer
	json.Indent(&want, []byte(out), "", "  ")
	if out != want.String() {
		t.Errorf("twinctl %v is not stably indented:\n%s\nwant\n%s", args, out, want.String())
	}
}

// compactLines checks that out is lines of compact JSON objects and returns
// them.
func compactLines(t *testing.T, args []string, out string) []map[string]any {
	t.Helper()
	var objs []map[string]any
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		var c bytes.Buffer
		var m map[string]any
		if err := json.Compact(&c, []byte(line)); err != nil || c.String() != line || json.Unmarshal([]byte(line), &m) != nil {
			t.Errorf("twinctl %v: line %q is not a compact JSON object (%v)", args, line, err)
			continue
		}
		objs = append(objs, m)
	}
	return objs
}

// -o json prints one document (a list object for lists); -o jsonl one
// compact object per line.
func TestTwinctlJSON(t *testing.T) {
	addr := startTwind(t)
	c := fleet(t, addr, 2, 3)
	ctx := context.Background()
	if _, err := c.SendCommand(ctx, "t-00", "defrost", map[string]any{"minutes": 20}, twind.SendOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, addr, "", "rule", "create", "-f", "../../rules/examples/fridge-warm.json"); err != nil {
		t.Fatal(errorText(err))
	}

	for _, tc := range []struct {
		args  []string
		kind  string
		items int
		more  bool
	}{
		{[]string{"-o", "json", "twin", "list"}, "TwinList", 3, false},
		{[]string{"-o", "json", "twin", "list", "--filter", "false"}, "TwinList", 0, false},
		{[]string{"-o", "json", "twin", "list", "--limit", "2"}, "TwinList", 2, true},
		{[]string{"-o", "json", "twin", "history", "h"}, "TwinEventList", 3, false},
		{[]string{"-o", "json", "twin", "history", "h", "--limit", "1"}, "TwinEventList", 1, true},
		{[]string{"-o", "json", "rule", "list"}, "RuleList", 1, false},
		{[]string{"-o", "json", "command", "list", "t-00"}, "CommandList", 1, false},
	} {
		out, errOut, err := run2(t, addr, "", tc.args...)
		if err != nil {
			t.Errorf("twinctl %v: %v", tc.args, errorText(err))
			continue
		}
		var doc struct {
			Kind          string           `json:"kind"`
			Items         []map[string]any `json:"items"`
			NextPageToken *string          `json:"next_page_token"`
			Revision      int64            `json:"revision,string"`
		}
		oneDocument(t, tc.args, out, &doc)
		if doc.Kind != tc.kind || len(doc.Items) != tc.items || doc.Items == nil {
			t.Errorf("twinctl %v = kind %q, %d items; want %q, %d\n%s", tc.args, doc.Kind, len(doc.Items), tc.kind, tc.items, out)
		}
		if got := doc.NextPageToken != nil && *doc.NextPageToken != ""; got != tc.more {
			t.Errorf("twinctl %v has a next_page_token: %v; want %v\n%s", tc.args, got, tc.more, out)
		}
		if errOut != "" {
			t.Errorf("twinctl %v writes to stderr: %q", tc.args, errOut)
		}
	}
	// A list of twins says up to which revision it is complete, for a watch
	// to go on from.
	out, _ := run(t, addr, "", "-o", "json", "twin", "list")
	var list listDoc
	json.Unmarshal([]byte(out), &list)
	if list.Revision < 5 {
		t.Errorf("-o json twin list: revision %d; want at least 5 (the writes so far)\n%s", list.Revision, out)
	}

	// Single objects are one indented document.
	for _, args := range [][]string{
		{"-o", "json", "twin", "get", "h"},
		{"-o", "json", "rule", "get", "fridge-warm"},
		{"-o", "json", "command", "get", "t-00~1"},
		{"-o", "json", "twin", "report", "t-01", `{"temp_c": 5, "door": "closed"}`},
	} {
		out, err := run(t, addr, "", args...)
		if err != nil {
			t.Errorf("twinctl %v: %v", args, errorText(err))
			continue
		}
		var m map[string]any
		oneDocument(t, args, out, &m)
		// Field names as the .proto, the README and filters spell them.
		if _, ok := m["update_time"]; !ok {
			t.Errorf("twinctl %v lacks update_time:\n%s", args, out)
		}
	}

	// -o jsonl: one compact object per line, for lists and single objects.
	for _, tc := range []struct {
		args  []string
		lines int
	}{
		{[]string{"-o", "jsonl", "twin", "list"}, 3},
		{[]string{"-o", "jsonl", "twin", "history", "h"}, 3},
		{[]string{"-o", "jsonl", "rule", "list"}, 1},
		{[]string{"-o", "jsonl", "twin", "get", "h"}, 1},
	} {
		out, err := run(t, addr, "", tc.args...)
		if err != nil {
			t.Errorf("twinctl %v: %v", tc.args, errorText(err))
			continue
		}
		if got := compactLines(t, tc.args, out); len(got) != tc.lines {
			t.Errorf("twinctl %v: %d lines; want %d\n%s", tc.args, len(got), tc.lines, out)
		}
	}

	// Streams print lines with -o json and -o jsonl alike.
	for _, o := range []string{"json", "jsonl"} {
		args := []string{"-o", o, "twin", "watch", "--from", "1", "--filter", `twin.id == "h"`}
		lines := stream(t, addr, 3, args...)
		objs := compactLines(t, args, strings.Join(lines, "\n"))
		for i, ev := range objs {
			if tw, _ := ev["twin"].(map[string]any); tw["id"] != "h" || tw["version"] != fmt.Sprint(i+1) {
				t.Errorf("twinctl %v: event %d is %v; want h at version %d", args, i, ev, i+1)
			}
		}
	}

	if _, err := run(t, addr, "", "-o", "yaml", "twin", "list"); err == nil || !strings.Contains(err.Error(), "table, json or jsonl") {
		t.Errorf("-o yaml = %v; want an error naming table, json and jsonl", err)
	}
}

// stream runs a streaming twinctl command until it has printed n lines, then
// stops it and returns them.
func stream(t *testing.T, addr string, n int, args ...string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pr, pw := io.Pipe()
	root := newRoot()
	root.SetOut(pw)
	root.SetErr(io.Discard)
	root.SetArgs(append([]string{"--addr", addr}, args...))
	done := make(chan error, 1)
	go func() {
		err := root.ExecuteContext(ctx)
		pw.CloseWithError(err)
		done <- err
	}()
	var lines []string
	sc := bufio.NewScanner(pr)
	for len(lines) < n && sc.Scan() {
		lines = append(lines, sc.Text())
	}
	cancel()
	go io.Copy(io.Discard, pr) // let the command finish its last write
	if err := <-done; err != nil {
		t.Errorf("twinctl %v: %v", args, errorText(err))
	}
	if len(lines) < n {
		t.Errorf("twinctl %v printed %d lines before it ended; want %d", args, len(lines), n)
	}
	return lines
}

// TestTwinctlFilterErrors: a list whose filter failed on some twins says
// so, rather than look complete.
func TestTwinctlFilterErrors(t *testing.T) {
	addr := startTwind(t)
	c := fleet(t, addr, 0, 1)
	ctx := context.Background()
	for id, temp := range map[string]any{"warm": 9.0, "odd": "x"} {
		if _, err := c.CreateTwin(ctx, id, "fridge", nil); err != nil {
			t.Fatal(err)
		}
		if _, err := c.ReportState(ctx, id, map[string]any{"temp_c": temp}); err != nil {
			t.Fatal(err)
		}
	}
	out, errOut, err := run2(t, addr, "", "twin", "list", "--filter", "twin.reported.temp_c > 8.0")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "warm") || strings.Contains(out, "odd") {
		t.Errorf("twin list printed:\n%s\nwant warm and not odd", out)
	}
	if !strings.Contains(errOut, "the filter failed on 1 twins") || !strings.Contains(errOut, "odd") {
		t.Errorf("twin list said on stderr:\n%s\nwant that the filter failed on 1 twin, odd", errOut)
	}
}
