package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/types/known/structpb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// runTwind runs the test binary as twind with args and returns its exit
// code, stdout and stderr.
func runTwind(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), "TWIND_TEST_DAEMON=1")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return code, out.String(), errOut.String()
}

// makeStore makes a store in dir with a real engine: twins with history,
// commands, a deleted twin and a re-created one.
func makeStore(t *testing.T, dir string) {
	t.Helper()
	ctx := context.Background()
	e, err := twin.Open(twin.Options{Dir: dir, VShards: 16})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		id := fmt.Sprint("fridge-", i)
		if _, err := e.Create(ctx, twin.CreateRequest{ID: id, Type: "fridge"}); err != nil {
			t.Fatal(err)
		}
		for j := range 5 {
			if _, err := e.Report(ctx, twin.PatchRequest{ID: id, Patch: twin.Document{"temp_c": float64(j)}}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := e.SendCommand(ctx, twin.CommandRequest{DeviceID: id, Name: "defrost"}); err != nil {
			t.Fatal(err)
		}
		if i%3 == 0 {
			if err := e.Delete(ctx, id, 0); err != nil {
				t.Fatal(err)
			}
		}
		if i%6 == 0 {
			if _, err := e.Create(ctx, twin.CreateRequest{ID: id, Type: "fridge"}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestCheckCommand(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	makeStore(t, dir)

	code, out, errOut := runTwind(t, "check", "--data", dir)
	if code != 0 || out != dir+": no violations\n" {
		t.Errorf("twind check (a store made by the engine) = exit %d, stdout %q, stderr %q; want exit 0 and %q",
			code, out, errOut, dir+": no violations\n")
	}

	// An orphan command key, written behind the engine's back.
	db, err := pebble.Open(dir, &pebble.Options{Logger: quietLogger{}})
	if err != nil {
		t.Fatal(err)
	}
	vs := twinVShard("ghost", 16)
	k := binary.BigEndian.AppendUint16([]byte("s/"), vs)
	k = binary.BigEndian.AppendUint64(append(append(k, "/c/ghost"...), 0), 3)
	if err := db.Set(k, []byte(`{"id":"ghost~3","device_id":"ghost","seq":3,"state":1}`), pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = runTwind(t, "check", "--data", dir)
	want := fmt.Sprintf("s/%d/c/ghost/3: command of twin \"ghost\", which does not exist\n", vs)
	if code != 1 || out != want || !strings.Contains(errOut, "1 violations in "+dir) {
		t.Errorf("twind check (an orphan command) = exit %d, stdout %q, stderr %q; want exit 1 and %q", code, out, errOut, want)
	}
	// The same history, checked with a lower --history-limit than it was
	// written with, has entries too old.
	code, out, _ = runTwind(t, "check", "--data", dir, "--history-limit", "3")
	if code != 1 || !strings.Contains(out, "older than the history limit of 3 versions") {
		t.Errorf("twind check --history-limit 3 = exit %d, stdout %q; want history entries beyond the limit", code, out)
	}
}

// twinVShard is the virtual shard of id in a store of n shards: the FNV-1a
// hash of the id, modulo n.
func twinVShard(id string, n int) uint16 {
	h := fnv.New32a()
	h.Write([]byte(id))
	return uint16(h.Sum32() % uint32(n))
}

func TestCheckCommandErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		args []string
		want *regexp.Regexp
	}{
		{[]string{"check", "--data", filepath.Join(dir, "missing")}, regexp.MustCompile(`twind: twin: no store in .*missing`)},
		{[]string{"check", "--data", dir, "extra"}, regexp.MustCompile(`unexpected arguments \["extra"\]`)},
		{[]string{"check", "--nope"}, regexp.MustCompile(`flag provided but not defined: -nope`)},
	} {
		code, _, errOut := runTwind(t, tt.args...)
		if code != 1 || !tt.want.MatchString(errOut) {
			t.Errorf("twind %q = exit %d, stderr %q; want exit 1 and %v", tt.args, code, errOut, tt.want)
		}
	}
}

// TestCheckAfterKill checks the store of a real twind killed with SIGKILL
// while clients write.
func TestCheckAfterKill(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real processes")
	}
	dir := t.TempDir()
	d := startDaemon(t, "--data", dir, "--history-limit", "4")
	c := dial(t, d.addr)
	ctx := context.Background()
	for i := range 8 {
		id := fmt.Sprint("car-", i)
		if _, err := c.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id, Type: "car"}}); err != nil {
			t.Fatal(err)
		}
		for j := range 6 {
			patch, _ := structpb.NewStruct(map[string]any{"odometer_km": float64(j)})
			if _, err := c.ReportState(ctx, &twinv1.ReportStateRequest{Id: id, Patch: patch}); err != nil {
				t.Fatal(err)
			}
		}
		if i%2 == 0 {
			if _, err := c.DeleteTwin(ctx, &twinv1.DeleteTwinRequest{Id: id}); err != nil {
				t.Fatal(err)
			}
		}
	}
	d.kill(t)
	code, out, errOut := runTwind(t, "check", "--data", dir)
	if code != 0 {
		t.Errorf("twind check after SIGKILL = exit %d, stdout %q, stderr %q; want exit 0", code, out, errOut)
	}
}

// quietLogger keeps Pebble's logs out of the test output.
type quietLogger struct{}

func (quietLogger) Infof(string, ...any)           {}
func (quietLogger) Errorf(string, ...any)          {}
func (quietLogger) Fatalf(format string, a ...any) { panic(fmt.Sprintf(format, a...)) }
