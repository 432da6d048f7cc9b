package twind_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/twind-io/twind/clients/twind"
	"github.com/twind-io/twind/internal/testserver"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

func runDaemon(t *testing.T, dir, addr string) *testserver.Server {
	return testserver.Start(t, dir, addr)
}

func TestOperatorHelpers(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := runDaemon(t, dir, "localhost:0")
	c, err := twind.Dial(d.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, id := range []string{"fridge-1", "fridge-2", "car-1"} {
		typ := map[bool]string{true: "fridge", false: "car"}[id[0] == 'f']
		if _, err := c.CreateTwin(ctx, id, typ, map[string]string{"site": "berlin"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.CreateTwin(ctx, "car-1", "car", nil); !twind.IsAlreadyExists(err) {
		t.Errorf("duplicate CreateTwin = %v", err)
	}
	if _, err := c.GetTwin(ctx, "nope"); !twind.IsNotFound(err) {
		t.Errorf("GetTwin(nope) = %v", err)
	}
	if tw, err := c.UpdateDesired(ctx, "fridge-1", map[string]any{"target_c": 4, "eco": true}, 1); err != nil || tw.Version != 2 {
		t.Fatalf("UpdateDesired = %v, %v", tw, err)
	}
	if tw, err := c.ReportState(ctx, "fridge-1", map[string]any{"temp_c": 9.5}); err != nil || tw.Delta.Fields["target_c"] == nil {
		t.Fatalf("ReportState = %v, %v", tw, err)
	}
	var ids []string
	for tw, err := range c.ListTwins(ctx, `twin.type == "fridge"`) {
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, tw.Id)
	}
	if len(ids) != 2 || ids[0] != "fridge-1" {
		t.Errorf("ListTwins = %v", ids)
	}

	// Watch survives a server restart and resumes exactly.
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := make(chan *twinv1.TwinEvent, 100)
	go func() {
		for ev, err := range c.Watch(wctx, `twin.type == "car"`, 1) {
			if err != nil {
				return
			}
			events <- ev
		}
	}()
	next := func() *twinv1.TwinEvent {
		select {
		case ev := <-events:
			return ev
		case <-time.After(20 * time.Second):
			t.Fatal("no watch event within 20s")
		}
		return nil
	}
	if ev := next(); ev.Twin.Id != "car-1" || ev.Kind != twinv1.TwinEventKind_TWIN_EVENT_KIND_CREATED {
		t.Fatalf("first event %v", ev)
	}
	addr := d.Addr
	d.Stop()
	d = runDaemon(t, dir, addr)
	if _, err := c.ReportState(ctx, "car-1", map[string]any{"fuel": 0.3}); err != nil {
		// The client may need a moment to reconnect.
		for i := 0; err != nil && i < 100; i++ {
			time.Sleep(50 * time.Millisecond)
			_, err = c.ReportState(ctx, "car-1", map[string]any{"fuel": 0.3})
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if ev := next(); ev.Twin.Id != "car-1" || ev.Kind != twinv1.TwinEventKind_TWIN_EVENT_KIND_REPORTED {
		t.Errorf("event after restart %v; want car-1 reported", ev)
	}
}

func TestDeviceSession(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := runDaemon(t, dir, "localhost:0")
	c, err := twind.Dial(d.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.CreateTwin(ctx, "planter-1", "planter", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.UpdateDesired(ctx, "planter-1", map[string]any{"lamp": "on"}, 0); err != nil {
		t.Fatal(err)
	}
	token, err := c.IssueDeviceToken(ctx, "planter-1")
	if err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	var changes []twind.DesiredChange
	gotDesired := make(chan struct{}, 10)
	gotCommand := make(chan string, 10)
	dev := c.Device(twind.DeviceConfig{
		DeviceID: "planter-1", Token: token, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		OnDesired: func(ctx context.Context, ch twind.DesiredChange) error {
			mu.Lock()
			changes = append(changes, ch)
			mu.Unlock()
			gotDesired <- struct{}{}
			return nil
		},
		OnCommand: func(ctx context.Context, cmd *twinv1.Command) twind.CommandResult {
			gotCommand <- cmd.Id
			return twind.CommandResult{Result: map[string]any{"watered_s": cmd.Params.Fields["seconds"].GetNumberValue()}}
		},
	})
	runCtx, stop := context.WithCancel(ctx)
	runDone := make(chan error, 1)
	go func() { runDone <- dev.Run(runCtx) }()
	defer func() {
		stop()
		if err := <-runDone; !errors.Is(err, context.Canceled) {
			t.Errorf("Run ended with %v", err)
		}
	}()
	wait := func(ch <-chan struct{}) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(20 * time.Second):
			t.Fatal("timed out")
		}
	}
	wait(gotDesired) // the catch-up
	v, err := dev.Report(ctx, map[string]any{"lamp": "on", "soil_moisture": 40})
	if err != nil || v == 0 {
		t.Fatalf("Report = %d, %v", v, err)
	}
	if _, err := c.UpdateDesired(ctx, "planter-1", map[string]any{"pump": "on"}, 0); err != nil {
		t.Fatal(err)
	}
	wait(gotDesired)
	mu.Lock()
	if len(changes) != 2 || !changes[0].Full || changes[0].Desired["lamp"] != "on" || changes[1].Patch["pump"] != "on" {
		t.Errorf("desired changes %+v", changes)
	}
	mu.Unlock()
	cmd, err := c.SendCommand(ctx, "planter-1", "water", map[string]any{"seconds": 30}, twind.SendOptions{Wait: 20 * time.Second})
	if err != nil || cmd.State != twinv1.CommandState_COMMAND_STATE_SUCCEEDED || cmd.Result.Fields["watered_s"].GetNumberValue() != 30 {
		t.Fatalf("SendCommand = %v, %v", cmd, err)
	}
	<-gotCommand

	// The server restarts: the session reconnects, resumes from the version
	// it applied, and reports again.
	addr := d.Addr
	d.Stop()
	d = runDaemon(t, dir, addr)
	v2, err := dev.Report(ctx, map[string]any{"soil_moisture": 35})
	for i := 0; err != nil && i < 100; i++ { // a report racing the break fails; the next goes through
		v2, err = dev.Report(ctx, map[string]any{"soil_moisture": 35})
	}
	if err != nil || v2 <= v {
		t.Fatalf("Report after restart = %d, %v; want a version above %d", v2, err, v)
	}
	tw, _ := c.GetTwin(ctx, "planter-1")
	if !tw.Presence.Connected || tw.DesiredAckedVersion == 0 {
		t.Errorf("twin after reconnect: presence %v, desired_acked_version %d", tw.Presence, tw.DesiredAckedVersion)
	}
	mu.Lock()
	n := len(changes)
	mu.Unlock()
	if n != 2 {
		t.Errorf("a reconnect with nothing new re-delivered desired state: %d changes", n)
	}
}

// TestDeviceSessionRevoked rotates a connected device's token: the session
// stops with UNAUTHENTICATED instead of reconnecting, and a report made
// after that fails with the reason instead of waiting for a connection.
func TestDeviceSessionRevoked(t *testing.T) {
	ctx := context.Background()
	d := runDaemon(t, t.TempDir(), "localhost:0")
	c, err := twind.Dial(d.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.CreateTwin(ctx, "planter-1", "planter", nil); err != nil {
		t.Fatal(err)
	}
	token, err := c.IssueDeviceToken(ctx, "planter-1")
	if err != nil {
		t.Fatal(err)
	}
	dev := c.Device(twind.DeviceConfig{
		DeviceID: "planter-1", Token: token, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	runDone := make(chan error, 1)
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	go func() { runDone <- dev.Run(runCtx) }()
	if _, err := dev.Report(ctx, map[string]any{"soil_moisture": 40}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.IssueDeviceToken(ctx, "planter-1"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-runDone:
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("Run after the token was revoked = %v; want UNAUTHENTICATED", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run still reconnecting 20s after the token was revoked")
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = dev.Report(rctx, map[string]any{"soil_moisture": 41})
	if !errors.Is(err, twind.ErrSessionStopped) || status.Code(err) != codes.Unauthenticated {
		t.Errorf("Report after Run stopped = %v; want ErrSessionStopped with UNAUTHENTICATED", err)
	}
}
