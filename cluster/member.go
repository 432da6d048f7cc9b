package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/twind-io/twind/twin"
)

// nodesBucket holds each node's report of itself: its role, its API
// address and how far it has applied the log.
const nodesBucket = "twind_nodes"

// MemberOptions configure a twind node of a cluster.
type MemberOptions struct {
	// Node is this node's name, unique in the cluster.
	Node string
	// ClusterAddr and Peers: where this node's embedded NATS server meets
	// its peers, and theirs. Unused with NATS.
	ClusterAddr string
	Peers       []string
	// NATS, if set, are the URLs of an existing NATS cluster to use
	// instead of an embedded server.
	NATS []string
	// Replicas is how many nodes hold each write. Default 3.
	Replicas int
	// Lease is how long an owner owns the shards without renewing.
	// Default 5s.
	Lease time.Duration
	// Dir holds the embedded NATS server's storage.
	Dir string
	// Addr is where this node serves the API, for other nodes to forward
	// calls to.
	Addr string
	// Logger receives the member's logs. Default slog.Default().
	Logger *slog.Logger

	// applyDelay slows the follower down, for tests of a takeover by a
	// node that lags.
	applyDelay time.Duration
}

// Role is a node's part in the cluster.
type Role string

// Roles.
const (
	RoleStandby Role = "standby"
	RoleOwner   Role = "owner"
	RoleDown    Role = "down"
)

// Member is this node's place in the cluster: it owns the virtual shards
// and serves them, or follows the log into its store and lets calls go to
// the owner.
type Member struct {
	opts   MemberOptions
	node   *Node // nil with an external NATS cluster
	nc     *nats.Conn
	shards *Shards
	nodes  jetstream.KeyValue

	role    atomic.Value  // Role
	applied atomic.Uint64 // the last log position this node's store holds

	mu        sync.Mutex
	ownerNode string // the owner as last read, and whether its lease runs
	ownerAddr string
	ownerLive bool
	ownerErr  error
	// ownerGoneSince is when this node first saw no live owner.
	ownerGoneSince time.Time
	peers          map[string]nodeRecord // the nodes' reports, as watched
	logLast        uint64                // the log's last position, as last read
	statusAt       time.Time             // when logLast was read

	changes atomic.Int64 // ownership changes this node made
	metrics *metrics
}

// StartMember starts this node's NATS server (unless it uses an existing
// cluster), connects to it, and waits until the cluster has the
// replicated log and buckets, or ctx is done.
func StartMember(ctx context.Context, o MemberOptions) (*Member, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Replicas <= 0 {
		o.Replicas = 3
	}
	m := &Member{opts: o, peers: map[string]nodeRecord{}}
	m.metrics = newMetrics(m)
	m.role.Store(RoleStandby)
	url := ""
	if len(o.NATS) > 0 {
		for i, u := range o.NATS {
			if i > 0 {
				url += ","
			}
			url += u
		}
	} else {
		n, err := StartNode(NodeOptions{Name: o.Node, ClusterAddr: o.ClusterAddr, Peers: o.Peers, StoreDir: filepath.Join(o.Dir, "jetstream")})
		if err != nil {
			return nil, err
		}
		m.node = n
		url = n.ClientURL()
	}
	nc, err := nats.Connect(url, nats.Name("twind "+o.Node), nats.MaxReconnects(-1), nats.ReconnectWait(250*time.Millisecond))
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("cluster: connect to NATS at %s: %w", url, err)
	}
	m.nc = nc
	js, err := jetstream.New(nc)
	if err != nil {
		m.Close()
		return nil, err
	}
	for wait := time.Duration(0); ; wait = 250 * time.Millisecond {
		select {
		case <-ctx.Done():
			m.Close()
			return nil, fmt.Errorf("cluster: the cluster did not form (a first start needs --replicas nodes up, later a majority of them): %w", errors.Join(ctx.Err(), err))
		case <-time.After(wait):
		}
		// A request made before the cluster has elected its leaders goes
		// unanswered: ask again, often.
		octx, cancel := context.WithTimeout(ctx, 2*time.Second)
		m.shards, err = Open(octx, js, Options{Node: o.Node, Addr: o.Addr, Replicas: o.Replicas, Lease: o.Lease})
		if err == nil {
			m.nodes, err = ensureBucket(octx, js, jetstream.KeyValueConfig{
				Bucket: nodesBucket, Storage: jetstream.FileStorage, Replicas: m.shards.opts.Replicas, History: 1,
			})
		}
		cancel()
		if err == nil {
			break
		}
		if errors.Is(err, ErrReplicas) {
			m.Close()
			return nil, err
		}
		if strings.Contains(err.Error(), "no suitable peers") {
			// A new cluster's log needs all its replicas up to be made.
			o.Logger.Info("waiting for the cluster to form: the first start needs as many nodes up as --replicas", "replicas", o.Replicas, "err", err)
			continue
		}
		o.Logger.Info("waiting for the cluster to form", "err", err)
	}
	if err := m.checkName(ctx); err != nil {
		m.Close()
		return nil, err
	}
	if len(o.NATS) > 0 {
		m.warnLazySync()
	}
	return m, nil
}

