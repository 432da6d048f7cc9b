package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/twind-io/twind/cluster"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
	"github.com/twind-io/twind/twin"
)

// clusterFlags are the flags of cluster mode.
type clusterFlags struct {
	node, listen, peers, nats, advertise string
	replicas                             int
	lease                                time.Duration
	envErr                               error // a TWIND_REPLICAS or TWIND_LEASE that does not parse
}

func (c *clusterFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.node, "node", envOr("TWIND_NODE", ""), "this node's name in a cluster; with --cluster-listen and --cluster-peers (or --nats), twind runs as one node of a cluster (env TWIND_NODE)")
	fs.StringVar(&c.listen, "cluster-listen", envOr("TWIND_CLUSTER_LISTEN", ""), "host:port where this node's embedded NATS server meets its peers (env TWIND_CLUSTER_LISTEN)")
	fs.StringVar(&c.peers, "cluster-peers", envOr("TWIND_CLUSTER_PEERS", ""), "the other nodes' --cluster-listen addresses, comma-separated (env TWIND_CLUSTER_PEERS)")
	fs.StringVar(&c.nats, "nats", envOr("TWIND_NATS", ""), "URLs of an existing NATS cluster with JetStream to use instead of an embedded server, comma-separated (env TWIND_NATS)")
	fs.StringVar(&c.advertise, "advertise-addr", envOr("TWIND_ADVERTISE_ADDR", ""), "host:port where the other nodes reach this node's API, to forward calls to it (default: --addr, which must then name a host) (env TWIND_ADVERTISE_ADDR)")
	replicas, lease := 3, 5*time.Second
	if v, ok := os.LookupEnv("TWIND_REPLICAS"); ok {
		n, err := strconv.Atoi(v)
		replicas, c.envErr = n, errors.Join(c.envErr, wrapEnv("TWIND_REPLICAS", err))
	}
	if v, ok := os.LookupEnv("TWIND_LEASE"); ok {
		d, err := time.ParseDuration(v)
		lease, c.envErr = d, errors.Join(c.envErr, wrapEnv("TWIND_LEASE", err))
	}
	fs.IntVar(&c.replicas, "replicas", replicas, "how many nodes hold each write of the replicated log; fixed when the cluster is first started (env TWIND_REPLICAS)")
	fs.DurationVar(&c.lease, "lease", lease, "how long the owner of the shards owns them without renewing, at least 1s; failover takes about this long plus a fifth (env TWIND_LEASE)")
}

func (c *clusterFlags) enabled() bool {
	return c.node != "" || c.listen != "" || c.peers != "" || c.nats != ""
}

// check says what is missing or contradictory.
func (c *clusterFlags) check(opts *server.Options) error {
	switch {
	case c.node == "":
		return errors.New("cluster mode needs --node NAME")
	case c.nats == "" && (c.listen == "" || c.peers == ""):
		return errors.New("cluster mode needs --cluster-listen HOST:PORT and --cluster-peers HOST:PORT,... (or --nats URL to use an existing NATS cluster)")
	case c.nats != "" && (c.listen != "" || c.peers != ""):
		return errors.New("--nats uses an existing NATS cluster: it does not go with --cluster-listen or --cluster-peers")
	case opts.TLSCertFile != "":
		return errors.New("cluster mode does not serve TLS yet (nodes forward calls to each other in plaintext): terminate TLS in front of the nodes, or run one node")
	case opts.Listener != nil:
		return errors.New("cluster mode listens itself")
	case c.envErr != nil:
		return c.envErr
	case c.replicas < 1:
		return fmt.Errorf("--replicas %d: want at least 1 (3 survives the loss of one node)", c.replicas)
	case c.lease < time.Second:
		return fmt.Errorf("--lease %v: want at least 1s (an owner renews it every fifth of it)", c.lease)
	}
	if c.nats == "" {
		if _, _, err := net.SplitHostPort(c.listen); err != nil {
			return fmt.Errorf("--cluster-listen %q: want host:port (or :port for every interface): %w", c.listen, err)
		}
		for _, p := range splitList(c.peers) {
			if err := checkHostPort("--cluster-peers", p); err != nil {
				return err
			}
		}
	}
	if c.advertise != "" {
		if err := checkHostPort("--advertise-addr", c.advertise); err != nil {
			return err
		}
	}
	if c.advertise == "" {
		host, port, err := net.SplitHostPort(opts.Addr)
		if err != nil {
			return fmt.Errorf("--addr %q: %w", opts.Addr, err)
		}
		if host == "" || net.ParseIP(host).IsUnspecified() {
			return fmt.Errorf("--addr %s names no host the other nodes can reach: set --advertise-addr", opts.Addr)
		}
		if port == "0" {
			return fmt.Errorf("--addr %s: a cluster node needs a fixed port, which the other nodes forward calls to", opts.Addr)
		}
		c.advertise = opts.Addr
	}
	return nil
}

