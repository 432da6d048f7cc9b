package vfstest_test

import (
	"fmt"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/twind-io/twind/twin/vfstest"
)

// A batch applied while the gate is held is visible before it is durable.
func Example() {
	gate := vfstest.NewGate(vfs.NewMem())
	db, err := pebble.Open("db", &pebble.Options{FS: gate})
	if err != nil {
		panic(err)
	}
	gate.Hold()
	b := db.NewBatch()
	b.Set([]byte("k"), []byte("v"), nil)
	if err := db.ApplyNoSyncWait(b, pebble.Sync); err != nil {
		panic(err)
	}
	v, closer, err := db.Get([]byte("k"))
	fmt.Printf("visible before its sync: %s %v\n", v, err)
	closer.Close()
	gate.Release()
	fmt.Println("sync:", b.SyncWait())
	b.Close()
	db.Close()
	// Output:
	// visible before its sync: v <nil>
	// sync: <nil>
}
