package twin

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/twind-io/twind/twin/vfstest"
)

// TestReviewHistoryDuringUndurableDelete: while a DeleteTwin is applied but
// not yet durable, Get still shows the twin (its delete may never survive a
// power cut), yet History reads the store, where the delete's range
// deletion is already visible, and answers an empty history. A client sees
// state that is not durable (item 16).
func TestReviewHistoryDuringUndurableDelete(t *testing.T) {
	ctx := context.Background()
	g := vfstest.NewGate(vfs.NewMem())
	e := openMem(t, g, Options{})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "h1"}); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := e.Report(ctx, PatchRequest{ID: "h1", Patch: Document{"n": float64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	before, err := e.History("h1", 0, 100)
	if err != nil || len(before) != 4 {
		t.Fatalf("History before = %d events, %v; want 4", len(before), err)
	}
	g.Hold()
	done := make(chan error, 1)
	go func() { done <- e.Delete(ctx, "h1", 0) }()
	g.AwaitHeld(t)
	// The sync may start before the batch is visible: wait for it to be.
	awaitApplied(t, e, logKey(e.nextRev.Load()))
	if _, err := e.Get("h1"); err != nil {
		t.Fatalf("Get during the undurable delete: %v; want the twin (the delete is not durable)", err)
	}
	during, err := e.History("h1", 0, 100)
	if err != nil || len(during) != len(before) {
		t.Errorf("History during an undurable delete = %d events, %v; want the %d durable ones", len(during), err, len(before))
	}
	g.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestReviewHistoryTrimUndurable: with the history limit reached, a report
// that is applied but not yet durable deletes the oldest retained history
// entry in the store at once; History then answers one entry fewer than is
// durable.
func TestReviewHistoryTrimUndurable(t *testing.T) {
	ctx := context.Background()
	g := vfstest.NewGate(vfs.NewMem())
	e := openMem(t, g, Options{HistoryLimit: 3})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "h1"}); err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		if _, err := e.Report(ctx, PatchRequest{ID: "h1", Patch: Document{"n": float64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	before, err := e.History("h1", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	g.Hold()
	done := make(chan error, 1)
	go func() {
		_, err := e.Report(ctx, PatchRequest{ID: "h1", Patch: Document{"n": float64(99)}})
		done <- err
	}()
	g.AwaitHeld(t)
	awaitApplied(t, e, logKey(e.nextRev.Load()))
	during, err := e.History("h1", 0, 100)
	if err != nil || len(during) != len(before) {
		t.Errorf("History during an undurable report = %d events, %v; want the %d durable ones", len(during), err, len(before))
	}
	g.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// awaitApplied waits until key is in the store (applied, durable or not).
func awaitApplied(t *testing.T, e *Engine, key []byte) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, closer, err := e.db.Get(key)
		if err == nil {
			closer.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("key %q never applied", key)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestReviewNoSpinWithoutEvaluator: rule states loaded at Open with a
// pending hold_for put wake-ups in the worker's rule timers; until an
// evaluator is set (or forever, for an Engine used without rules) those
// timers are due but timedRules never runs to pop them, so the worker
// loops without sleeping and burns a core.
func TestReviewNoSpinWithoutEvaluator(t *testing.T) {
	ctx := context.Background()
	mem := vfs.NewMem()
	e := openMem(t, mem, Options{Workers: 1})
	e.SetEvaluator(funcEvaluator{eval: func(prev, next *Twin, _ map[string]RuleState, now time.Time, _ bool) Evaluation {
		return Evaluation{
			States: map[string]*RuleState{"r": {Gen: 1, Active: true, PendingSince: now}},
			Wake:   now.Add(time.Hour),
		}
	}})
	if _, err := e.Create(ctx, CreateRequest{ID: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int64
	e = openMem(t, mem, Options{Workers: 1, Clock: func() time.Time { calls.Add(1); return time.Now() }})
	defer e.Close()
	start := calls.Load()
	time.Sleep(200 * time.Millisecond)
	if n := calls.Load() - start; n > 100 {
		t.Errorf("an idle engine with no evaluator read its clock %d times in 200ms: its worker spins", n)
	}
}

// TestReviewConnectedCountAfterTokenRotation: a token rotation closes the
// device's stream and marks it offline, but count (stats.go) has no case
// for opToken, and the stream's own Disconnect then changes nothing: the
// ConnectedDevices gauge stays one too high for good.
func TestReviewConnectedCountAfterTokenRotation(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "d"}); err != nil {
		t.Fatal(err)
	}
	sink := newRecSink()
	if _, err := e.Connect(ctx, "d", sink); err != nil {
		t.Fatal(err)
	}
	if err := e.SetTokenHash(ctx, "d", []byte("new")); err != nil {
		t.Fatal(err)
	}
	if err := e.Disconnect(ctx, "d", sink); err != nil {
		t.Fatal(err)
	}
	tw, _ := e.Get("d")
	if n := e.Stats().ConnectedDevices; n != 0 || tw.Presence.Connected {
		t.Errorf("after a rotation ended the only stream: ConnectedDevices = %d, twin connected = %v; want 0, false", n, tw.Presence.Connected)
	}
}

// TestReviewConnectedCountAfterRestart: after a restart the gauge starts at
// 0, yet the devices lost in the restart are counted down when their grace
// ends, so ConnectedDevices goes negative.
func TestReviewConnectedCountAfterRestart(t *testing.T) {
	ctx := context.Background()
	mem := vfs.NewMem()
	e := openMem(t, mem, Options{})
	if _, err := e.Create(ctx, CreateRequest{ID: "d"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Connect(ctx, "d", newRecSink()); err != nil {
		t.Fatal(err)
	}
	e.Close()
	e = openMem(t, mem, Options{PresenceGrace: time.Millisecond})
	defer e.Close()
	time.Sleep(5 * time.Millisecond)
	if err := e.RunTimers(ctx); err != nil {
		t.Fatal(err)
	}
	tw, _ := e.Get("d")
	if tw.Presence.Connected {
		t.Fatal("the lost device is still connected after its grace")
	}
	if n := e.Stats().ConnectedDevices; n != 0 {
		t.Errorf("ConnectedDevices = %d after the lost device went offline; want 0", n)
	}
}
