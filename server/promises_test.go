package server

import (
	"context"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// TestDeviceStreamPromises checks what the README's devices section says
// of two less common messages: a report with an empty patch is a heartbeat
// (acknowledged at the current version, it moves last_seen), and deleting
// a connected device's twin ends its stream with NOT_FOUND.
func TestDeviceStreamPromises(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	tok := createDevice(t, s, "car-1", "car")
	d := connect(t, s, &twinv1.Hello{DeviceId: "car-1", Token: tok}, true)
	d.next() // the welcome
	before, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-1"})
	if err != nil {
		t.Fatal(err)
	}
	d.send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: 1}}})
	ack := d.next().GetReportAck()
	if ack.GetSeq() != 1 || ack.GetError() != "" || ack.GetVersion() != before.Twin.Version {
		t.Errorf("ack of an empty report = %v; want seq 1 at version %d", ack, before.Twin.Version)
	}
	after, err := s.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-1"})
	if err != nil {
		t.Fatal(err)
	}
	if after.Twin.Version != before.Twin.Version || !after.Twin.Presence.LastSeen.AsTime().After(before.Twin.Presence.LastSeen.AsTime()) {
		t.Errorf("after a heartbeat: version %d (was %d), last_seen %v (was %v); want the same version, a later last_seen",
			after.Twin.Version, before.Twin.Version, after.Twin.Presence.LastSeen.AsTime(), before.Twin.Presence.LastSeen.AsTime())
	}
	if _, err := s.twins.DeleteTwin(ctx, &twinv1.DeleteTwinRequest{Id: "car-1"}); err != nil {
		t.Fatal(err)
	}
	if err := d.end(); status.Code(err) != codes.NotFound {
		t.Errorf("stream after its twin was deleted ended with %v; want NOT_FOUND", err)
	}
}
