package parallel

import (
	"sync/atomic"
	"testing"
)

// TestRangesCoverEachItemOnce: every item is in exactly one range, for
// batches smaller and larger than a part.
func TestRangesCoverEachItemOnce(t *testing.T) {
	for _, n := range []int{0, 1, 63, 64, 65, 127, 128, 1000, 1001} {
		seen := make([]atomic.Int32, n)
		Ranges(n, func(lo, hi int) {
			for i := lo; i < hi; i++ {
				seen[i].Add(1)
			}
		})
		for i := range seen {
			if c := seen[i].Load(); c != 1 {
				t.Fatalf("n=%d: item %d seen %d times; want once", n, i, c)
			}
		}
	}
}
