package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The names a cluster's state goes under in JetStream.
const (
	// logStream holds every virtual shard's log, one subject a shard.
	logStream = "TWIND_LOG"
	// ownersBucket holds each virtual shard's owner and its lease.
	ownersBucket = "twind_owners"
)

// AllShards names every virtual shard at once: a node that owns it owns
// them all, with one log. Ownership and the log are designed per virtual
// shard; until shards are spread over nodes, one owner takes them all.
const AllShards uint16 = 1<<16 - 1

func logSubject(vs uint16) string {
	if vs == AllShards {
		return "twind.log.all"
	}
	return "twind.log." + strconv.Itoa(int(vs))
}

func ownerKey(vs uint16) string {
	if vs == AllShards {
		return "vs.all"
	}
	return "vs." + strconv.Itoa(int(vs))
}

// Headers of the log's records.
const (
	// fenceHeader marks a new owner's fence; its value is the owner.
	fenceHeader = "Twind-Fence"
	// chunkHeader marks a part of an entry too large for one message:
	// "i/n", from 1. An entry is complete at its part n; parts of an entry
	// that no part n follows (the owner died between them) are dropped.
	chunkHeader = "Twind-Chunk"
)

// Options configure the ownership of virtual shards.
type Options struct {
	// Node is this node's name.
	Node string
	// Addr is where this node serves the API; the owners' bucket gives it
	// to the nodes that forward calls to the owner.
	Addr string
	// Replicas is how many nodes hold each write. Default 3.
	Replicas int
	// Lease is how long an owner owns a shard without renewing. Default 5s.
	Lease time.Duration
	// Drift is the margin for clocks that disagree: an owner stops
	// serving that long before its lease runs out, and a node takes a
	// shard that long after. Default a fifth of Lease.
	Drift time.Duration
	// Clock returns the time. Default time.Now; tests pause it.
	Clock func() time.Time
}

func (o *Options) ensureDefaults() {
	if o.Replicas <= 0 {
		o.Replicas = 3
	}
	if o.Lease <= 0 {
		o.Lease = 5 * time.Second
	}
	if o.Drift <= 0 {
		o.Drift = o.Lease / 5
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
}

// Errors of ownership.
var (
	// ErrOwned: another node owns the shard, under a lease that has not
	// run out.
	ErrOwned = errors.New("cluster: another node owns the shard")
	// ErrLost: this node no longer owns the shard: its lease ran out, or
	// another node took the shard over (its appends are fenced off). The
	// node must stop serving the shard.
	ErrLost = errors.New("cluster: this node no longer owns the shard")
)

// Shards manages which node owns each virtual shard, and appends to the
// shards' logs under that ownership. It is safe for concurrent use.
type Shards struct {
	js   jetstream.JetStream
	log  jetstream.Stream
	kv   jetstream.KeyValue
	opts Options
}

// Open makes (or finds) the replicated log and the owners' bucket.
func Open(ctx context.Context, js jetstream.JetStream, o Options) (*Shards, error) {
	o.ensureDefaults()
	if o.Node == "" {
		return nil, errors.New("cluster: Options.Node is required")
	}
	log, err := ensureStream(ctx, js, jetstream.StreamConfig{
		Name:     logStream,
		Subjects: []string{"twind.log.>"},
		Storage:  jetstream.FileStorage,
		Replicas: o.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: the log stream: %w", err)
	}
	kv, err := ensureBucket(ctx, js, jetstream.KeyValueConfig{
		Bucket:   ownersBucket,
		Storage:  jetstream.FileStorage,
		Replicas: o.Replicas,
		History:  1,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: the owners' bucket: %w", err)
	}
	return &Shards{js: js, log: log, kv: kv, opts: o}, nil
}

// ErrReplicas: the cluster's log keeps another number of copies than this
// node was started with. The number is fixed when the cluster first
// starts; a node that changed it would change it for every node.
var ErrReplicas = errors.New("cluster: --replicas differs from the cluster's")

// ensureStream finds the stream of cfg, or makes it if there is none. It
// never changes an existing stream: a node started with other settings
// would change them for the whole cluster.
func ensureStream(ctx context.Context, js jetstream.JetStream, cfg jetstream.StreamConfig) (jetstream.Stream, error) {
	st, err := js.Stream(ctx, cfg.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		st, err = js.CreateStream(ctx, cfg)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			st, err = js.Stream(ctx, cfg.Name) // another node made it just now
		}
	}
	if err != nil {
		return nil, err
	}
	if got := st.CachedInfo().Config.Replicas; got != cfg.Replicas {
		return nil, fmt.Errorf("%w: %s keeps %d copies, and this node was started with --replicas %d: start it with --replicas %d",
			ErrReplicas, cfg.Name, got, cfg.Replicas, got)
	}
	return st, nil
}

// ensureBucket finds the key-value bucket of cfg, or makes it if there is
// none; as ensureStream, it never changes one.
func ensureBucket(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, cfg.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = js.CreateKeyValue(ctx, cfg)
		if errors.Is(err, jetstream.ErrBucketExists) || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			kv, err = js.KeyValue(ctx, cfg.Bucket)
		}
	}
	if err != nil {
		return nil, err
	}
	st, err := js.Stream(ctx, "KV_"+cfg.Bucket)
	if err != nil {
		return nil, err
	}
	if got := st.CachedInfo().Config.Replicas; got != cfg.Replicas {
		return nil, fmt.Errorf("%w: the bucket %s keeps %d copies, and this node was started with --replicas %d: start it with --replicas %d",
			ErrReplicas, cfg.Bucket, got, cfg.Replicas, got)
	}
	return kv, nil
}

