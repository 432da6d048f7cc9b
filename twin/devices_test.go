package twin

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// recSink records what the engine tells a device.
type recSink struct {
	mu     sync.Mutex
	events []string
	closed error
	ch     chan struct{} // signalled on every call
}

func newRecSink() *recSink { return &recSink{ch: make(chan struct{}, 100)} }

func (s *recSink) add(e string) {
	s.mu.Lock()
	s.events = append(s.events, e)
	s.mu.Unlock()
	s.ch <- struct{}{}
}

func (s *recSink) Welcome(t *Twin, cmds []*Command) {
	e := fmt.Sprintf("welcome v%d", t.Version)
	for _, c := range cmds {
		e += " " + c.ID + ":" + c.State.String()
	}
	s.add(e)
}
func (s *recSink) DesiredChanged(t *Twin, p Document) {
	s.add(fmt.Sprintf("desired v%d %v", t.Version, p))
}
func (s *recSink) Commands(cmds []*Command) {
	for _, c := range cmds {
		s.add("command " + c.ID + ":" + c.State.String())
	}
}
func (s *recSink) Close(err error) {
	s.mu.Lock()
	s.closed = err
	s.mu.Unlock()
	s.add("closed")
}

// wait waits for the sink to have n events and returns them.
func (s *recSink) wait(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		s.mu.Lock()
		if len(s.events) >= n {
			ev := append([]string(nil), s.events...)
			s.mu.Unlock()
			return ev
		}
		s.mu.Unlock()
		select {
		case <-s.ch:
		case <-deadline:
			t.Fatalf("sink has %v; want %d events", s.events, n)
		}
	}
}

