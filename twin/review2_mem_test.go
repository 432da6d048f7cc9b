package twin

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestRecentEventsMemory: the ring keeps the twin of each of the newest
// 4,096 events alive, whatever its size, also for twins deleted since: with
// documents near the 64 KiB limit that is hundreds of MiB that no option
// bounds (the Pebble cache and memtables are configurable, this is not).
func TestRecentEventsMemory(t *testing.T) {
	ctx := context.Background()
	e := openMem(t, vfs.NewMem(), Options{})
	defer e.Close()
	const n, size = 1000, 32 << 10
	for i := range n {
		id := fmt.Sprint("big", i%10)
		if i < 10 {
			if _, err := e.Create(ctx, CreateRequest{ID: id, Type: "planter"}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := e.Report(ctx, PatchRequest{ID: id, Patch: Document{"blob": fmt.Sprint(i, strings.Repeat("x", size))}}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 10 {
		if err := e.Delete(ctx, fmt.Sprint("big", i), 0); err != nil {
			t.Fatal(err)
		}
	}
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	with := heap()
	for i := range e.recent {
		e.recent[i].Store(nil)
	}
	without := heap()
	t.Logf("heap %d MiB with the ring, %d MiB without; no twin exists", with>>20, without>>20)
	if with-without > 8<<20 {
		t.Errorf("the ring of recent events holds %d MiB of twins (%d events of %d KiB), none of which exists any more",
			(with-without)>>20, n, size>>10)
	}
}