// ownerRecord is the value of a shard's key in the owners' bucket.
type ownerRecord struct {
	Node    string `json:"node"`
	Addr    string `json:"addr,omitempty"`
	Expires int64  `json:"expires"` // Unix nanoseconds, by the owner's clock; 0 once released
}

// fenceRecord is what a new owner appends to a shard's log before it
// serves the shard: appends of the previous owner, which expect the log's
// last sequence as it knew it, are refused from then on.
type fenceRecord struct {
	Fence string `json:"fence"` // the new owner
}

// Lease is this node's ownership of one virtual shard.
type Lease struct {
	s  *Shards
	vs uint16

	// kvMu serializes the updates of the owner record (Renew, Release);
	// mu, held for no request, guards rev, expires and lost, so that
	// Valid, which an owner asks before every call and append, never
	// waits for the bucket.
	kvMu    sync.Mutex
	mu      sync.Mutex
	rev     uint64    // the revision of the owner record this node wrote last
	expires time.Time // by this node's clock
	lost    bool
	id      string // names this lease in its appends' message ids

	// appendMu serializes appends, and guards what they keep: renewals do
	// not wait for an append that is retried.
	appendMu sync.Mutex
	lastSeq  uint64 // the shard subject's last sequence, as of this node's last append
	sent     uint64 // appends made under the lease
}

// Acquire makes this node the owner of shard vs if it has no owner or its
// owner's lease ran out, and fences the shard's log. It fails with
// ErrOwned if another node owns it.
func (s *Shards) Acquire(ctx context.Context, vs uint16) (*Lease, error) {
	now := s.opts.Clock()
	key := ownerKey(vs)
	rec, err := json.Marshal(ownerRecord{Node: s.opts.Node, Addr: s.opts.Addr, Expires: now.Add(s.opts.Lease).UnixNano()})
	if err != nil {
		return nil, err
	}
	var rev uint64
	switch e, err := s.kv.Get(ctx, key); {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		rev, err = s.kv.Create(ctx, key, rec)
		if errors.Is(err, jetstream.ErrKeyExists) {
			return nil, fmt.Errorf("%w: shard %d was taken just now", ErrOwned, vs)
		}
		if err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	default:
		var cur ownerRecord
		if err := json.Unmarshal(e.Value(), &cur); err != nil {
			return nil, fmt.Errorf("cluster: the owner record of shard %d: %w", vs, err)
		}
		if until := time.Unix(0, cur.Expires).Add(s.opts.Drift); cur.Node != s.opts.Node && now.Before(until) {
			return nil, fmt.Errorf("%w: node %s owns shard %d until %s", ErrOwned, cur.Node, vs, until.Format(time.RFC3339Nano))
		}
		rev, err = s.kv.Update(ctx, key, rec, e.Revision())
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return nil, fmt.Errorf("%w: shard %d was taken just now", ErrOwned, vs)
		}
		if err != nil {
			return nil, err
		}
	}
	l := &Lease{s: s, vs: vs, rev: rev, expires: now.Add(s.opts.Lease), id: s.opts.Node + "." + strconv.FormatUint(rev, 10)}
	if err := l.fence(ctx); err != nil {
		return nil, err
	}
	return l, nil
}