// checkName refuses a node whose name another running twind has: two
// nodes of one name would take the shards from each other. A record of
// the name that another process updated within the last seconds may be
// this node's own before a restart: it is another node only if it is
// updated again.
func (m *Member) checkName(ctx context.Context) error {
	read := func() (nodeRecord, bool) {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		e, err := m.nodes.Get(rctx, "node."+m.opts.Node)
		var r nodeRecord
		if err != nil || json.Unmarshal(e.Value(), &r) != nil {
			return r, false
		}
		return r, true
	}
	first, ok := read()
	if !ok || first.Role == RoleDown || time.Since(time.Unix(0, first.Updated)) > 3*time.Second {
		return nil
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(2500 * time.Millisecond): // more than a heartbeat
	}
	if again, ok := read(); ok && again.Updated != first.Updated && again.Role != RoleDown {
		return fmt.Errorf("cluster: another twind runs as node %s (serving %s): give each node its own --node name", m.opts.Node, again.Addr)
	}
	return nil
}

// warnLazySync warns when an external cluster's servers do not sync each
// write to disk before acknowledging it: acknowledged changes may then be
// lost if a quorum's machines lose power together.
func (m *Member) warnLazySync() {
	// The server does not tell clients its sync_interval: say what to
	// check.
	m.opts.Logger.Warn("using an existing NATS cluster: make sure its servers set jetstream { sync_interval: always }, or an acknowledged change may be lost when a quorum's machines lose power at once")
}

// Close disconnects and stops the embedded NATS server.
func (m *Member) Close() {
	if m.nc != nil {
		m.nc.Close()
	}
	if m.node != nil {
		m.node.Shutdown()
	}
}

// OwnerFunc serves the API as the owner of every virtual shard, on an
// engine opened with engine (whose Log is the replicated log), until ctx
// is done or the engine fails; it returns once the engine is closed. It
// serves a call only while serving returns nil: the node's lease on the
// shards runs, less the margin for clock drift.
type OwnerFunc func(ctx context.Context, engine twin.Options, serving func() error) error

// StandbyFunc serves the API while this node follows the log, forwarding
// calls to the owner, until ctx is done.
type StandbyFunc func(ctx context.Context) error

// Run takes this node through its roles until ctx is done: it follows the
// log into its store as a standby, takes the shards over when their owner
// is gone, serves them until it loses them, and follows again. When ctx
// is done while it owns the shards, it hands them over before it returns.
func (m *Member) Run(ctx context.Context, engine twin.Options, owner OwnerFunc, standby StandbyFunc) error {
	var wg sync.WaitGroup
	hctx, stopHeartbeat := context.WithCancel(context.Background())
	wg.Add(2)
	go func() { defer wg.Done(); m.heartbeat(hctx) }()
	go func() { defer wg.Done(); m.watchNodes(hctx) }()
	defer func() {
		stopHeartbeat()
		wg.Wait()
		m.report(context.Background(), RoleDown)
		if m.node != nil && m.node.leadsMeta() {
			// A node that stops hands JetStream's meta leadership on:
			// without a meta leader, followers cannot make consumers
			// until the others elect one.
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			if _, err := m.nc.RequestWithContext(sctx, "$JS.API.META.LEADER.STEPDOWN", []byte("{}")); err != nil {
				m.opts.Logger.Warn("JetStream's meta leader stays on this node as it stops", "err", err)
			}
			cancel()
		}
	}()
	for ctx.Err() == nil {
		lease, err := m.follow(ctx, engine, standby)
		if err != nil {
			return err
		}
		if lease == nil {
			return nil // ctx is done
		}
		m.serve(ctx, lease, engine, owner)
	}
	return nil
}

