package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// freeAddr returns a loopback address with a port free now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startCluster starts n embedded nodes that form one cluster, and returns
// them once JetStream answers with n replicas.
func startCluster(t *testing.T, n int) []*Node {
	t.Helper()
	addrs := make([]string, n)
	for i := range addrs {
		addrs[i] = freeAddr(t)
	}
	nodes := make([]*Node, n)
	for i := range nodes {
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
		nodes[i] = node
		t.Cleanup(node.Shutdown)
	}
	return nodes
}

// clock is a test clock that moves only when told.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// openShards connects to node and opens the shards as the given node name,
// retrying while the cluster elects its leaders.
func openShards(t *testing.T, node *Node, o Options) *Shards {
	t.Helper()
	nc, err := nats.Connect(node.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute) // a loaded machine forms a cluster slowly
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s, err := Open(ctx, js, o)
		cancel()
		if err == nil {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("Open on %s: %v", node.ClientURL(), err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// logOf returns the shard's log as strings, in order. It retries while
// the cluster's API answers nothing (a leader being elected).
func logOf(t *testing.T, s *Shards, vs uint16) []string {
	t.Helper()
	var err error
	for range 20 {
		var out []string
		if out, err = readLog(s, vs); err == nil {
			return out
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("reading shard %d's log: %v", vs, err)
	return nil
}

func readLog(s *Shards, vs uint16) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := s.log.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: []string{logSubject(vs)}})
	if err != nil {
		return nil, err
	}
	info, err := s.log.Info(ctx, jetstream.WithSubjectFilter(logSubject(vs)))
	if err != nil {
		return nil, err
	}
	var out []string
	for range info.State.Subjects[logSubject(vs)] {
		m, err := c.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			return nil, err
		}
		var f fenceRecord
		if json.Unmarshal(m.Data(), &f) == nil && f.Fence != "" {
			out = append(out, "fence:"+f.Fence)
		} else {
			out = append(out, string(m.Data()))
		}
	}
	return out, nil
}

// TestOwnershipAndFencing: a shard has one owner at a time; a node whose
// lease has not run out keeps it; once it has, another node takes the
// shard and fences its log, so the old owner, paused and unaware (its
// clock stood still), can append nothing more and learns it lost the shard.
func TestOwnershipAndFencing(t *testing.T) {
	ctx := context.Background()
	nodes := startCluster(t, 3)
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ca, cb := &clock{t: start}, &clock{t: start}
	a := openShards(t, nodes[0], Options{Node: "a", Lease: 5 * time.Second, Clock: ca.Now})
	b := openShards(t, nodes[1], Options{Node: "b", Lease: 5 * time.Second, Clock: cb.Now})

	la, err := a.Acquire(ctx, 7)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Acquire(ctx, 7); !errors.Is(err, ErrOwned) {
		t.Fatalf("b acquiring a shard a owns = %v; want ErrOwned", err)
	}
	for i := range 3 {
		if _, err := la.Append(ctx, []byte(fmt.Sprint("a", i))); err != nil {
			t.Fatalf("a's append %d: %v", i, err)
		}
	}
	// Another shard is b's to take.
	if _, err := b.Acquire(ctx, 8); err != nil {
		t.Fatalf("b acquiring a free shard: %v", err)
	}

	// Within the lease (and its drift margin), the shard stays a's.
	cb.Add(5 * time.Second)
	if _, err := b.Acquire(ctx, 7); !errors.Is(err, ErrOwned) {
		t.Fatalf("b acquiring within the drift margin = %v; want ErrOwned", err)
	}
	// a is paused: its clock stands still, its lease looks valid to it.
	// b's clock passes the lease and the margin: b takes over.
	cb.Add(2 * time.Second)
	lb, err := b.Acquire(ctx, 7)
	if err != nil {
		t.Fatalf("b acquiring after a's lease ran out: %v", err)
	}
	if !la.Valid() {
		t.Fatal("a's lease looks run out to a; the test needs a paused a")
	}
	if _, err := la.Append(ctx, []byte("a-late")); !errors.Is(err, ErrLost) {
		t.Fatalf("the old owner's append after the takeover = %v; want ErrLost (fenced)", err)
	}
	if la.Valid() {
		t.Error("a's lease is still valid after its append was fenced")
	}
	if err := la.Renew(ctx); !errors.Is(err, ErrLost) {
		t.Errorf("the old owner's renewal = %v; want ErrLost", err)
	}
	if _, err := lb.Append(ctx, []byte("b0")); err != nil {
		t.Fatalf("the new owner's append: %v", err)
	}
	if err := lb.Renew(ctx); err != nil {
		t.Errorf("the new owner's renewal: %v", err)
	}
	got := fmt.Sprint(logOf(t, b, 7))
	if want := "[fence:a a0 a1 a2 fence:b b0]"; got != want {
		t.Errorf("shard 7's log = %s; want %s", got, want)
	}
}

// TestFenceWithoutAppends: an idle shard is fenced too. Its old owner made
// no append, so the log's last sequence it expects is still the one after
// its own fence; the new owner's fence makes that stale.
func TestFenceWithoutAppends(t *testing.T) {
	ctx := context.Background()
	nodes := startCluster(t, 3)
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ca, cb := &clock{t: start}, &clock{t: start}
	a := openShards(t, nodes[0], Options{Node: "a", Lease: time.Second, Clock: ca.Now})
	b := openShards(t, nodes[2], Options{Node: "b", Lease: time.Second, Clock: cb.Now})
	la, err := a.Acquire(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	cb.Add(2 * time.Second)
	if _, err := b.Acquire(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := la.Append(ctx, []byte("late")); !errors.Is(err, ErrLost) {
		t.Fatalf("the idle old owner's append = %v; want ErrLost (fenced)", err)
	}
}

// TestFailoverWhenANodeDies: the node an owner is connected to dies; the
// two left keep the replicated log and the owners' bucket, and another
// node takes the shard once the lease runs out, with the old owner's
// appends in its log.
func TestFailoverWhenANodeDies(t *testing.T) {
	ctx := context.Background()
	nodes := startCluster(t, 3)
	const lease = time.Second
	a := openShards(t, nodes[0], Options{Node: "a", Lease: lease})
	b := openShards(t, nodes[1], Options{Node: "b", Lease: lease})
	la, err := a.Acquire(ctx, 3)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := la.Append(ctx, []byte("before")); err != nil {
		t.Fatal(err)
	}
	nodes[0].Shutdown()
	died := time.Now()
	var lb *Lease
	for lb == nil {
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		l, err := b.Acquire(actx, 3)
		cancel()
		switch {
		case err == nil:
			lb = l
		case time.Since(died) > 30*time.Second:
			t.Fatalf("no takeover within 30s of the owner's node dying: %v", err)
		default:
			time.Sleep(100 * time.Millisecond)
		}
	}
	took := time.Since(died)
	if took < lease {
		t.Errorf("b took the shard %v after a's node died, within a's lease of %v", took, lease)
	}
	t.Logf("b owns the shard %v after a's node died (lease %v)", took, lease)
	if _, err := lb.Append(ctx, []byte("after")); err != nil {
		t.Fatalf("the new owner's append with one node down: %v", err)
	}
	if got, want := fmt.Sprint(logOf(t, b, 3)), "[fence:a before fence:b after]"; got != want {
		t.Errorf("shard 3's log = %s; want %s", got, want)
	}
}

// TestReplicasAreFixed: a node started with another --replicas than the
// cluster's is refused, and the log keeps its copies.
func TestReplicasAreFixed(t *testing.T) {
	nodes := startCluster(t, 3)
	openShards(t, nodes[0], Options{Node: "a", Replicas: 3})
	nc, err := nats.Connect(nodes[1].ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := Open(ctx, js, Options{Node: "b", Replicas: 1}); !errors.Is(err, ErrReplicas) {
		t.Fatalf("Open with 1 replica on a log of 3 = %v; want ErrReplicas", err)
	}
	st, err := js.Stream(ctx, logStream)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.CachedInfo().Config.Replicas; got != 3 {
		t.Errorf("the log keeps %d copies after the refused node; want 3", got)
	}
}

func TestLastSequenceOf(t *testing.T) {
	err := &jetstream.APIError{Code: 400, ErrorCode: jetstream.JSErrCodeStreamWrongLastSequence, Description: "wrong last sequence: 42"}
	if seq, ok := lastSequenceOf(fmt.Errorf("publish: %w", err)); !ok || seq != 42 {
		t.Errorf("lastSequenceOf = %d, %v; want 42", seq, ok)
	}
	if _, ok := lastSequenceOf(errors.New("wrong last sequence")); ok {
		t.Error("lastSequenceOf found a sequence in an error that names none")
	}
}
