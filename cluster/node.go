// Package cluster is the groundwork of twind's high availability (issue
// 11): a NATS JetStream system, embedded in each twind or external, that
// replicates each virtual shard's log, and the ownership of virtual shards:
// one owner at a time, under a lease kept in a replicated key-value bucket,
// with every append to a shard's log fenced, so that a node that lost
// ownership (paused, partitioned, slow) cannot append.
//
// The engine does not use it yet: twind still runs as one node on its
// embedded Pebble store. This package holds the parts the cluster mode will
// stand on, tested against real embedded NATS servers.
package cluster

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// NodeOptions configure an embedded NATS server with JetStream: one of the
// servers of a cluster that twind processes form among themselves.
type NodeOptions struct {
	// Name is the node's name, unique in the cluster.
	Name string
	// ClientAddr is where the node takes client connections (host:port;
	// port 0 picks one). Default 127.0.0.1:0.
	ClientAddr string
	// ClusterAddr is where the node meets its peers (host:port), and
	// Peers are the other nodes' cluster addresses. With no ClusterAddr
	// the node is alone.
	ClusterAddr string
	Peers       []string
	// StoreDir is the directory of JetStream's file storage.
	StoreDir string
}

// Node is an embedded NATS server with JetStream. Every write it
// acknowledges is on disk (fsync) in a quorum of the cluster's nodes:
// JetStream's file storage syncs each write (sync_interval: always).
type Node struct {
	srv *server.Server
}

// StartNode starts an embedded NATS server and waits until it takes
// connections. Stop it with Shutdown.
func StartNode(o NodeOptions) (*Node, error) {
	if o.Name == "" || o.StoreDir == "" {
		return nil, errors.New("cluster: a node needs a name and a store directory")
	}
	host, port, err := splitAddr(o.ClientAddr, "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("cluster: client address: %w", err)
	}
	opts := &server.Options{
		ServerName: o.Name,
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   o.StoreDir,
		// An acknowledged write must survive a power cut of a quorum's
		// machines, not only the loss of a process.
		SyncAlways: true,
		NoSigs:     true,
		NoLog:      true,
	}
	if port == 0 {
		opts.Port = server.RANDOM_PORT
	}
	if o.ClusterAddr != "" {
		ch, cp, err := splitAddr(o.ClusterAddr, "")
		if err != nil {
			return nil, fmt.Errorf("cluster: cluster address: %w", err)
		}
		opts.Cluster = server.ClusterOpts{Name: "twind", Host: ch, Port: cp}
		for _, p := range o.Peers {
			u, err := url.Parse("nats://" + p)
			if err != nil {
				return nil, fmt.Errorf("cluster: peer %q: %w", p, err)
			}
			opts.Routes = append(opts.Routes, u)
		}
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	srv.Start()
	if !srv.ReadyForConnections(time.Minute) {
		srv.Shutdown()
		return nil, fmt.Errorf("cluster: node %s did not start taking connections within a minute", o.Name)
	}
	return &Node{srv: srv}, nil
}

// leadsMeta reports whether this node's server leads JetStream's meta
// group (which places streams and makes consumers).
func (n *Node) leadsMeta() bool { return n.srv.JetStreamIsLeader() }

// ClientURL is the URL clients connect to.
func (n *Node) ClientURL() string { return n.srv.ClientURL() }

// Shutdown stops the node and waits until it has.
func (n *Node) Shutdown() {
	n.srv.Shutdown()
	n.srv.WaitForShutdown()
}

func splitAddr(addr, def string) (string, int, error) {
	if addr == "" {
		addr = def
	}
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("port %q is not a port number", p)
	}
	return h, port, nil
}
