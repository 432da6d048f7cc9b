package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/twind-io/twind/cluster"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
	"github.com/twind-io/twind/twin"
)

// A cluster node run as a real twind process (the test binary, as
// TestMain says), on fixed loopback ports so that it can restart.
type clusterNode struct {
	name, api, peer, dir string
	peers                []string
	extra                []string // more flags; with --nats, the peers' are left out
	started              []string // what it logged until it joined the cluster
	d                    *daemon  // nil while stopped
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func newClusterNodes(t *testing.T, n int) []*clusterNode {
	nodes := make([]*clusterNode, n)
	for i := range nodes {
		nodes[i] = &clusterNode{name: fmt.Sprint("n", i+1), api: freePort(t), peer: freePort(t), dir: t.TempDir()}
	}
	for _, a := range nodes {
		for _, b := range nodes {
			if a != b {
				a.peers = append(a.peers, b.peer)
			}
		}
	}
	return nodes
}

// start starts the node's process and waits until it has joined the
// cluster.
func (c *clusterNode) start(t *testing.T, extra ...string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"--node", c.name, "--addr", c.api, "--data", c.dir, "--history-limit", "100000"}
	if len(c.extra) == 0 {
		args = append(args, "--cluster-listen", c.peer, "--cluster-peers", strings.Join(c.peers, ","))
	}
	args = append(append(args, c.extra...), extra...)
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), "TWIND_TEST_DAEMON=1")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{cmd: cmd, done: make(chan error, 1), lines: make(chan string, 100000), addr: c.api}
	// TWIND_CLUSTER_LOGS=DIR keeps each node's log in DIR/<node>.log.
	var logFile *os.File
	if dir := os.Getenv("TWIND_CLUSTER_LOGS"); dir != "" {
		if logFile, err = os.OpenFile(filepath.Join(dir, c.name+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if logFile != nil {
				fmt.Fprintln(logFile, sc.Text())
			}
			select {
			case d.lines <- c.name + ": " + sc.Text():
			default:
			}
		}
		if logFile != nil {
			logFile.Close()
		}
		d.done <- cmd.Wait()
	}()
	c.d = d
	// Generous: a loaded machine running the tests under -race forms a
	// cluster slowly.
	c.started = d.waitLogAny(t, 2*time.Minute, "joined the cluster")
}

func (c *clusterNode) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := c.d.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v to %s: %v", sig, c.name, err)
	}
}

// stop ends the node's process with sig and waits for it.
func (c *clusterNode) stop(t *testing.T, sig syscall.Signal) {
	t.Helper()
	c.signal(t, sig)
	select {
	case <-c.d.done:
	case <-time.After(30 * time.Second):
		c.d.cmd.Process.Kill()
		<-c.d.done
		t.Errorf("%s did not exit within 30s of %v", c.name, sig)
	}
	c.d = nil
}

// waitLogAny waits for a line of the daemon's log that contains any of
// the strings.
func (d *daemon) waitLogAny(t *testing.T, timeout time.Duration, wants ...string) []string {
	t.Helper()
	var seen []string
	deadline := time.After(timeout)
	for {
		select {
		case l := <-d.lines:
			seen = append(seen, l)
			for _, w := range wants {
				if strings.Contains(l, w) {
					return seen
				}
			}
		case <-deadline:
			t.Fatalf("twind did not log any of %q within %v; it logged:\n%s", wants, timeout, strings.Join(seen, "\n"))
		}
	}
}

// clusterClients are connections to every node.
type clusterClients struct {
	twins    []twinv1.TwinServiceClient
	devices  []twinv1.DeviceServiceClient
	commands []twinv1.CommandServiceClient
	cluster  []twinv1.ClusterServiceClient
}

func dialCluster(t *testing.T, nodes []*clusterNode) *clusterClients {
	c := &clusterClients{}
	for _, n := range nodes {
		conn, err := grpc.NewClient(n.api, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		c.twins = append(c.twins, twinv1.NewTwinServiceClient(conn))
		c.devices = append(c.devices, twinv1.NewDeviceServiceClient(conn))
		c.commands = append(c.commands, twinv1.NewCommandServiceClient(conn))
		c.cluster = append(c.cluster, twinv1.NewClusterServiceClient(conn))
	}
	return c
}

// retryable reports whether a call's outcome is unknown or it may succeed
// later: the node is down or changing roles.
func retryable(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.Aborted:
		return true
	}
	return false
}

