package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

func keyLine(role, key, name string) string {
	d := sha256.Sum256([]byte(key))
	return fmt.Sprintf("%s %s %s\n", role, hex.EncodeToString(d[:]), name)
}

// TestSIGHUPReloadsKeys sends SIGHUP to a real twind: the --api-keys file's
// new keys take effect and its removed ones stop working; a bad file is
// logged with its line and changes nothing.
func TestSIGHUPReloadsKeys(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "keys")
	if err := os.WriteFile(file, []byte("# keys\n"+keyLine("viewer", "first", "one")), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, "--data", filepath.Join(dir, "data"), "--api-keys", file)
	c := dial(t, d.addr)
	list := func(key string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := c.ListTwins(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key), &twinv1.ListTwinsRequest{})
		return err
	}
	if err := list("first"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, []byte(keyLine("viewer", "second", "two")), 0o600); err != nil {
		t.Fatal(err)
	}
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitLog(t, "msg=reloaded keys=1")
	if err := list("first"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("after SIGHUP, the removed key = %v; want UNAUTHENTICATED", err)
	}
	if err := list("second"); err != nil {
		t.Errorf("after SIGHUP, the new key: %v", err)
	}
	if err := os.WriteFile(file, []byte(keyLine("viewer", "second", "two")+"boss 00 three\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d.cmd.Process.Signal(syscall.SIGHUP)
	lines := d.waitLog(t, "reload failed")
	if l := lines[len(lines)-1]; !strings.Contains(l, file+":2:") {
		t.Errorf("the failed reload's log line %q does not name the file's line", l)
	}
	if err := list("second"); err != nil {
		t.Errorf("after a failed reload, the key in force: %v", err)
	}
}

// TestKeyFlags: a bad --api-keys file is a start-up error naming its line;
// --api-token warns that the process list shows it; --api-token-file reads
// the token from a file.
func TestKeyFlags(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(bad, []byte("admin 1234 x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := run([]string{"--data", filepath.Join(dir, "d1"), "--addr", "127.0.0.1:0", "--api-keys", bad})
	if err == nil || !strings.Contains(err.Error(), bad+":1:") {
		t.Errorf("twind --api-keys with a bad line = %v; want an error naming file:line", err)
	}
	d := startDaemon(t, "--data", filepath.Join(dir, "d2"), "--api-token", "tok")
	d.waitLog(t, "visible in the process list")
	tokFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokFile, []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d2 := startDaemonEnv(t, []string{"TWIND_API_TOKEN_FILE=" + tokFile}, "--data", filepath.Join(dir, "d3"))
	c := dial(t, d2.addr)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer from-file")
	if _, err := c.ListTwins(ctx, &twinv1.ListTwinsRequest{}); err != nil {
		t.Errorf("a call with the token of TWIND_API_TOKEN_FILE: %v", err)
	}
	if _, err := c.ListTwins(context.Background(), &twinv1.ListTwinsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("a call without it = %v; want UNAUTHENTICATED", err)
	}
}
