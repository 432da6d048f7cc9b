package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/twind-io/twind/twin"
)

// startReviewMember starts member n0 of a three-node cluster whose other
// two nodes are bare NATS servers (n1, n2), and returns it once the
// cluster has its log and buckets.
func startReviewMember(t *testing.T, lease time.Duration) (*Member, string) {
	t.Helper()
	addrs := []string{freeAddr(t), freeAddr(t), freeAddr(t)}
	for i := 1; i < 3; i++ {
		var peers []string
		for j, a := range addrs {
			if j != i {
				peers = append(peers, a)
			}
		}
		node, err := StartNode(NodeOptions{Name: fmt.Sprint("n", i), ClusterAddr: addrs[i], Peers: peers, StoreDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(node.Shutdown)
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	m, err := StartMember(ctx, MemberOptions{Node: "n0", ClusterAddr: addrs[0], Peers: addrs[1:], Lease: lease, Dir: dir, Addr: "api-0", Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m, dir
}

// runReviewMember runs m with an owner phase that opens the engine and
// reports on served, until the returned stop is called.
func runReviewMember(t *testing.T, m *Member, dir string, served chan<- time.Time) (stop func()) {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	engine := twin.Options{Dir: filepath.Join(dir, "store"), Logger: logger}
	owner := func(ctx context.Context, opts twin.Options, _ func() error) error {
		e, err := twin.Open(opts)
		if err != nil {
			return err
		}
		served <- time.Now()
		<-ctx.Done()
		return e.Close()
	}
	standby := func(ctx context.Context) error { <-ctx.Done(); return nil }
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := m.Run(ctx, engine, owner, standby); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	return func() { cancel(); wg.Wait() }
}

// A node whose Acquire wrote its owner record but could not fence the log
// (the log's stream electing a leader after the owner died, or the
// answer to the record's update lost) is left with a live record that
// names itself. It must take the shards with it at once: no other node
// may, and waiting for its own record to run out leaves the cluster
// without an owner for a whole lease.
func TestMemberTakesAShardItsOwnRecordHolds(t *testing.T) {
	const lease = 20 * time.Second
	m, dir := startReviewMember(t, lease)
	// What a half-done Acquire leaves: the record is n0's, the log has no
	// fence of n0's.
	expires := time.Now().Add(lease)
	rec, _ := json.Marshal(ownerRecord{Node: "n0", Addr: "api-0", Expires: expires.UnixNano()})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	_, err := m.shards.kv.Put(ctx, ownerKey(AllShards), rec)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan time.Time, 4)
	stop := runReviewMember(t, m, dir, served)
	defer stop()
	select {
	case at := <-served:
		if !at.Before(expires) {
			t.Fatalf("n0 served only at %s, once its own record had run out (%s)", at.Format(time.TimeOnly), expires.Format(time.TimeOnly))
		}
	case <-time.After(lease + 15*time.Second):
		t.Fatal("n0 never served")
	}
}

// armedClock is a fixed clock that tells, once armed, of the next time it
// is read.
type armedClock struct {
	t    time.Time
	mu   sync.Mutex
	read chan struct{} // closed on the first read once armed
}

func (c *armedClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.read != nil {
		close(c.read)
		c.read = nil
	}
	return c.t
}

func (c *armedClock) arm() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.read = make(chan struct{})
	return c.read
}

// Valid answers at once while a renewal waits for the owners' bucket (a
// bucket that lost its quorum, or elects a leader): an owner asks it
// before every call it serves and every append, and must not stall them
// all for the renewal's whole timeout.
func TestValidDoesNotWaitForARenewal(t *testing.T) {
	nodes := startCluster(t, 3)
	c := &armedClock{t: time.Now()}
	s := openShards(t, nodes[0], Options{Node: "a", Lease: time.Hour, Clock: c.Now})
	l, err := s.Acquire(context.Background(), 5)
	if err != nil {
		t.Fatal(err)
	}
	// The bucket loses its quorum: a renewal now waits for its timeout.
	nodes[1].Shutdown()
	nodes[2].Shutdown()
	read := c.arm()
	renewed := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		renewed <- l.Renew(ctx)
	}()
	<-read // the renewal is under way
	valid := l.Valid()
	select {
	case err := <-renewed:
		t.Fatalf("Valid returned only once the renewal had (%v)", err)
	default:
	}
	if !valid {
		t.Error("the lease is not valid an hour before it runs out")
	}
	if err := <-renewed; err == nil {
		t.Error("a renewal without the bucket's quorum succeeded")
	}
}
