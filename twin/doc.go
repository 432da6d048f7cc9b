// Package twin keeps the digital twins of devices: the document model (merge
// patches, delta, per-leaf metadata), the Pebble store, and the sharded
// engine that applies every change.
//
// A twin is one document per device: what it reported, what is desired of
// it, and the computed delta between the two. Changes are RFC 7396 merge
// patches; each committed change bumps the twin's version and gets a
// store-wide revision.
//
// Twins are partitioned by a hash of their id into a fixed number of virtual
// shards, recorded in the store when it is created, and the virtual shards
// are served by worker goroutines. A worker owns its twins: it alone applies
// their changes, so a twin's changes are totally ordered without locks. Each
// worker step writes the changes of many requests into one Pebble batch and
// commits it with a synced WAL; requests are answered, and readers and
// watchers see the changes, only once the batch is durable. Pebble is the
// home of every twin: a worker keeps the twins it used lately in a bounded
// cache and reads the others from the store when it needs them, so memory
// follows the configuration, not the fleet, and start-up reads no twin. The
// key layout is described in encoding.go.
//
// The files follow a change through the engine: options.go configures it,
// open.go opens the store and loads what the workers must know of their
// shards, requests.go hands requests to workers, worker.go runs a worker's
// steps, cache.go keeps the twins in use and reads the others, apply.go
// computes what each kind of request changes (with change.go's model and
// devices.go's and rules.go's commands, presence and rule effects),
// staged.go and commit.go write a step's batch, wait for its sync and
// publish it, snapshot.go gives readers the store as durable, and reads.go,
// merge.go and watch.go serve reads, lists and watches of what is durable.
// check.go verifies a stopped store's invariants.
package twin
