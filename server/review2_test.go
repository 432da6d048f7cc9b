package server

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// connectHandlers returns the stacks of the goroutines inside the Connect
// handler itself.
func connectHandlers() []string {
	var out []string
	for _, g := range deviceGoroutines() {
		if strings.Contains(g, "server.(*deviceService).Connect(") {
			out = append(out, g)
		}
	}
	return out
}

// TestReplacedStreamBlockedInSend: a device that reads nothing holds its
// writer in Send; a newer stream of the same device replaces it before the
// send timer fires. The old handler then waits for the writer
// (<-writeErr), but only the handler's return can end that Send, and the
// stuck flag the send timer sets later is never looked at again: the old
// handler stays for as long as the device keeps its connection open, well
// past the send timeout.
func TestReplacedStreamBlockedInSend(t *testing.T) {
	ctx := context.Background()
	const sendTimeout = 2 * time.Second
	s := startServer(t, nil, func(o *Options) {
		o.DeviceSendTimeout = sendTimeout
		o.ShutdownTimeout = 200 * time.Millisecond
	})
	tok := createDevice(t, s, "fridge-1", "fridge")
	old := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, false) // never reads
	defer old.cancel()
	blob := strings.Repeat("x", 60_000)
	for i := range 40 {
		if _, err := s.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "fridge-1", Patch: mustStruct(t, map[string]any{"blob": fmt.Sprint(i, blob)})}); err != nil {
			t.Fatal(err)
		}
	}
	// The old writer is now blocked in Send; replace the stream before the
	// send timer cuts it off.
	cur := connect(t, s, &twinv1.Hello{DeviceId: "fridge-1", Token: tok}, true)
	defer cur.cancel()
	if cur.next().GetWelcome() == nil {
		t.Fatal("no welcome on the new stream")
	}
	time.Sleep(2 * sendTimeout)
	if h := connectHandlers(); len(h) != 1 {
		t.Errorf("%d Connect handlers running %v after the old stream was replaced; want 1 (the new stream's):\n%s",
			len(h), 2*sendTimeout, strings.Join(h, "\n\n"))
	}
}