// follow runs this node as a standby until it owns the shards and its
// store holds the log up to its own fence (it returns the lease), or ctx
// is done (a nil lease).
func (m *Member) follow(ctx context.Context, opts twin.Options, standby StandbyFunc) (*Lease, error) {
	m.role.Store(RoleStandby)
	opts.Follow, opts.Log = true, nil
	e, err := twin.Open(opts)
	if err != nil {
		return nil, err
	}
	m.applied.Store(e.Applied())
	pctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := standby(pctx); err != nil && pctx.Err() == nil {
			m.opts.Logger.Error("serving as a standby failed", "err", err)
		}
	}()
	apply := func(pos uint64, entry []byte) error {
		time.Sleep(m.opts.applyDelay)
		if err := e.ApplyEntry(pos, entry); err != nil {
			return err
		}
		m.applied.Store(pos)
		return nil
	}
	// The follower applies the log as it grows, until stopped.
	var (
		fwg   sync.WaitGroup
		fstop context.CancelFunc
	)
	startFollower := func() {
		fctx, cancel := context.WithCancel(pctx)
		fstop = cancel
		fwg.Add(1)
		go func() {
			defer fwg.Done()
			var failing time.Time // when a failure was last logged; zero after progress
			for fctx.Err() == nil {
				from := e.Applied()
				err := m.shards.Follow(fctx, AllShards, from, apply)
				if e.Applied() > from {
					failing = time.Time{} // it made progress: a new failure is news
				}
				if err != nil && fctx.Err() == nil {
					// Once a minute while it lasts, not every second.
					if failing.IsZero() || time.Since(failing) > time.Minute {
						m.opts.Logger.Warn("following the log failed; following again every second", "err", err)
						failing = time.Now()
					}
					select {
					case <-fctx.Done():
					case <-time.After(time.Second):
					}
				}
			}
		}()
	}
	stopFollower := func() {
		fstop()
		fwg.Wait()
	}
	startFollower()
	end := func() error {
		stopFollower()
		stop()
		wg.Wait()
		return e.Close()
	}
	tick := time.NewTicker(m.shards.opts.Lease / 20)
	defer tick.Stop()
	var loggedTakeover time.Time // when a failed takeover was last logged
	for {
		select {
		case <-ctx.Done():
			return nil, end()
		case <-tick.C:
		}
		if !m.refreshOwner(ctx) {
			continue
		}
		lctx, cancel := context.WithTimeout(ctx, m.attemptTimeout())
		last, err := m.shards.Last(lctx)
		cancel()
		if err == nil && last > e.Applied()+behind && !m.ownerLongGone() {
			// Behind (a node that has just restarted, or rebuilds its
			// store): let a node that is caught up take over first; it
			// serves sooner.
			continue
		}
		// A request sent while a stream elects its leader goes
		// unanswered: give up on it soon, and try again.
		actx, cancel := context.WithTimeout(ctx, m.attemptTimeout())
		lease, err := m.shards.Acquire(actx, AllShards)
		cancel()
		if errors.Is(err, ErrOwned) {
			continue
		}
		if err != nil {
			// Once a lease while it lasts (no quorum), not four times a
			// second.
			if time.Since(loggedTakeover) > m.shards.opts.Lease {
				m.opts.Logger.Warn("taking the shards over failed", "err", err)
				loggedTakeover = time.Now()
			}
			continue
		}
		m.changes.Add(1)
		// Serve only once the store holds everything before the fence:
		// from the follower, or, if it lags (its consumer recreating
		// itself after the leader it read from died), from the log's
		// leader record by record. A store that cannot catch up within
		// two leases gives the shards back, for a node that can.
		if !m.catchUp(ctx, lease, e, apply, stopFollower) {
			why := "the store did not catch up with the log"
			if e.Applied() >= lease.Seq() {
				why = "the lease ran out while taking over"
			}
			m.opts.Logger.Warn("gave the shards back: "+why, "applied", e.Applied(), "fence", lease.Seq())
			rctx, cancel := context.WithTimeout(context.Background(), m.attemptTimeout())
			lease.Release(rctx)
			cancel()
			startFollower()
			continue
		}
		err = end()
		m.applied.Store(lease.Seq())
		return lease, err
	}
}

