// Package parallel splits CPU-bound work on independent items over the
// cores.
package parallel

import (
	"runtime"
	"sync"
)

// minPart is the fewest items worth a goroutine of their own.
const minPart = 64

// Ranges calls fn on ranges [lo, hi) that cover [0, n), from up to
// GOMAXPROCS goroutines at once (the last range on the caller's), and
// returns when every call has returned.
func Ranges(n int, fn func(lo, hi int)) {
	parts := min(runtime.GOMAXPROCS(0), n/minPart)
	if parts <= 1 {
		fn(0, n)
		return
	}
	var wg sync.WaitGroup
	for i := range parts - 1 {
		wg.Go(func() { fn(n*i/parts, n*(i+1)/parts) })
	}
	fn(n*(parts-1)/parts, n)
	wg.Wait()
}