func TestDeviceFlow(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	e := openMem(t, fs, Options{})
	if _, err := e.Create(ctx, CreateRequest{ID: "car-1", Type: "car"}); err != nil {
		t.Fatal(err)
	}
	// A command to an offline device waits in its queue.
	c1, err := e.SendCommand(ctx, CommandRequest{DeviceID: "car-1", Name: "honk", RequestID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	if c1.ID != "car-1~1" || c1.State != CommandQueued {
		t.Errorf("command %s %s; want car-1~1 QUEUED", c1.ID, c1.State)
	}
	again, err := e.SendCommand(ctx, CommandRequest{DeviceID: "car-1", Name: "honk", RequestID: "r1"})
	if err != nil || again.ID != c1.ID {
		t.Errorf("repeated request_id gave %v, %v; want %s", again, err, c1.ID)
	}
	if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: "nope", Name: "honk"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("command to unknown twin = %v; want ErrNotFound", err)
	}

	s1 := newRecSink()
	tw, err := e.Connect(ctx, "car-1", s1)
	if err != nil || !tw.Presence.Connected {
		t.Fatalf("Connect = %v, %v", tw, err)
	}
	if got := s1.wait(t, 1)[0]; got != "welcome v1 car-1~1:SENT" {
		t.Errorf("first message %q; want the welcome with the queued command", got)
	}
	if _, err := e.UpdateDesired(ctx, PatchRequest{ID: "car-1", Patch: Document{"locked": true}}); err != nil {
		t.Fatal(err)
	}
	c2, err := e.SendCommand(ctx, CommandRequest{DeviceID: "car-1", Name: "navigate", Params: Document{"lat": 52.5}})
	if err != nil || c2.State != CommandSent {
		t.Fatalf("command to a connected device = %v, %v; want SENT", c2, err)
	}
	ev := s1.wait(t, 3)
	if ev[1] != "desired v2 map[locked:true]" || ev[2] != "command car-1~2:SENT" {
		t.Errorf("events %q", ev)
	}

	// The device finishes the first command; a waiter sees it.
	waited := make(chan *Command, 1)
	go func() {
		c, _ := e.WaitCommand(ctx, c1.ID)
		waited <- c
	}()
	if _, err := e.UpdateCommand(ctx, "car-1", CommandUpdate{ID: c1.ID, State: CommandAccepted}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.UpdateCommand(ctx, "car-1", CommandUpdate{ID: c1.ID, State: CommandSucceeded, Result: Document{"ok": true}}); err != nil {
		t.Fatal(err)
	}
	if c := <-waited; c.State != CommandSucceeded {
		t.Errorf("waiter got %s; want SUCCEEDED", c.State)
	}
	if _, err := e.UpdateCommand(ctx, "car-1", CommandUpdate{ID: c1.ID, State: CommandFailed}); !errors.Is(err, ErrVersionMismatch) {
		t.Errorf("update of a finished command = %v; want ErrVersionMismatch", err)
	}

	// A second stream replaces the first, which is closed.
	s2 := newRecSink()
	if _, err := e.Connect(ctx, "car-1", s2); err != nil {
		t.Fatal(err)
	}
	s1.wait(t, 4)
	if !errors.Is(s1.closed, ErrReplaced) {
		t.Errorf("first stream closed with %v; want ErrReplaced", s1.closed)
	}
	if got := s2.wait(t, 1)[0]; got != "welcome v2 car-1~2:SENT" {
		t.Errorf("second welcome %q; want the unfinished command again", got)
	}
	// The old stream's disconnect does not mark the device offline.
	if err := e.Disconnect(ctx, "car-1", s1); err != nil {
		t.Fatal(err)
	}
	if tw, _ := e.Get("car-1"); !tw.Presence.Connected {
		t.Errorf("stale disconnect marked the device offline")
	}
	if err := e.Disconnect(ctx, "car-1", s2); err != nil {
		t.Fatal(err)
	}
	if tw, _ := e.Get("car-1"); tw.Presence.Connected || tw.Version != 2 {
		t.Errorf("after disconnect: connected %v version %d; want false, 2 (presence bumps no version)", tw.Presence.Connected, tw.Version)
	}

	// Cancel, and restart: unfinished commands survive.
	c3, _ := e.SendCommand(ctx, CommandRequest{DeviceID: "car-1", Name: "honk"})
	if c, err := e.CancelCommand(ctx, c3.ID); err != nil || c.State != CommandCanceled {
		t.Errorf("CancelCommand = %v, %v", c, err)
	}
	if _, err := e.CancelCommand(ctx, c3.ID); !errors.Is(err, ErrFinished) {
		t.Errorf("second cancel = %v; want ErrFinished", err)
	}
	e.Close()
	e = openMem(t, fs, Options{})
	defer e.Close()
	cmds, _, err := e.ListCommands("car-1", nil, 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	var states []string
	for _, c := range cmds {
		states = append(states, c.ID+":"+c.State.String())
	}
	if fmt.Sprint(states) != "[car-1~1:SUCCEEDED car-1~2:SENT car-1~3:CANCELED]" {
		t.Errorf("commands after restart: %v", states)
	}
	s3 := newRecSink()
	if _, err := e.Connect(ctx, "car-1", s3); err != nil {
		t.Fatal(err)
	}
	if got := s3.wait(t, 1)[0]; got != "welcome v2 car-1~2:SENT" {
		t.Errorf("welcome after restart %q", got)
	}
	// Deleting the twin closes its stream; re-created, its command ids
	// continue.
	if err := e.Delete(ctx, "car-1", 0); err != nil {
		t.Fatal(err)
	}
	s3.wait(t, 2)
	if !errors.Is(s3.closed, ErrNotFound) {
		t.Errorf("stream of a deleted twin closed with %v", s3.closed)
	}
	e.Create(ctx, CreateRequest{ID: "car-1"})
	c4, err := e.SendCommand(ctx, CommandRequest{DeviceID: "car-1", Name: "honk"})
	if err != nil || c4.ID != "car-1~4" {
		t.Errorf("command after re-create = %v, %v; want car-1~4", c4, err)
	}
}

func TestCommandExpiryAndQueueLimit(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{CommandQueueLimit: 2})
	defer e.Close()
	e.Create(ctx, CreateRequest{ID: "p1", Type: "planter"})
	short, err := e.SendCommand(ctx, CommandRequest{DeviceID: "p1", Name: "water", TTL: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: "p1", Name: "water"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: "p1", Name: "water"}); !errors.Is(err, ErrOverloaded) {
		t.Errorf("third command with a queue of 2 = %v; want ErrOverloaded", err)
	}
	// Expiry happens on time while the device stays offline.
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := e.WaitCommand(wctx, short.ID)
	if err != nil || c.State != CommandExpired {
		t.Fatalf("WaitCommand = %v, %v; want EXPIRED", c, err)
	}
	if _, err := e.SendCommand(ctx, CommandRequest{DeviceID: "p1", Name: "water"}); err != nil {
		t.Errorf("after expiry the queue has room, but: %v", err)
	}
	for _, bad := range []CommandRequest{
		{DeviceID: "p1", Name: ""},
		{DeviceID: "p1", Name: "has space"},
		{DeviceID: "p1", Name: "x", TTL: 30 * 24 * time.Hour},
		{DeviceID: "p1", Name: "x", TTL: -time.Second},
	} {
		if _, err := e.SendCommand(ctx, bad); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("SendCommand(%+v) = %v; want ErrInvalidArgument", bad, err)
		}
	}
	if _, err := e.GetCommand("garbage"); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("GetCommand(garbage) = %v", err)
	}
}