// catchUp waits until e holds the log up to lease's fence, keeping the
// lease renewed; it stops the follower (with stopFollower) to read the
// rest itself if the follower does not get there soon. It reports whether
// e caught up with the lease still valid; the follower is stopped then.
func (m *Member) catchUp(ctx context.Context, lease *Lease, e *twin.Engine, apply func(uint64, []byte) error, stopFollower func()) bool {
	// It gives up after two leases without progress.
	deadline := time.Now().Add(2 * m.shards.opts.Lease)
	progress := e.Applied()
	renewed := time.Now()
	following := true
	defer func() {
		if following {
			stopFollower()
		}
	}()
	for waited := 0; e.Applied() < lease.Seq(); waited++ {
		if p := e.Applied(); p != progress {
			progress, deadline = p, time.Now().Add(2*m.shards.opts.Lease)
		}
		if !lease.Valid() || ctx.Err() != nil || time.Now().After(deadline) {
			return false
		}
		if time.Since(renewed) > m.shards.opts.Lease/5 {
			rctx, cancel := context.WithTimeout(ctx, m.attemptTimeout())
			err := lease.Renew(rctx)
			cancel()
			if errors.Is(err, ErrLost) {
				return false
			}
			renewed = time.Now()
		}
		if following && waited >= 30 {
			stopFollower()
			following = false
		}
		if following {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, m.attemptTimeout())
		err := m.shards.ReadRange(rctx, AllShards, e.Applied(), lease.Seq(), apply)
		cancel()
		if err != nil {
			m.opts.Logger.Warn("catching up with the log", "err", err)
			time.Sleep(50 * time.Millisecond)
		}
	}
	if ctx.Err() != nil {
		return false
	}
	// Caught up: renew once more, so that serving starts on a whole
	// lease however long the takeover took.
	rctx, cancel := context.WithTimeout(ctx, m.attemptTimeout())
	defer cancel()
	if err := lease.Renew(rctx); err != nil {
		m.opts.Logger.Warn("renewing the lease after catching up failed", "err", err)
	}
	return lease.Valid()
}

// refreshOwner reads the shards' owner, and reports whether this node
// may take them: none holds them now (released, never taken, or its lease
// ran out), or the record names this node itself. A live record of this
// node's own is what an Acquire leaves that updated the record but could
// not fence the log (the log's stream electing a leader, an answer lost),
// or a process of this node that died: nothing of this node serves under
// it, and no other node may take it before it runs out.
func (m *Member) refreshOwner(ctx context.Context) (free bool) {
	rctx, cancel := context.WithTimeout(ctx, m.attemptTimeout())
	node, addr, live, err := m.shards.Owner(rctx, AllShards)
	cancel()
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		m.ownerErr = err
		m.ownerLive = false
		return false
	}
	switch {
	case live:
		m.ownerGoneSince = time.Time{}
	case m.ownerGoneSince.IsZero():
		m.ownerGoneSince = time.Now()
	}
	m.ownerNode, m.ownerAddr, m.ownerLive, m.ownerErr = node, addr, live, nil
	// A record of this node's own, while it follows, is a lease it took
	// and could not use (its fence failed, or it gave the shards back):
	// take the shards again rather than wait for it to run out.
	return !live || node == m.opts.Node
}

