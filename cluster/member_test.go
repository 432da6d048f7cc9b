package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/twind-io/twind/twin"
)

// ownerSeat is where the test finds the engine of the node that owns the
// shards now.
type ownerSeat struct {
	mu     sync.Mutex
	node   string
	engine *twin.Engine
	served chan string // each node that starts serving
}

func (s *ownerSeat) get() (string, *twin.Engine) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.node, s.engine
}

// TestMembersHandOver: three members follow one log; the owner's changes
// reach every store, a member that stops hands the shards to another at
// once, and the new owner serves on from the same versions.
func TestMembersHandOver(t *testing.T) {
	addrs := []string{freeAddr(t), freeAddr(t), freeAddr(t)}
	seat := &ownerSeat{served: make(chan string, 16)}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	type running struct {
		m      *Member
		cancel context.CancelFunc
		done   chan error
		dir    string
	}
	nodes := make([]*running, 3)
	var startWG sync.WaitGroup
	for i := range nodes {
		startWG.Add(1)
		go func() {
			defer startWG.Done()
			var peers []string
			for j, a := range addrs {
				if j != i {
					peers = append(peers, a)
				}
			}
			dir := t.TempDir()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			m, err := StartMember(ctx, MemberOptions{Node: fmt.Sprint("n", i), ClusterAddr: addrs[i], Peers: peers,
				Lease: time.Second, Dir: dir, Addr: fmt.Sprint("api-", i), Logger: logger,
				// Followers lag, so that the next owner has the log's
				// tail to catch up with before it serves.
				applyDelay: 20 * time.Millisecond})
			if err != nil {
				t.Error(err)
				return
			}
			nodes[i] = &running{m: m, dir: dir, done: make(chan error, 1)}
		}()
	}
	startWG.Wait()
	if t.Failed() {
		for _, n := range nodes {
			if n != nil {
				n.m.Close()
			}
		}
		t.FailNow()
	}
	for i, n := range nodes {
		ctx, cancel := context.WithCancel(context.Background())
		n.cancel = cancel
		name := fmt.Sprint("n", i)
		engine := twin.Options{Dir: filepath.Join(n.dir, "store"), Logger: logger}
		owner := func(ctx context.Context, opts twin.Options, _ func() error) error {
			e, err := twin.Open(opts)
			if err != nil {
				return err
			}
			seat.mu.Lock()
			seat.node, seat.engine = name, e
			seat.mu.Unlock()
			seat.served <- name
			<-ctx.Done()
			seat.mu.Lock()
			seat.node, seat.engine = "", nil
			seat.mu.Unlock()
			return e.Close()
		}
		standby := func(ctx context.Context) error { <-ctx.Done(); return nil }
		go func() { n.done <- n.m.Run(ctx, engine, owner, standby) }()
	}
	defer func() {
		for _, n := range nodes {
			if n.cancel != nil {
				n.cancel()
				<-n.done
				n.m.Close()
			}
		}
	}()

	first := waitServed(t, seat)
	_, e := seat.get()
	ctx := context.Background()
	for i := range 30 {
		if _, err := e.Create(ctx, twin.CreateRequest{ID: fmt.Sprint("fridge-", i), Type: "fridge"}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Report(ctx, twin.PatchRequest{ID: fmt.Sprint("fridge-", i), Patch: twin.Document{"temp_c": float64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.PutRule("cold", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	rev := e.Revision()
	// The standbys lag behind the owner's log: the next owner must catch
	// up with it before it serves.
	var idx int
	fmt.Sscanf(first, "n%d", &idx)
	for i, n := range nodes {
		if i != idx && n.m.Applied() >= nodes[idx].m.Applied() {
			t.Fatalf("standby n%d has applied the log up to %d, as far as the owner: nothing to catch up with", i, n.m.Applied())
		}
	}

	// The owner's metrics: its appends, that it owns the shards, and each
	// node's lag.
	reg := prometheus.NewRegistry()
	reg.MustRegister(nodes[idx].m.Metrics())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		got[mf.GetName()] = mf
	}
	if mf := got["twind_cluster_append_seconds"]; mf == nil || mf.Metric[0].GetHistogram().GetSampleCount() == 0 {
		t.Errorf("twind_cluster_append_seconds = %v; want the owner's appends", mf)
	}
	if mf := got["twind_cluster_owner"]; mf == nil || mf.Metric[0].GetGauge().GetValue() != 1 {
		t.Errorf("twind_cluster_owner = %v; want 1 on the owner", mf)
	}
	if mf := got["twind_cluster_ownership_changes_total"]; mf == nil || mf.Metric[0].GetCounter().GetValue() < 1 {
		t.Errorf("twind_cluster_ownership_changes_total = %v; want at least 1 on the owner", mf)
	}

	// The owner stops: another node owns the shards well within a lease.
	stopped := time.Now()
	nodes[idx].cancel()
	if err := <-nodes[idx].done; err != nil {
		t.Errorf("the stopped owner's Run = %v", err)
	}
	nodes[idx].cancel = nil
	nodes[idx].m.Close()
	second := waitServed(t, seat)
	if second == first {
		t.Fatalf("%s served again after it stopped", second)
	}
	t.Logf("%s took over from %s %v after it stopped", second, first, time.Since(stopped))
	_, e = seat.get()
	if got := e.Revision(); got != rev {
		t.Errorf("the new owner is at revision %d; the old one ended at %d", got, rev)
	}
	tw, err := e.Report(ctx, twin.PatchRequest{ID: "fridge-7", Patch: twin.Document{"door": "open"}})
	if err != nil {
		t.Fatal(err)
	}
	if tw.Version != 3 || tw.Reported["temp_c"] != float64(7) {
		t.Errorf("fridge-7 on the new owner: version %d, reported %v; want version 3 with temp_c 7", tw.Version, tw.Reported)
	}
	if rules, err := e.Rules(); err != nil || rules["cold"] == nil {
		t.Errorf("the new owner's rules: %v, %v; want the rule 'cold'", rules, err)
	}
}

func waitServed(t *testing.T, seat *ownerSeat) string {
	t.Helper()
	select {
	case n := <-seat.served:
		return n
	case <-time.After(30 * time.Second):
		t.Fatal("no node served within 30s")
		return ""
	}
}