func TestStats(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	e.Create(ctx, CreateRequest{ID: "a"})
	e.Create(ctx, CreateRequest{ID: "b"})
	s1, s2, s3 := newRecSink(), newRecSink(), newRecSink()
	e.Connect(ctx, "a", s1)
	e.Connect(ctx, "a", s2) // replaces s1
	e.Connect(ctx, "b", s3)
	e.Disconnect(ctx, "a", s1) // stale: changes nothing
	e.SendCommand(ctx, CommandRequest{DeviceID: "b", Name: "x"})
	c, _ := e.SendCommand(ctx, CommandRequest{DeviceID: "a", Name: "y"})
	e.CancelCommand(ctx, c.ID)
	e.Delete(ctx, "b", 0) // closes s3
	st := e.Stats()
	if st.Twins != 1 || st.ConnectedDevices != 1 || st.CommandsSent != 2 || st.CommandsFinished != 1 || st.Changes < 4 || st.Commits == 0 {
		t.Errorf("stats %+v", st)
	}
	e.Disconnect(ctx, "a", s2)
	if st := e.Stats(); st.ConnectedDevices != 0 {
		t.Errorf("connected after the last disconnect = %d", st.ConnectedDevices)
	}
}

// TestReportWithTokenHash: a report made with a device token applies only
// while the twin's token is that one, so a report in flight when the token
// is rotated is refused, as a stream's reports are.
func TestReportWithTokenHash(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "f"}); err != nil {
		t.Fatal(err)
	}
	old, rotated := sha256.Sum256([]byte("old")), sha256.Sum256([]byte("new"))
	if _, err := e.Report(ctx, PatchRequest{ID: "f", Patch: Document{"t": 1.0}, TokenHash: old[:]}); !errors.Is(err, ErrTokenRevoked) {
		t.Errorf("a report with a token the twin has not = %v; want ErrTokenRevoked", err)
	}
	if err := e.SetTokenHash(ctx, "f", old[:]); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "f", Patch: Document{"t": 2.0}, TokenHash: old[:]}); err != nil {
		t.Errorf("a report with the twin's token: %v", err)
	}
	if err := e.SetTokenHash(ctx, "f", rotated[:]); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Report(ctx, PatchRequest{ID: "f", Patch: Document{"t": 3.0}, TokenHash: old[:]}); !errors.Is(err, ErrTokenRevoked) {
		t.Errorf("a report with the rotated-away token = %v; want ErrTokenRevoked", err)
	}
	if tw, _ := e.Get("f"); tw.Reported["t"] != 2.0 {
		t.Errorf("reported t = %v; want 2 (the refused reports changed nothing)", tw.Reported["t"])
	}
}
