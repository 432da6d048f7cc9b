package server

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"
)

// get fetches path from srv with key as bearer (none if empty).
func get(t *testing.T, srv *httptest.Server, path, key string) (int, string) {
	t.Helper()
	req, err := http.NewRequest("GET", srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestDebugEndpoints: with keys, /metrics needs one (any role) and
// /debug/pprof/ an admin's; without, they are served only on a loopback
// listener; the command line is never served.
func TestDebugEndpoints(t *testing.T) {
	file := writeKeys(t, "", roleKeys)
	s := startServer(t, nil, func(o *Options) { o.APIKeysFile = file })
	srv := httptest.NewServer(s.debugHandler(false))
	defer srv.Close()
	for _, path := range []string{"/metrics", "/debug/pprof/", "/debug/pprof/heap"} {
		if code, _ := get(t, srv, path, ""); code != http.StatusUnauthorized {
			t.Errorf("GET %s without a key = %d; want 401", path, code)
		}
		if code, _ := get(t, srv, path, "viewer-secreT"); code != http.StatusUnauthorized {
			t.Errorf("GET %s with a wrong key = %d; want 401", path, code)
		}
		// Metrics for any key; profiles for admins.
		want := http.StatusOK
		if path != "/metrics" {
			want = http.StatusForbidden
		}
		if code, _ := get(t, srv, path, "viewer-secret"); code != want {
			t.Errorf("GET %s with a viewer's key = %d; want %d", path, code, want)
		}
		if code, _ := get(t, srv, path, "admin-secret"); code != http.StatusOK {
			t.Errorf("GET %s with an admin's key = %d; want 200", path, code)
		}
	}
	if _, body := get(t, srv, "/metrics", "viewer-secret"); !strings.Contains(body, "twind_twins") {
		t.Errorf("/metrics with a key lacks twind_twins")
	}
	code, body := get(t, srv, "/debug/pprof/cmdline", "admin-secret")
	if code == http.StatusOK || strings.Contains(body, os.Args[0]) || strings.Contains(body, "-test.") {
		t.Errorf("/debug/pprof/cmdline = %d %q; want it not served", code, body)
	}

	// No key configured: served on loopback only.
	open := startServer(t, nil, nil)
	lo := httptest.NewServer(open.debugHandler(true))
	defer lo.Close()
	if code, _ := get(t, lo, "/metrics", ""); code != http.StatusOK {
		t.Errorf("GET /metrics on loopback with no key configured = %d; want 200", code)
	}
	if code, _ := get(t, lo, "/debug/pprof/cmdline", ""); code == http.StatusOK {
		t.Errorf("/debug/pprof/cmdline with no key configured = %d; want it not served", code)
	}
	wide := httptest.NewServer(open.debugHandler(false))
	defer wide.Close()
	if code, _ := get(t, wide, "/metrics", ""); code != http.StatusForbidden {
		t.Errorf("GET /metrics on a non-loopback listener with no key configured = %d; want 403", code)
	}
}

// TestOpenAPINeedsLoopback: without API keys, Run serves the operator API
// only on a loopback address, unless told to accept an open one.
func TestOpenAPINeedsLoopback(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, addr := range []string{":0", "0.0.0.0:0"} {
		err := Run(context.Background(), Options{Addr: addr, DataDir: t.TempDir(), Logger: quiet})
		if err == nil || !strings.Contains(err.Error(), "--allow-open-api") {
			t.Errorf("Run on %s without keys = %v; want a refusal naming --allow-open-api", addr, err)
		}
	}
	for _, o := range []Options{{Addr: "0.0.0.0:0", AllowOpenAPI: true}, {Addr: "0.0.0.0:0", APIToken: "t"}, {Addr: "127.0.0.1:0"}} {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		o.DataDir, o.Logger, o.Ready = t.TempDir(), quiet, func(net.Addr) { cancel() }
		go func() { done <- Run(ctx, o) }()
		if err := <-done; err != nil {
			t.Errorf("Run on %s (open allowed %v, token %q) = %v; want it served", o.Addr, o.AllowOpenAPI, o.APIToken, err)
		}
		cancel()
	}
}

// TestDebugAddrNeedsKeysOrLoopback: Run refuses a non-loopback debug
// address while no key is configured, and serves one with keys.
func TestDebugAddrNeedsKeysOrLoopback(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, addr := range []string{":0", "0.0.0.0:0", "[::]:0", "example.com:6060"} {
		err := Run(context.Background(), Options{Addr: "localhost:0", DebugAddr: addr, DataDir: t.TempDir(), Logger: quiet})
		if err == nil || !strings.Contains(err.Error(), "not a loopback address") {
			t.Errorf("Run with --debug-addr %s and no key = %v; want a refusal", addr, err)
		}
	}
	for _, addr := range []string{"localhost:0", "127.0.0.1:0", "[::1]:0"} {
		if !loopbackHost(addr) {
			t.Errorf("loopbackHost(%s) = false", addr)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ready := make(chan net.Addr, 1)
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Addr: "localhost:0", DebugAddr: "0.0.0.0:0", APIToken: "t", DataDir: t.TempDir(), Logger: quiet,
			Ready: func(a net.Addr) { ready <- a }})
	}()
	select {
	case <-ready:
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	case err := <-done:
		t.Errorf("Run with --debug-addr 0.0.0.0:0 and a key = %v; want it to serve", err)
	}
}
