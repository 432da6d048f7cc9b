package server

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// TestImportCanceledBeforeAnswer: a client that goes away before
// its batch is answered leaves the batch imported (the workers had it),
// and watchers must still get the import's marker, or a mirror never
// learns of those twins. The marker counted only answered batches.
func TestImportCanceledBeforeAnswer(t *testing.T) {
	s := startServer(t, nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for attempt := range 20 {
		var lines []string
		for i := range 2000 {
			lines = append(lines, fmt.Sprintf(`{"id":"t%d-%d","type":"x"}`, attempt, i))
		}
		sctx, scancel := context.WithCancel(ctx)
		stream, err := s.twins.ImportTwins(sctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := stream.Send(&twinv1.ImportTwinsRequest{Ndjson: []byte(strings.Join(lines, "\n"))}); err != nil {
			t.Fatal(err)
		}
		// Gone before the answer: once the engine has published some of
		// the batch, before the server could answer it.
		for deadline := time.Now().Add(5 * time.Second); s.engine.Len() == 2000*attempt && time.Now().Before(deadline); time.Sleep(100 * time.Microsecond) {
		}
		scancel()
		// Wait until the batch is wholly applied (a batch is all or
		// nothing per worker; every twin of it ends up imported).
		n := 2000 * (attempt + 1)
		for deadline := time.Now().Add(10 * time.Second); s.engine.Len() < n && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		}
		if got := s.engine.Len(); got != n {
			// The server did not take the batch before the cancel:
			// nothing to mark. Try again.
			t.Logf("attempt %d: %d twins, the batch did not arrive", attempt, got)
			continue
		}
		wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
		w2, err := s.twins.WatchTwins(wctx, &twinv1.WatchTwinsRequest{StartRevision: 1})
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for {
			m, err := w2.Recv()
			if err != nil {
				break
			}
			if ev := m.GetEvent(); ev.GetKind() == twinv1.TwinEventKind_TWIN_EVENT_KIND_IMPORTED {
				found = true
				break
			}
		}
		wcancel()
		if !found {
			t.Fatalf("attempt %d: the client left before its batch of %d twins was answered; the twins are imported but no IMPORTED event came in 5s", attempt, 2000)
		}
		return
	}
	t.Fatal("no attempt got the batch to the server before the cancel")
}