func wrapEnv(name string, err error) error {
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// checkHostPort says what is wrong with an address that should be
// host:port.
func checkHostPort(flag, addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s %q: want host:port: %w", flag, addr, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		return fmt.Errorf("%s %q: the port must be a number from 1 to 65535", flag, addr)
	}
	if host == "" {
		return fmt.Errorf("%s %q: name the host", flag, addr)
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// runCluster runs twind as one node of a cluster: the store lives in
// DIR/store and the embedded NATS server's in DIR/jetstream. One listener
// serves the API throughout; its connections go to the owner's server or
// to the standby's forwarder, whichever this node is now.
func runCluster(ctx context.Context, c clusterFlags, opts server.Options) error {
	opts.EnsureDefaults()
	l, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", opts.Addr, err)
	}
	d := newDispatcher(l)
	defer d.close()
	// While it joins, the node answers every call with UNAVAILABLE and
	// health with NOT_SERVING, rather than reset connections.
	joining := errors.New("this node is joining the cluster; retry")
	jf := server.NewForwarder(server.ForwardOptions{
		Owner:   func() (string, error) { return "", joining },
		Healthy: func() bool { return false },
		ClusterStatus: func(context.Context) (*twinv1.GetClusterStatusResponse, error) {
			return nil, joining
		},
		Logger: opts.Logger,
	})
	jl := d.phase()
	var jwg sync.WaitGroup
	jwg.Add(1)
	go func() { defer jwg.Done(); jf.Serve(jl) }()
	m, err := cluster.StartMember(ctx, cluster.MemberOptions{
		Node: c.node, ClusterAddr: c.listen, Peers: splitList(c.peers), NATS: splitList(c.nats),
		Replicas: c.replicas, Lease: c.lease, Dir: opts.DataDir, Addr: c.advertise, Logger: opts.Logger,
	})
	jf.Stop()
	jwg.Wait()
	if err != nil && ctx.Err() != nil {
		opts.Logger.Info("stopped before joining the cluster")
		return nil
	}
	if err != nil {
		return err
	}
	defer m.Close()
	opts.Logger.Info("joined the cluster", "node", c.node, "api", l.Addr().String(), "advertise", c.advertise)
	shards := opts.Engine
	shards.EnsureDefaults()
	status := func(ctx context.Context) (*twinv1.GetClusterStatusResponse, error) {
		st, err := m.Status(ctx)
		if err != nil {
			return nil, err
		}
		return statusProto(st, shards.VShards), nil
	}
	opts.ClusterStatus = status
	opts.DataDir = filepath.Join(opts.DataDir, "store")
	engine := opts.Engine
	engine.Dir, engine.Logger, engine.Clock = opts.DataDir, opts.Logger, opts.Clock
	if opts.Ready != nil {
		opts.Ready(l.Addr())
		opts.Ready = nil
	}
	owner := ownerPhase(opts, d, m.Metrics())
	standby := func(ctx context.Context) error {
		f := server.NewForwarder(server.ForwardOptions{
			Owner: m.Owner, Healthy: m.Healthy, ClusterStatus: status, Logger: opts.Logger,
			MaxRecvMsgSize: opts.Limits.MaxRecvMsgSize,
		})
		pl := d.phase()
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); <-ctx.Done(); f.Stop() }()
		err := f.Serve(pl)
		wg.Wait()
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	return m.Run(ctx, engine, owner, standby)
}

// ownerPhase returns what serves the API while this node owns the shards:
// a server on the dispatcher's next phase, with the cluster's metrics.
// A node may own the shards many times in one process.
func ownerPhase(opts server.Options, d *dispatcher, clusterMetrics prometheus.Collector) cluster.OwnerFunc {
	return func(ctx context.Context, engine twin.Options, serving func() error) error {
		o := opts
		o.Engine, o.Serving = engine, serving
		// Each phase has a registry of its own: a server registers its
		// collectors once in a registry.
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), clusterMetrics)
		o.Metrics = reg
		o.Listener = d.phase()
		return server.Run(ctx, o)
	}
}

func statusProto(st *cluster.Status, vshards int) *twinv1.GetClusterStatusResponse {
	out := &twinv1.GetClusterStatusResponse{Node: st.Node, Owner: st.Owner, LogLast: st.LogLast, VirtualShards: uint32(vshards)}
	for _, n := range st.Nodes {
		cn := &twinv1.ClusterNode{Name: n.Name, Addr: n.Addr, Role: string(n.Role), Applied: n.Applied, Lag: n.Lag, Updated: timestamppb.New(n.Updated)}
		if n.Role == cluster.RoleOwner {
			cn.ShardsOwned = uint32(vshards)
		}
		out.Nodes = append(out.Nodes, cn)
	}
	return out
}

// dispatcher hands the connections of one listener to the listener of the
// phase in force: the owner's server or the standby's forwarder.
type dispatcher struct {
	l   net.Listener
	mu  sync.Mutex
	cur *phaseListener
	wg  sync.WaitGroup
}

func newDispatcher(l net.Listener) *dispatcher {
	d := &dispatcher{l: l}
	d.wg.Add(1)
	go d.run()
	return d
}

func (d *dispatcher) run() {
	defer d.wg.Done()
	for {
		conn, err := d.l.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		d.mu.Lock()
		p := d.cur
		d.mu.Unlock()
		if p == nil || !p.offer(conn) {
			conn.Close() // between phases: the client retries
		}
	}
}

// phase returns a new listener that takes the connections from now on.
func (d *dispatcher) phase() net.Listener {
	p := &phaseListener{addr: d.l.Addr(), conns: make(chan net.Conn), closed: make(chan struct{})}
	d.mu.Lock()
	if d.cur != nil {
		d.cur.Close()
	}
	d.cur = p
	d.mu.Unlock()
	return p
}

func (d *dispatcher) close() {
	d.l.Close()
	d.wg.Wait()
}

type phaseListener struct {
	addr   net.Addr
	conns  chan net.Conn
	once   sync.Once
	closed chan struct{}
}

func (p *phaseListener) offer(c net.Conn) bool {
	select {
	case p.conns <- c:
		return true
	case <-p.closed:
		return false
	}
}

func (p *phaseListener) Accept() (net.Conn, error) {
	select {
	case c := <-p.conns:
		return c, nil
	case <-p.closed:
		return nil, net.ErrClosed
	}
}

func (p *phaseListener) Close() error {
	p.once.Do(func() { close(p.closed) })
	return nil
}

func (p *phaseListener) Addr() net.Addr { return p.addr }