// attemptTimeout bounds one request to the cluster: a quarter of the
// lease, between half a second and two.
func (m *Member) attemptTimeout() time.Duration {
	return min(max(m.shards.opts.Lease/4, 500*time.Millisecond), 2*time.Second)
}

// behind is how many log records a standby may lag and still take the
// shards over at once; one further behind leaves them to a node that is
// caught up, for two leases.
const behind = 500

// ownerLongGone reports whether the shards have had no owner for two
// leases: long enough for a node that is caught up to have taken them.
func (m *Member) ownerLongGone() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.ownerGoneSince.IsZero() && time.Since(m.ownerGoneSince) > 2*m.shards.opts.Lease
}

// serve runs this node as the owner until it loses the shards or ctx is
// done; then it hands them over.
func (m *Member) serve(ctx context.Context, lease *Lease, opts twin.Options, owner OwnerFunc) {
	m.role.Store(RoleOwner)
	m.mu.Lock()
	m.ownerNode, m.ownerAddr, m.ownerLive, m.ownerErr = m.opts.Node, m.opts.Addr, true, nil
	m.mu.Unlock()
	m.opts.Logger.Info("this node owns the shards now", "node", m.opts.Node, "log", lease.Seq())
	octx, lost := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		m.renew(octx, lease, lost)
	}()
	if m.node != nil {
		// Beside serving: a leader that does not answer (the old owner,
		// paused) must not hold the serving back.
		wg.Add(1)
		go func() {
			defer wg.Done()
			lctx, cancel := context.WithTimeout(octx, 5*time.Second)
			defer cancel()
			if err := m.shards.leadHere(lctx, m.opts.Node); err != nil && octx.Err() == nil {
				m.opts.Logger.Warn("the streams' leaders stay where they are", "err", err)
			}
		}()
	}
	opts.Follow = false
	opts.Log = leaseLog{lease: lease, applied: &m.applied, latency: m.metrics.append}
	err := owner(octx, opts, func() error {
		if !lease.Valid() {
			return errors.New("this node's lease on the shards has lapsed; retry")
		}
		return nil
	})
	lost()
	wg.Wait()
	if ctx.Err() != nil {
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if m.node != nil {
			if err := m.shards.leaveLeadership(rctx, m.opts.Node); err != nil {
				m.opts.Logger.Warn("the streams' leaders stay on this node as it stops", "err", err)
			}
		}
		if err := lease.Release(rctx); err == nil {
			m.opts.Logger.Info("handed the shards over")
		}
		cancel()
		return
	}
	// The lease is lost (taken over, run out, or an append failed) or the
	// engine failed: give the record back if no other node has taken it,
	// so that the next owner (this node again, possibly) need not wait
	// for it to run out.
	rctx, cancel := context.WithTimeout(context.Background(), m.attemptTimeout())
	lease.giveBack(rctx)
	cancel()
	m.opts.Logger.Warn("this node no longer owns the shards; following the log", "err", err)
}

// renew renews the lease until ctx is done; it calls lost when the lease
// is lost or runs out.
func (m *Member) renew(ctx context.Context, lease *Lease, lost func()) {
	tick := time.NewTicker(m.shards.opts.Lease / 5)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		rctx, cancel := context.WithTimeout(ctx, m.shards.opts.Lease/5)
		err := lease.Renew(rctx)
		cancel()
		if errors.Is(err, ErrLost) || !lease.Valid() {
			m.opts.Logger.Warn("the shards' lease is lost", "err", err)
			lost()
			return
		}
	}
}

// leaseLog is the replicated log of an owner, under its lease.
type leaseLog struct {
	lease   *Lease
	applied *atomic.Uint64
	latency prometheus.Histogram
}

func (l leaseLog) Append(ctx context.Context, entry []byte) (uint64, error) {
	start := time.Now()
	pos, err := l.lease.Append(ctx, entry)
	if err == nil {
		l.latency.Observe(time.Since(start).Seconds())
		l.applied.Store(pos)
	}
	return pos, err
}

// nodeRecord is the value of a node's key in the nodes' bucket.
type nodeRecord struct {
	Addr    string `json:"addr"`
	Role    Role   `json:"role"`
	Applied uint64 `json:"applied"`
	Updated int64  `json:"updated"` // Unix nanoseconds
}

