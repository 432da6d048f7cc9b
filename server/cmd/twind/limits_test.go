package main

import (
	"context"
	"flag"
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
)

// TestLimitsTable holds the README's Limits table to the flags: every limit
// flag is in it with the flag's default, and the flags' defaults are the
// server's.
func TestLimitsTable(t *testing.T) {
	readme, err := os.ReadFile("../../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, table, ok := strings.Cut(string(readme), "### Limits\n")
	if !ok {
		t.Fatal("README.md has no Limits section")
	}
	rows := map[string]string{}
	for _, m := range regexp.MustCompile("(?m)^\\| `--([a-z-]+)` \\| ([^|]+) \\|").FindAllStringSubmatch(table, -1) {
		rows[m[1]] = strings.TrimSpace(m[2])
	}
	fs := flag.NewFlagSet("twind", flag.ContinueOnError)
	var opts server.Options
	finish := limitFlags(fs, &opts)
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if err := finish(); err != nil {
		t.Fatal(err)
	}
	fs.VisitAll(func(f *flag.Flag) {
		if strings.HasPrefix(f.Name, "device-") {
			return // not a limit
		}
		if got, ok := rows[f.Name]; !ok {
			t.Errorf("--%s is missing from the README's Limits table", f.Name)
		} else if got != f.DefValue {
			t.Errorf("README's Limits table: --%s defaults to %s; the flag's default is %s", f.Name, got, f.DefValue)
		}
	})
	want := server.Options{}
	want.EnsureDefaults()
	if opts.Limits != want.Limits || opts.HelloTimeout != want.HelloTimeout {
		t.Errorf("the flags' defaults = %+v, hello timeout %v; want the server's, %+v and %v", opts.Limits, opts.HelloTimeout, want.Limits, want.HelloTimeout)
	}
}

// TestLimitFlagErrors checks the flags' own checks.
func TestLimitFlagErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--report-rate", "-1"}, "--report-rate -1: must be positive"},
		{[]string{"--max-streams-per-conn", "5000000000"}, "--max-streams-per-conn 5000000000: at most"},
		{[]string{"--max-watchers", "-1"}, "must not be negative"},
		{[]string{"--device-ca", "ca.pem"}, "--device-ca needs TLS"},
		{[]string{"--max-recv-msg-size", "64KiB"}, "--max-recv-msg-size"},
	} {
		code, _, errOut := runTwind(t, append(tt.args, "--addr", "localhost:0", "--data", t.TempDir())...)
		if code != 1 || !strings.Contains(errOut, tt.want) {
			t.Errorf("twind %q = exit %d, stderr %q; want exit 1 and %q", tt.args, code, errOut, tt.want)
		}
	}
}

// TestSIGHUP sends twind SIGHUP: it reloads and goes on serving.
func TestSIGHUP(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real processes")
	}
	d := startDaemon(t, "--data", t.TempDir())
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.waitLog(t, "msg=reloaded")
	if _, err := dial(t, d.addr).ListTwins(context.Background(), &twinv1.ListTwinsRequest{}); err != nil {
		t.Errorf("ListTwins after SIGHUP: %v", err)
	}
}
