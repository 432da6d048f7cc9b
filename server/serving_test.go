package server

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// TestServingGate: a node whose lease lapsed refuses reads, writes and
// streams with UNAVAILABLE, and serves again once it may.
func TestServingGate(t *testing.T) {
	var lapsed atomic.Bool
	ts := startServer(t, nil, func(o *Options) {
		o.Serving = func() error {
			if lapsed.Load() {
				return errors.New("this node's lease on the shards has lapsed; retry")
			}
			return nil
		}
	})
	ctx := context.Background()
	if _, err := ts.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1"}}); err != nil {
		t.Fatal(err)
	}
	lapsed.Store(true)
	_, err := ts.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-1"})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "lapsed") {
		t.Errorf("GetTwin after the lease lapsed = %v; want UNAVAILABLE saying why", err)
	}
	if _, err := ts.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "car-1", Patch: mustStruct(t, map[string]any{"x": 1})}); status.Code(err) != codes.Unavailable {
		t.Errorf("UpdateDesired after the lease lapsed = %v; want UNAVAILABLE", err)
	}
	w, err := ts.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{})
	if err == nil {
		_, err = w.Recv()
	}
	if status.Code(err) != codes.Unavailable {
		t.Errorf("WatchTwins after the lease lapsed = %v; want UNAVAILABLE", err)
	}
	lapsed.Store(false)
	r, err := ts.twins.GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-1"})
	if err != nil || r.Twin.Version != 1 {
		t.Errorf("GetTwin once serving again = %v, %v; want version 1", r, err)
	}
}