// fence appends a fence record to the shard's log, expecting the log's
// last sequence as it is now: from then on, an append of the previous
// owner, which expects the sequence it last knew, is refused. Without
// it, a paused old owner of an idle shard would find its expected
// sequence still current.
func (l *Lease) fence(ctx context.Context) error {
	rec, err := json.Marshal(fenceRecord{Fence: l.s.opts.Node})
	if err != nil {
		return err
	}
	subject := logSubject(l.vs)
	msg := &nats.Msg{Subject: subject, Data: rec, Header: nats.Header{fenceHeader: []string{l.s.opts.Node}}}
	var last uint64
	m, err := l.s.log.GetLastMsgForSubject(ctx, subject)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
	case err != nil:
		return err
	default:
		last = m.Sequence
	}
	for range 10 {
		ack, err := l.s.js.PublishMsg(ctx, msg, jetstream.WithExpectLastSequencePerSubject(last))
		if wrongLastSequence(err) {
			// The old owner appended in between, or a message is still
			// on its way into the log (an append whose answer was lost in
			// a leader change): the stream says which sequence it holds
			// last, counting those; fence after it.
			if seq, ok := lastSequenceOf(err); ok {
				last = seq
				continue
			}
			if m, err := l.s.log.GetLastMsgForSubject(ctx, subject); err == nil {
				last = m.Sequence
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("cluster: fence shard %d: %w", l.vs, err)
		}
		l.lastSeq = ack.Sequence
		return nil
	}
	return fmt.Errorf("cluster: fence shard %d: the log kept moving under the fence", l.vs)
}

// Valid reports whether the lease lets this node serve the shard now: it
// has not been lost and runs for longer than the drift margin.
func (l *Lease) Valid() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return !l.lost && l.s.opts.Clock().Before(l.expires.Add(-l.s.opts.Drift))
}

// Renew extends the lease. It fails with ErrLost if another node has
// taken the shard over.
func (l *Lease) Renew(ctx context.Context) error {
	l.kvMu.Lock()
	defer l.kvMu.Unlock()
	l.mu.Lock()
	lost, last := l.lost, l.rev
	l.mu.Unlock()
	if lost {
		return ErrLost
	}
	now := l.s.opts.Clock()
	rec, err := json.Marshal(ownerRecord{Node: l.s.opts.Node, Addr: l.s.opts.Addr, Expires: now.Add(l.s.opts.Lease).UnixNano()})
	if err != nil {
		return err
	}
	rev, err := l.s.kv.Update(ctx, ownerKey(l.vs), rec, last)
	l.mu.Lock()
	defer l.mu.Unlock()
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		l.lost = true
		return fmt.Errorf("%w: shard %d was taken over", ErrLost, l.vs)
	}
	if err != nil {
		return err
	}
	// Even if an append lost the lease meanwhile: the record is this
	// node's, at rev, for Release.
	l.rev, l.expires = rev, now.Add(l.s.opts.Lease)
	return nil
}

