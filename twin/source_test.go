package twin_test

import (
	"context"
	"slices"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/twind-io/twind/twin"
)

// TestSources checks that every change names who made it: the source given
// to each request is the source of its event, a deletion's, a token
// rotation's and a cancellation's included.
func TestSources(t *testing.T) {
	ctx := context.Background()
	e, err := twin.Open(twin.Options{Dir: "db", FS: vfs.NewMem(), VShards: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ops := twin.KeySource("ops")
	if _, err := e.Create(ctx, twin.CreateRequest{ID: "f1", Type: "fridge", Source: twin.KeySource("prov")}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.UpdateDesired(ctx, twin.PatchRequest{ID: "f1", Patch: twin.Document{"eco": true}, Source: ops}); err != nil {
		t.Fatal(err)
	}
	typ := "fridge2"
	if _, err := e.Update(ctx, twin.UpdateRequest{ID: "f1", Type: &typ, Source: ops}); err != nil {
		t.Fatal(err)
	}
	// A report carried by an operator's key is still what the device said:
	// it moves last_seen.
	tw, err := e.Report(ctx, twin.PatchRequest{ID: "f1", Patch: twin.Document{"temp_c": 4.0}, Source: ops})
	if err != nil {
		t.Fatal(err)
	}
	if tw.Presence.LastSeen.IsZero() {
		t.Errorf("a report with source %q left last_seen unset", ops)
	}
	cmd, err := e.SendCommand(ctx, twin.CommandRequest{DeviceID: "f1", Name: "defrost", Source: ops})
	if err != nil {
		t.Fatal(err)
	}
	if cmd, err = e.CancelCommandBy(ctx, cmd.ID, twin.KeySource("boss")); err != nil {
		t.Fatal(err)
	}
	if cmd.Source != ops || cmd.Message != "canceled by key:boss" {
		t.Errorf("canceled command: source %q, message %q; want %q, %q", cmd.Source, cmd.Message, ops, "canceled by key:boss")
	}
	evs, err := e.History("f1", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var got []twin.Source
	for _, ev := range evs {
		got = append(got, ev.Source)
	}
	want := []twin.Source{ops, ops, ops, "key:prov"} // newest first: report, update, desired, create
	if !slices.Equal(got, want) {
		t.Errorf("history sources = %q; want %q", got, want)
	}

	// A token rotation that ends a stream, and a deletion, name theirs too.
	if _, err := e.Connect(ctx, "f1", nopSink{}); err != nil {
		t.Fatal(err)
	}
	from := e.Revision() + 1
	if err := e.SetTokenHashBy(ctx, "f1", make([]byte, 32), "key:rotator"); err != nil {
		t.Fatal(err)
	}
	if err := e.DeleteBy(ctx, "f1", 0, "key:deleter"); err != nil {
		t.Fatal(err)
	}
	got = nil
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	e.Watch(wctx, from, func(ev *twin.Event) error {
		got = append(got, ev.Source)
		if ev.Kind == twin.KindDeleted {
			cancel()
		}
		return nil
	})
	if want := []twin.Source{"key:rotator", "key:deleter"}; !slices.Equal(got, want) {
		t.Errorf("sources of the rotation's presence event and the deletion = %q; want %q", got, want)
	}
}