func (m *Member) heartbeat(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		m.report(ctx, m.role.Load().(Role))
		lctx, cancel := context.WithTimeout(ctx, time.Second)
		last, err := m.shards.Last(lctx)
		cancel()
		if err == nil {
			m.mu.Lock()
			m.logLast, m.statusAt = last, time.Now()
			m.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (m *Member) report(ctx context.Context, role Role) {
	rec, _ := json.Marshal(nodeRecord{Addr: m.opts.Addr, Role: role, Applied: m.applied.Load(), Updated: time.Now().UnixNano()})
	rctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	m.nodes.Put(rctx, "node."+m.opts.Node, rec)
}

// Owner returns the API address of the node that owns the shards, for a
// standby to forward calls to.
func (m *Member) Owner() (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.ownerErr != nil:
		return "", fmt.Errorf("the cluster does not answer (no quorum?): %w", m.ownerErr)
	case !m.ownerLive:
		return "", errors.New("no node owns the shards now: a takeover is under way, or too few nodes are up to choose one (a majority of --replicas); retry")
	case m.ownerNode == m.opts.Node:
		return "", errors.New("this node is taking the shards over; retry")
	}
	return m.ownerAddr, nil
}

// Healthy reports whether calls to this node can be served: by itself as
// the owner, or by the owner it forwards to.
func (m *Member) Healthy() bool {
	if m.role.Load().(Role) == RoleOwner {
		return true
	}
	_, err := m.Owner()
	return err == nil && m.nc.IsConnected()
}

// NodeStatus is one node's state, as it last reported it.
type NodeStatus struct {
	Name    string
	Addr    string
	Role    Role
	Applied uint64
	Lag     uint64
	Updated time.Time
}

// Status is the cluster's state.
type Status struct {
	Node    string // the node that answers
	Owner   string // the shards' owner; "" when none
	LogLast uint64
	Nodes   []NodeStatus
}

// Status returns the cluster's state as this node knows it now, without
// asking the cluster: it answers while the cluster elects leaders.
func (m *Member) Status(ctx context.Context) (*Status, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.statusAt.IsZero() {
		return nil, errors.New("the cluster's status is not known yet")
	}
	st := &Status{Node: m.opts.Node, LogLast: m.logLast}
	if m.ownerLive && m.ownerErr == nil {
		st.Owner = m.ownerNode
	}
	for name, r := range m.peers {
		ns := NodeStatus{Name: name, Addr: r.Addr, Role: r.Role, Applied: r.Applied, Updated: time.Unix(0, r.Updated)}
		if time.Since(ns.Updated) > m.shards.opts.Lease {
			ns.Role = RoleDown
		}
		if name == m.opts.Node {
			ns.Role, ns.Applied, ns.Updated = m.role.Load().(Role), m.applied.Load(), time.Now()
		}
		if st.LogLast < ns.Applied {
			st.LogLast = ns.Applied
		}
		st.Nodes = append(st.Nodes, ns)
	}
	for i := range st.Nodes {
		st.Nodes[i].Lag = st.LogLast - st.Nodes[i].Applied
	}
	sort.Slice(st.Nodes, func(i, j int) bool { return st.Nodes[i].Name < st.Nodes[j].Name })
	return st, nil
}

// watchNodes keeps m.peers up to date with the nodes' bucket until ctx is
// done.
func (m *Member) watchNodes(ctx context.Context) {
	for ctx.Err() == nil {
		w, err := m.nodes.WatchAll(ctx)
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		for e := range w.Updates() {
			if e == nil {
				continue // the initial values are all in
			}
			var r nodeRecord
			if e.Operation() != jetstream.KeyValuePut || json.Unmarshal(e.Value(), &r) != nil {
				continue
			}
			m.mu.Lock()
			m.peers[strings.TrimPrefix(e.Key(), "node.")] = r
			m.mu.Unlock()
		}
		w.Stop()
	}
}

// Applied returns the last log position this node's store holds.
func (m *Member) Applied() uint64 { return m.applied.Load() }