// status asks any node that answers for the cluster's state.
func (c *clusterClients) status(ctx context.Context) (*twinv1.GetClusterStatusResponse, error) {
	var err error
	for _, cl := range c.cluster {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		var st *twinv1.GetClusterStatusResponse
		st, err = cl.GetClusterStatus(cctx, &twinv1.GetClusterStatusRequest{})
		cancel()
		if err == nil {
			return st, nil
		}
	}
	return nil, err
}

// owner waits until the cluster has an owner, and returns its index.
func (c *clusterClients) owner(t *testing.T, nodes []*clusterNode, not string) int {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		st, err := c.status(context.Background())
		if err == nil && st.Owner != "" && st.Owner != not {
			for i, n := range nodes {
				if n.name == st.Owner {
					return i
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("the cluster has no owner (other than %q) after 60s", not)
	return -1
}

// checker records every acknowledged change and command.
type checker struct {
	mu           sync.Mutex
	versions     map[string]map[int64]string // twin -> version -> "field=value" it acknowledged
	commands     map[string]string           // command id -> device
	acked        int
	ackTimes     []time.Time // of every acknowledged change, in order
	maxRev       int64       // the highest revision acknowledged
	deviceBreaks int
	breakWhy     []string // the first reasons
	unknown      int
	errs         []string
}

func (k *checker) ack(t *testing.T, id string, version, revision int64, write string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.acked++
	k.maxRev = max(k.maxRev, revision)
	k.ackTimes = append(k.ackTimes, time.Now())
	vs := k.versions[id]
	if vs == nil {
		vs = map[int64]string{}
		k.versions[id] = vs
	}
	if prev, ok := vs[version]; ok {
		k.errs = append(k.errs, fmt.Sprintf("%s version %d was acknowledged twice: for %s and for %s", id, version, prev, write))
	}
	vs[version] = write
}

// load drives writes, reports and commands through every node until ctx
// is done.
func (k *checker) load(ctx context.Context, t *testing.T, c *clusterClients, worker, twins int) {
	rng := rand.New(rand.NewPCG(uint64(worker), 7))
	for seq := 0; ctx.Err() == nil; seq++ {
		node := (worker + seq) % len(c.twins)
		id := fmt.Sprint("t-", rng.IntN(twins))
		field := fmt.Sprintf("w%d", worker)
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		var err error
		switch seq % 3 {
		case 0:
			var r *twinv1.UpdateDesiredResponse
			patch, _ := structpb.NewStruct(map[string]any{field: seq})
			if r, err = c.twins[node].UpdateDesired(cctx, &twinv1.UpdateDesiredRequest{Id: id, Patch: patch}); err == nil {
				k.ack(t, id, r.Twin.Version, r.Twin.Revision, "desired."+field+"="+strconv.Itoa(seq))
			}
		case 1:
			var r *twinv1.ReportStateResponse
			patch, _ := structpb.NewStruct(map[string]any{field: seq})
			if r, err = c.twins[node].ReportState(cctx, &twinv1.ReportStateRequest{Id: id, Patch: patch}); err == nil {
				k.ack(t, id, r.Twin.Version, r.Twin.Revision, "reported."+field+"="+strconv.Itoa(seq))
			}
		case 2:
			var r *twinv1.SendCommandResponse
			reqID := fmt.Sprintf("%d-%d", worker, seq)
			if r, err = c.commands[node].SendCommand(cctx, &twinv1.SendCommandRequest{DeviceId: id, Name: "ping", RequestId: reqID}); err == nil {
				k.mu.Lock()
				k.commands[r.Command.Id] = id
				k.acked++
				k.mu.Unlock()
			}
		}
		cancel()
		switch {
		case err == nil:
		case ctx.Err() != nil:
		case retryable(err):
			k.mu.Lock()
			k.unknown++
			k.mu.Unlock()
			time.Sleep(20 * time.Millisecond)
		case status.Code(err) == codes.ResourceExhausted:
			time.Sleep(50 * time.Millisecond) // a device's queue is full
		default:
			k.mu.Lock()
			k.errs = append(k.errs, fmt.Sprintf("worker %d, node %d: %v", worker, node, err))
			k.mu.Unlock()
		}
	}
}

// device reports over a Connect stream, through a node that changes each
// time the stream breaks; it says hello with the last desired version it
// was told of, and checks that the welcome never goes back in versions.
func (k *checker) device(ctx context.Context, c *clusterClients, id, token string) {
	// n numbers every report across reconnects: each one changes the twin
	// (a report that changes nothing keeps the version, and would look
	// like a version acknowledged twice).
	var lastVersion, acked, n int64
	for node := 0; ctx.Err() == nil; node++ {
		err := func() error {
			sctx, cancel := context.WithCancel(ctx)
			defer cancel()
			stream, err := c.devices[node%len(c.devices)].Connect(sctx)
			if err != nil {
				return err
			}
			if err := stream.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Hello{Hello: &twinv1.Hello{DeviceId: id, Token: token, LastVersion: lastVersion}}}); err != nil {
				return err
			}
			r, err := stream.Recv()
			if err != nil {
				return err
			}
			w := r.GetWelcome()
			if w == nil {
				return fmt.Errorf("the first message is %v, not a welcome", r)
			}
			if w.Version < acked {
				k.mu.Lock()
				k.errs = append(k.errs, fmt.Sprintf("%s: welcome at version %d after a report acknowledged at %d", id, w.Version, acked))
				k.mu.Unlock()
			}
			lastVersion = w.Version
			for seq := int64(1); ctx.Err() == nil; seq++ {
				n++
				patch, _ := structpb.NewStruct(map[string]any{"dev": n})
				if err := stream.Send(&twinv1.ConnectRequest{Msg: &twinv1.ConnectRequest_Report{Report: &twinv1.Report{Seq: seq, Patch: patch}}}); err != nil {
					return err
				}
				for {
					r, err := stream.Recv()
					if err != nil {
						return err
					}
					if u := r.GetDesiredUpdate(); u != nil {
						lastVersion = u.Version
					}
					if a := r.GetReportAck(); a != nil {
						if a.Error != "" {
							return errors.New(a.Error)
						}
						acked = a.Version
						k.ack(nil, id, a.Version, 0, "reported.dev="+strconv.Itoa(int(n)))
						break
					}
				}
				time.Sleep(10 * time.Millisecond)
			}
			return nil
		}()
		if err != nil && ctx.Err() == nil {
			k.mu.Lock()
			k.deviceBreaks++
			if len(k.breakWhy) < 5 {
				k.breakWhy = append(k.breakWhy, err.Error())
			}
			k.mu.Unlock()
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// watcher watches every change from revision 1 through any node, and
// resumes from the revision after the last it got whenever its stream
// ends, through the next node.
type watcher struct {
	mu      sync.Mutex
	next    int64                     // the revision to resume from
	seen    map[string]map[int64]bool // twin -> versions seen
	last    map[string]int64          // twin -> last version seen
	errs    []string
	resumes int
}

func (w *watcher) run(ctx context.Context, c *clusterClients) {
	w.next = 1
	for node := 0; ctx.Err() == nil; node++ {
		stream, err := c.twins[node%len(c.twins)].WatchTwins(ctx, &twinv1.WatchTwinsRequest{StartRevision: w.next})
		for err == nil {
			var r *twinv1.WatchTwinsResponse
			if r, err = stream.Recv(); err != nil {
				break
			}
			ev := r.Event
			w.mu.Lock()
			if ev.Revision < w.next {
				w.errs = append(w.errs, fmt.Sprintf("revision %d came after a resume from %d", ev.Revision, w.next))
			}
			w.next = ev.Revision + 1
			if tw := ev.Twin; tw != nil {
				// A presence change keeps the version; every other
				// change makes a new one.
				presence := ev.Kind == twinv1.TwinEventKind_TWIN_EVENT_KIND_PRESENCE
				if tw.Version < w.last[tw.Id] || (tw.Version == w.last[tw.Id] && !presence) {
					w.errs = append(w.errs, fmt.Sprintf("%s: version %d came after version %d", tw.Id, tw.Version, w.last[tw.Id]))
				}
				w.last[tw.Id] = tw.Version
				if w.seen[tw.Id] == nil {
					w.seen[tw.Id] = map[int64]bool{}
				}
				w.seen[tw.Id][tw.Version] = true
			}
			w.mu.Unlock()
		}
		w.mu.Lock()
		w.resumes++
		w.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TestClusterFaults runs three real twind nodes under load through all
// three, and kills the owner (SIGKILL), kills a standby, pauses the owner
// past its lease (SIGSTOP) and resumes it, wipes a standby's store, and
// stops the owner (SIGTERM: a handover). At the end every acknowledged
// change is in its twin's history, in version order, no version was
// acknowledged twice, every acknowledged command exists, and every node's
// store holds the same twins and histories.
func TestClusterFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three twind processes")
	}
	nodes := newClusterNodes(t, 3)
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Add(1)
		go func() { defer wg.Done(); n.start(t) }()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, n := range nodes {
			if n.d != nil {
				n.d.cmd.Process.Signal(syscall.SIGCONT)
				n.stop(t, syscall.SIGKILL)
			}
		}
	})
	c := dialCluster(t, nodes)
	owner := c.owner(t, nodes, "")
	const twins = 20
	created := time.Now()
	for i := range twins {
		for {
			if time.Since(created) > time.Minute {
				t.Fatal("the cluster did not take the twins' creation within a minute")
			}
			_, err := c.twins[i%3].CreateTwin(context.Background(), &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: fmt.Sprint("t-", i), Type: "planter"}})
			if err == nil || status.Code(err) == codes.AlreadyExists {
				break
			}
			if !retryable(err) {
				t.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	k := &checker{versions: map[string]map[int64]string{}, commands: map[string]string{}}
	ctx, stopLoad := context.WithCancel(context.Background())
	var load sync.WaitGroup
	w := &watcher{seen: map[string]map[int64]bool{}, last: map[string]int64{}}
	wctx, stopWatch := context.WithCancel(context.Background())
	var watching sync.WaitGroup
	watching.Add(1)
	go func() { defer watching.Done(); w.run(wctx, c) }()
	defer func() { stopWatch(); watching.Wait() }()
	for w := range 6 {
		load.Add(1)
		go func() { defer load.Done(); k.load(ctx, t, c, w, twins) }()
	}
	for i := range 3 {
		id := fmt.Sprint("d-", i)
		var token string
		for deadline := time.Now().Add(time.Minute); token == ""; {
			_, err := c.twins[i].CreateTwin(context.Background(), &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id, Type: "car"}})
			if err == nil || status.Code(err) == codes.AlreadyExists {
				r, err := c.twins[i].IssueDeviceToken(context.Background(), &twinv1.IssueDeviceTokenRequest{Id: id})
				if err == nil {
					token = r.Token
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("device %s: no token within a minute: %v", id, err)
			}
		}
		load.Add(1)
		go func() { defer load.Done(); k.device(ctx, c, id, token) }()
	}
	settle := func() { time.Sleep(3 * time.Second) }
	progress := func(what string) {
		k.mu.Lock()
		defer k.mu.Unlock()
		t.Logf("%s %s: %d acknowledged, %d unknown so far", time.Now().Format("15:04:05.000"), what, k.acked, k.unknown)
	}
	// outage measures the longest time after a fault at which no write
	// was acknowledged, over the 15s that follow it.
	outage := func(fault time.Time) time.Duration {
		time.Sleep(time.Until(fault.Add(15 * time.Second)))
		k.mu.Lock()
		defer k.mu.Unlock()
		var longest time.Duration
		last := fault
		for _, at := range k.ackTimes {
			if at.Before(fault) || at.After(fault.Add(20*time.Second)) {
				continue
			}
			longest = max(longest, at.Sub(last))
			last = at
		}
		return max(longest, fault.Add(15*time.Second).Sub(last))
	}
	settle()
	progress("before faults")

	// TWIND_CLUSTER_SOAK=N runs the faults N times over (a soak); the
	// default is once.
	rounds := 1
	if v := os.Getenv("TWIND_CLUSTER_SOAK"); v != "" {
		var err error
		if rounds, err = strconv.Atoi(v); err != nil || rounds < 1 {
			t.Fatalf("TWIND_CLUSTER_SOAK=%q: want a number of rounds", v)
		}
	}
	outages := map[string][]time.Duration{}
	for round := range rounds {
		t.Logf("round %d of %d", round+1, rounds)
		owner = c.owner(t, nodes, "")
		// 1. SIGKILL the owner.
		killed := time.Now()
		old := nodes[owner].name
		nodes[owner].stop(t, syscall.SIGKILL)
		owner2 := c.owner(t, nodes, old)
		took := time.Since(killed)
		d := outage(killed)
		outages["owner SIGKILL"] = append(outages["owner SIGKILL"], d)
		t.Logf("SIGKILL of owner %s: %s owns the shards %v after; no write was acknowledged for %v", old, nodes[owner2].name, took, d)
		nodes[owner].start(t)
		owner = owner2
		settle()
		progress("after the owner's SIGKILL")

		// 2. SIGKILL a standby, and restart it.
		standby := (owner + 1) % 3
		nodes[standby].stop(t, syscall.SIGKILL)
		settle()
		nodes[standby].start(t)
		settle()
		progress("after a standby's SIGKILL")

		// 3. SIGSTOP the owner past its lease, then resume it: it must see
		// that it lost the shards, and append nothing more.
		owner = c.owner(t, nodes, "")
		paused := nodes[owner]
		paused.signal(t, syscall.SIGSTOP)
		stoppedAt := time.Now()
		owner2 = c.owner(t, nodes, paused.name)
		d = outage(stoppedAt)
		outages["owner SIGSTOP"] = append(outages["owner SIGSTOP"], d)
		t.Logf("SIGSTOP of owner %s: %s owns the shards; no write was acknowledged for %v", paused.name, nodes[owner2].name, d)
		paused.signal(t, syscall.SIGCONT)
		// It stepped down as the owner, or, paused in the middle of its
		// takeover, gave the shards back.
		paused.d.waitLogAny(t, 30*time.Second, "no longer owns the shards", "gave the shards back")
		owner = owner2
		settle()
		progress("after the owner's SIGSTOP")

		// 4. Wipe a standby's store: it rebuilds from the others.
		standby = (owner + 1) % 3
		nodes[standby].stop(t, syscall.SIGKILL)
		if err := os.RemoveAll(nodes[standby].dir); err != nil {
			t.Fatal(err)
		}
		nodes[standby].start(t)
		settle()
		progress("after wiping a standby")

		// 5. SIGTERM the owner: it hands the shards over.
		owner = c.owner(t, nodes, "")
		termed := time.Now()
		old = nodes[owner].name
		nodes[owner].stop(t, syscall.SIGTERM)
		d = outage(termed)
		outages["owner SIGTERM"] = append(outages["owner SIGTERM"], d)
		t.Logf("SIGTERM of owner %s: no write was acknowledged for %v", old, d)
		nodes[owner].start(t)
		settle()
		progress("after the owner's SIGTERM")

	}
	for fault, ds := range outages {
		slices.Sort(ds)
		t.Logf("%s: longest time without an acknowledged write: median %v, worst %v, over %d", fault, ds[len(ds)/2], ds[len(ds)-1], len(ds))
	}

	stopLoad()
	load.Wait()
	if len(k.errs) > 0 {
		t.Errorf("%d errors, the first: %s", len(k.errs), strings.Join(k.errs[:min(len(k.errs), 10)], "\n"))
	}
	if k.acked < 100 {
		t.Errorf("only %d changes were acknowledged", k.acked)
	}

	// Every node catches up with the log.
	deadline := time.Now().Add(60 * time.Second)
	for {
		st, err := c.status(context.Background())
		caught := err == nil && len(st.Nodes) == 3
		if caught {
			for _, n := range st.Nodes {
				caught = caught && n.Lag == 0 && n.Role != "down"
			}
		}
		if caught {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the nodes did not catch up within 60s: %v %v", st, err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// The watcher, resumed across every failover, saw every acknowledged
	// change, each twin's versions in order.
	for deadline := time.Now().Add(60 * time.Second); ; {
		w.mu.Lock()
		caught := w.next > k.maxRev
		w.mu.Unlock()
		if caught {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the watcher did not reach revision %d within 60s (at %d)", k.maxRev, w.next)
		}
		time.Sleep(100 * time.Millisecond)
	}
	stopWatch()
	watching.Wait()
	for _, e := range w.errs[:min(len(w.errs), 10)] {
		t.Errorf("watch: %s", e)
	}
	missed := 0
	for id, vs := range k.versions {
		for v := range vs {
			if !w.seen[id][v] {
				if missed++; missed <= 10 {
					t.Errorf("watch: %s version %d was acknowledged, and never watched", id, v)
				}
			}
		}
	}
	t.Logf("the watcher resumed %d times, through every node", w.resumes)

	// Every acknowledged change is in its twin's history, in version
	// order; every acknowledged command exists.
	ids := []string{"d-0", "d-1", "d-2"}
	for i := range twins {
		ids = append(ids, fmt.Sprint("t-", i))
	}
	for i, id := range ids {
		events := history(t, c.twins[i%3], id)
		byVersion := map[int64]*twinv1.TwinEvent{}
		for j, ev := range events {
			v := ev.Twin.Version
			if j > 0 && v >= events[j-1].Twin.Version {
				t.Errorf("%s: history has version %d after version %d (newest first)", id, v, events[j-1].Twin.Version)
			}
			byVersion[v] = ev
		}
		for v, write := range k.versions[id] {
			ev := byVersion[v]
			if ev == nil {
				t.Errorf("%s: acknowledged version %d (%s) is not in the history", id, v, write)
				continue
			}
			doc, rest, _ := strings.Cut(write, ".")
			field, value, _ := strings.Cut(rest, "=")
			got := ev.Twin.Reported
			if doc == "desired" {
				got = ev.Twin.Desired
			}
			if f := got.GetFields()[field]; f == nil || strconv.Itoa(int(f.GetNumberValue())) != value {
				t.Errorf("%s version %d: %s is %v; the acknowledged write set %s", id, v, doc+"."+field, f, value)
			}
		}
	}
	for cmdID, device := range k.commands {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		r, err := c.commands[0].GetCommand(ctx, &twinv1.GetCommandRequest{Id: cmdID}, grpc.WaitForReady(true))
		cancel()
		if err != nil {
			t.Errorf("acknowledged command %s of %s: %v", cmdID, device, err)
		} else if r.Command.DeviceId != device {
			t.Errorf("command %s is for %s; it was sent to %s", cmdID, r.Command.DeviceId, device)
		}
	}

	// Every node's store holds the same twins and histories.
	owner = c.owner(t, nodes, "")
	for i, n := range nodes {
		if i != owner {
			n.stop(t, syscall.SIGTERM)
		}
	}
	nodes[owner].stop(t, syscall.SIGTERM)
	var want map[string]any
	for i, n := range nodes {
		got := storeTwins(t, filepath.Join(n.dir, "store"), ids)
		if i == 0 {
			want = got
			continue
		}
		if !reflect.DeepEqual(got, want) {
			for id := range want {
				if !reflect.DeepEqual(got[id], want[id]) {
					t.Errorf("%s: node %s has %v; node %s has %v", id, n.name, got[id], nodes[0].name, want[id])
				}
			}
		}
	}
	t.Logf("%d changes and %d commands acknowledged; %d calls of unknown outcome; device streams broke %d times, first for: %q", k.acked-len(k.commands), len(k.commands), k.unknown, k.deviceBreaks, k.breakWhy)
}

// history returns a twin's whole history, newest first.
func history(t *testing.T, c twinv1.TwinServiceClient, id string) []*twinv1.TwinEvent {
	t.Helper()
	var out []*twinv1.TwinEvent
	token := ""
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		r, err := c.ListTwinHistory(ctx, &twinv1.ListTwinHistoryRequest{Id: id, PageSize: 1000, PageToken: token}, grpc.WaitForReady(true))
		cancel()
		if err != nil {
			t.Fatalf("history of %s: %v", id, err)
		}
		out = append(out, r.Events...)
		if token = r.NextPageToken; token == "" {
			return out
		}
	}
}

// storeTwins opens a stopped node's store and returns its twins with
// their histories.
func storeTwins(t *testing.T, dir string, ids []string) map[string]any {
	t.Helper()
	e, err := twin.Open(twin.Options{Dir: dir, HistoryLimit: 100000})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	out := map[string]any{}
	for _, id := range ids {
		tw, err := e.Get(id)
		if errors.Is(err, twin.ErrNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		h, err := e.History(id, 0, 100000)
		if err != nil {
			t.Fatal(err)
		}
		var hist []string
		for _, ev := range h {
			hist = append(hist, fmt.Sprint(ev.Revision, ev.Twin.Version, ev.Twin.Reported, ev.Twin.Desired))
		}
		out[id] = fmt.Sprint(tw.Version, tw.Revision, tw.Reported, tw.Desired, hist)
	}
	return out
}

// TestOwnerPhaseTwice: a node that owns the shards, loses them and takes
// them again serves again, in the same process and on the same listener.
func TestOwnerPhaseTwice(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := newDispatcher(l)
	defer d.close()
	dir := t.TempDir()
	served := make(chan struct{}, 1)
	opts := server.Options{DataDir: dir, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Ready: func(net.Addr) { served <- struct{}{} }}
	opts.EnsureDefaults()
	phase := ownerPhase(opts, d, prometheus.NewCounter(prometheus.CounterOpts{Name: "twind_test_total", Help: "test"}))
	engine := opts.Engine
	c := dial(t, l.Addr().String())
	for i := range 2 {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- phase(ctx, engine, func() error { return nil }) }()
		select {
		case <-served:
		case err := <-done:
			cancel()
			t.Fatalf("owner phase %d ended before serving: %v", i+1, err)
		}
		id := fmt.Sprint("fridge-", i)
		if _, err := c.CreateTwin(context.Background(), &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id}}, grpc.WaitForReady(true)); err != nil {
			t.Errorf("owner phase %d: CreateTwin: %v", i+1, err)
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("owner phase %d ended with %v", i+1, err)
		}
	}
}

// TestExternalNATS: twind nodes on an existing NATS cluster (--nats) take
// the shards, answer through either node, and warn that the cluster must
// sync every write.
func TestExternalNATS(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a NATS cluster and two twind processes")
	}
	routes := []string{freePort(t), freePort(t), freePort(t)}
	var urls []string
	var natsNodes []*cluster.Node
	for i, r := range routes {
		var peers []string
		for j, p := range routes {
			if j != i {
				peers = append(peers, p)
			}
		}
		n, err := cluster.StartNode(cluster.NodeOptions{Name: fmt.Sprint("nats-", i), ClusterAddr: r, Peers: peers, StoreDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(n.Shutdown)
		urls = append(urls, n.ClientURL())
		natsNodes = append(natsNodes, n)
	}
	nodes := newClusterNodes(t, 2)
	for _, n := range nodes {
		n.extra = []string{"--nats", strings.Join(urls, ",")}
	}
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Add(1)
		go func() { defer wg.Done(); n.start(t) }()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, n := range nodes {
			if n.d != nil {
				n.stop(t, syscall.SIGKILL)
			}
		}
	})
	c := dialCluster(t, nodes)
	c.owner(t, nodes, "")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.twins[0].CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "car-1", Type: "car"}}, grpc.WaitForReady(true)); err != nil {
		t.Fatal(err)
	}
	r, err := c.twins[1].GetTwin(ctx, &twinv1.GetTwinRequest{Id: "car-1"}, grpc.WaitForReady(true))
	if err != nil || r.Twin.Version != 1 {
		t.Fatalf("GetTwin through the other node = %v, %v; want version 1", r, err)
	}
	// Without a quorum, every node answers UNAVAILABLE, and health says
	// NOT_SERVING.
	natsNodes[0].Shutdown()
	natsNodes[1].Shutdown()
	for i, n := range nodes {
		conn, err := grpc.NewClient(n.api, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		health := healthpb.NewHealthClient(conn)
		deadline := time.Now().Add(60 * time.Second)
		for {
			hctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			h, herr := health.Check(hctx, &healthpb.HealthCheckRequest{})
			_, gerr := c.twins[i].GetTwin(hctx, &twinv1.GetTwinRequest{Id: "car-1"})
			cancel()
			if herr == nil && h.Status == healthpb.HealthCheckResponse_NOT_SERVING && status.Code(gerr) == codes.Unavailable {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s without a quorum: health %v (%v), GetTwin %v; want NOT_SERVING and UNAVAILABLE", n.name, h, herr, gerr)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	for _, n := range nodes {
		if log := strings.Join(n.started, "\n"); !strings.Contains(log, "sync_interval: always") {
			t.Errorf("%s did not warn that the NATS cluster must sync every write; it logged:\n%s", n.name, log)
		}
		n.stop(t, syscall.SIGTERM)
	}
}

// TestClusterFlags: cluster flags that are missing, contradictory or
// malformed are refused before anything starts, saying what to fix.
func TestClusterFlags(t *testing.T) {
	base := []string{"--addr", "127.0.0.1:50999", "--data", t.TempDir()}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--node", "n1"}, "needs --cluster-listen"},
		{[]string{"--cluster-peers", "a:1"}, "needs --node"},
		{[]string{"--node", "n1", "--cluster-listen", "127.0.0.1:7201"}, "--cluster-peers"},
		{[]string{"--node", "n1", "--nats", "nats://a:4222", "--cluster-listen", "127.0.0.1:7201"}, "does not go with --cluster-listen"},
		{[]string{"--node", "n1", "--cluster-listen", "127.0.0.1:7201", "--cluster-peers", "garbage"}, `--cluster-peers "garbage": want host:port`},
		{[]string{"--node", "n1", "--cluster-listen", "127.0.0.1:7201", "--cluster-peers", "a:99999"}, "the port must be a number"},
		{[]string{"--node", "n1", "--cluster-listen", "nocolon", "--cluster-peers", "a:1"}, "--cluster-listen"},
		{[]string{"--node", "n1", "--cluster-listen", "127.0.0.1:7201", "--cluster-peers", "a:1", "--lease", "10ms"}, "at least 1s"},
		{[]string{"--node", "n1", "--cluster-listen", "127.0.0.1:7201", "--cluster-peers", "a:1", "--advertise-addr", "foo"}, "--advertise-addr"},
		{[]string{"--node", "n1", "--cluster-listen", "127.0.0.1:7201", "--cluster-peers", "a:1", "--tls-cert", "c.pem", "--tls-key", "k.pem"}, "does not serve TLS"},
		{[]string{"--addr", "127.0.0.1:0", "--node", "n1", "--cluster-listen", "127.0.0.1:7201", "--cluster-peers", "a:1"}, "needs a fixed port"},
		{[]string{"--addr", "0.0.0.0:50051", "--node", "n1", "--cluster-listen", "127.0.0.1:7201", "--cluster-peers", "a:1"}, "set --advertise-addr"},
	} {
		err := run(append(append([]string(nil), base...), c.args...))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("twind %s = %v; want an error saying %q", strings.Join(c.args, " "), err, c.want)
		}
	}
	t.Setenv("TWIND_LEASE", "soon")
	if err := run(append(base, "--node", "n1", "--cluster-listen", "127.0.0.1:7201", "--cluster-peers", "a:1")); err == nil || !strings.Contains(err.Error(), "TWIND_LEASE") {
		t.Errorf("TWIND_LEASE=soon: %v; want an error naming TWIND_LEASE", err)
	}
}