// Append appends data to the shard's log, fenced: it succeeds only if the
// log's last entry is still this node's last append (or its fence). It
// fails with ErrLost, and the lease is lost for good, once another node
// has taken the shard over, or when the lease has run out. Data larger
// than a message may be goes in parts (chunkHeader); seq is the last
// part's.
func (l *Lease) Append(ctx context.Context, data []byte) (seq uint64, err error) {
	l.appendMu.Lock()
	defer l.appendMu.Unlock()
	if !l.Valid() {
		return 0, fmt.Errorf("%w: the lease of shard %d ran out", ErrLost, l.vs)
	}
	part := l.s.maxPart()
	n := max((len(data)+part-1)/part, 1)
	for i := range n {
		msg := &nats.Msg{Subject: logSubject(l.vs), Data: data[i*part : min((i+1)*part, len(data))]}
		if n > 1 {
			msg.Header = nats.Header{chunkHeader: []string{strconv.Itoa(i+1) + "/" + strconv.Itoa(n)}}
		}
		// A publish whose answer is lost (the stream electing a leader)
		// is sent again under the same message id while the lease runs:
		// JetStream answers a second copy with the first one's sequence,
		// and never stores it twice.
		l.sent++
		id := l.id + "." + strconv.FormatUint(l.sent, 10)
		for {
			pctx, cancel := context.WithTimeout(ctx, publishTimeout)
			ack, err := l.s.js.PublishMsg(pctx, msg, jetstream.WithExpectLastSequencePerSubject(l.lastSeq), jetstream.WithMsgID(id))
			cancel()
			if err == nil {
				l.lastSeq = ack.Sequence
				break
			}
			if wrongLastSequence(err) {
				l.lose()
				return 0, fmt.Errorf("%w: shard %d's log was fenced by a new owner", ErrLost, l.vs)
			}
			if !transient(err) || !l.Valid() || ctx.Err() != nil {
				// The part may be in the log or not: what the log holds
				// is no longer known, so this node must not append again.
				l.lose()
				return 0, fmt.Errorf("%w: append to shard %d's log: %w", ErrLost, l.vs, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return l.lastSeq, nil
}

// publishTimeout bounds one attempt of a publish to the log.
const publishTimeout = 2 * time.Second

// transient reports whether a failed publish may succeed if sent again:
// no answer in time, or the stream has no leader just now.
func transient(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.Code == 503
	}
	return true
}

// Seq returns the shard subject's last sequence as of this node's last
// append or fence.
func (l *Lease) Seq() uint64 {
	l.appendMu.Lock()
	defer l.appendMu.Unlock()
	return l.lastSeq
}

func (l *Lease) lose() {
	l.mu.Lock()
	l.lost = true
	l.mu.Unlock()
}

// Release gives the shard up at once, for a node that stops: the next
// node to look takes it without waiting for the lease to run out. The
// lease is lost from then on.
func (l *Lease) Release(ctx context.Context) error {
	return l.release(ctx, false)
}

// giveBack releases the owner record this node wrote last even if the
// lease is lost already: a node whose append failed (the lease is lost,
// but no other node took the shard) lets the next owner take it at once,
// rather than once the record runs out. If another node has taken the
// shard, the record is not this node's any more and stays as it is.
func (l *Lease) giveBack(ctx context.Context) error {
	return l.release(ctx, true)
}

func (l *Lease) release(ctx context.Context, evenLost bool) error {
	l.kvMu.Lock()
	defer l.kvMu.Unlock()
	l.mu.Lock()
	if l.lost && !evenLost {
		l.mu.Unlock()
		return ErrLost
	}
	l.lost = true
	last := l.rev
	l.mu.Unlock()
	rec, err := json.Marshal(ownerRecord{Node: l.s.opts.Node})
	if err != nil {
		return err
	}
	for {
		_, err = l.s.kv.Update(ctx, ownerKey(l.vs), rec, last)
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return nil // released by an attempt whose answer was lost, or taken over
		}
		if err == nil || !transient(err) || ctx.Err() != nil {
			return err
		}
		time.Sleep(50 * time.Millisecond) // the bucket is electing a leader
	}
}

// maxPart is the most data one message of the log carries: the server's
// payload limit, less room for headers.
func (s *Shards) maxPart() int {
	if m := int(s.js.Conn().MaxPayload()); m > 8<<10 {
		return m - 4<<10
	}
	return 1 << 20
}

// Owner returns shard vs's owner, its API address, and whether its lease
// runs now by this node's clock (with the drift margin in the owner's
// favour). A released or never taken shard has no owner.
func (s *Shards) Owner(ctx context.Context, vs uint16) (node, addr string, live bool, err error) {
	e, err := s.kv.Get(ctx, ownerKey(vs))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return "", "", false, nil
	}
	if err != nil {
		return "", "", false, err
	}
	var cur ownerRecord
	if err := json.Unmarshal(e.Value(), &cur); err != nil {
		return "", "", false, fmt.Errorf("cluster: the owner record of shard %d: %w", vs, err)
	}
	if cur.Expires == 0 {
		return "", "", false, nil
	}
	live = s.opts.Clock().Before(time.Unix(0, cur.Expires).Add(s.opts.Drift))
	return cur.Node, cur.Addr, live, nil
}

// lastSequenceOf returns the sequence a refused publish's error names as
// the subject's last ("wrong last sequence: 42").
func lastSequenceOf(err error) (uint64, bool) {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return 0, false
	}
	_, n, ok := strings.Cut(apiErr.Description, "wrong last sequence: ")
	if !ok {
		return 0, false
	}
	seq, err := strconv.ParseUint(strings.TrimSpace(n), 10, 64)
	return seq, err == nil
}

// wrongLastSequence reports whether a publish was refused because the
// subject's last sequence was not the one expected.
func wrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}
