package twin

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestReview3TombstonesUnbounded: MaxMetadataBytes is meant to keep a twin
// small enough to read and send, but the tombstones of keys removed from
// desired (one JSON Pointer each, also a null in the delta sent to the
// device and returned by GetTwin) are not counted: while the device has
// not acknowledged, setting and removing keys grows them without bound,
// each patch within every limit.
func TestReview3TombstonesUnbounded(t *testing.T) {
	ctx := context.Background()
	lim := Limits{MaxMetadataBytes: 64 << 10} // small, to keep the test quick
	e := openMem(t, vfs.NewMem(), Options{Limits: lim})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "d", Type: "t"}); err != nil {
		t.Fatal(err)
	}
	const keys = 100
	var tw *Twin
	for round := range 10 {
		set, del := Document{}, Document{}
		for k := range keys {
			key := fmt.Sprintf("r%03dk%03d%s", round, k, strings.Repeat("x", 200))
			set[key], del[key] = 1.0, nil
		}
		if _, err := e.UpdateDesired(ctx, PatchRequest{ID: "d", Patch: set}); err != nil {
			t.Logf("round %d set: %v", round, err)
			return // refused: bounded
		}
		var err error
		if tw, err = e.UpdateDesired(ctx, PatchRequest{ID: "d", Patch: del}); err != nil {
			t.Logf("round %d remove: %v", round, err)
			return
		}
	}
	n := 0
	for p := range tw.Tombstones {
		n += len(p) + metaEntryBytes
	}
	rec := len(encodeRecord(record{Twin: tw}))
	t.Logf("%d tombstones, ~%d bytes; delta has %d keys; record %d bytes; desired is %v", len(tw.Tombstones), n, len(tw.Delta), rec, tw.Desired)
	if n > e.opts.Limits.MaxMetadataBytes {
		t.Errorf("desired's tombstones take ~%d bytes, over MaxMetadataBytes %d, with an empty desired: the limit does not bound them (record %d bytes)",
			n, e.opts.Limits.MaxMetadataBytes, rec)
	}
}

// TestReview3NegativeAckBeforeVersionCheck: a negative
// desired_acked_version is a malformed request whatever the twin's state,
// so it is INVALID_ARGUMENT even when expected_version is stale; patch
// checks the version first and answers FAILED_PRECONDITION, which tells
// the caller to re-read and retry the same malformed request.
func TestReview3NegativeAckBeforeVersionCheck(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	if _, err := e.Create(ctx, CreateRequest{ID: "d", Type: "t"}); err != nil {
		t.Fatal(err)
	}
	_, err := e.Report(ctx, PatchRequest{ID: "d", Patch: Document{}, ExpectedVersion: 99, DesiredAckedVersion: -2})
	if !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("report with expected_version 99 and desired_acked_version -2 = %v; want ErrInvalidArgument", err)
	}
}
