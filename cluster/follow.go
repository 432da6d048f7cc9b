package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Follow reads shard vs's log from the record after position from, in
// order, and hands each complete entry to apply with its position: the
// parts of an entry joined, and a fence as a nil entry. It returns when
// ctx is done (nil) or apply fails.
func (s *Shards) Follow(ctx context.Context, vs uint16, from uint64, apply func(pos uint64, entry []byte) error) error {
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{logSubject(vs)}}
	if from > 0 {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = from + 1
	}
	cons, err := s.log.OrderedConsumer(ctx, cfg)
	if err != nil {
		return fmt.Errorf("cluster: follow shard %d's log: %w", vs, err)
	}
	// Short heartbeats: a follower whose stream leader died notices
	// within a second and reads on from the new leader, so that a
	// takeover does not wait for it.
	it, err := cons.Messages(jetstream.PullExpiry(2*time.Second), jetstream.PullHeartbeat(500*time.Millisecond))
	if err != nil {
		return fmt.Errorf("cluster: follow shard %d's log: %w", vs, err)
	}
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	defer it.Stop()
	var a assembler
	for {
		msg, err := it.Next()
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) || ctx.Err() != nil {
			return nil
		}
		if err != nil {
			// The ordered consumer recreates itself after a missed
			// heartbeat or a gap; anything else is for the caller.
			if errors.Is(err, jetstream.ErrNoHeartbeat) {
				continue
			}
			return fmt.Errorf("cluster: follow shard %d's log: %w", vs, err)
		}
		meta, err := msg.Metadata()
		if err != nil {
			return fmt.Errorf("cluster: follow shard %d's log: %w", vs, err)
		}
		if err := a.add(meta.Sequence.Stream, msg.Headers(), msg.Data(), apply); err != nil {
			return err
		}
	}
}

// ReadRange reads shard vs's log records from position from+1 to to, one
// by one from the stream's leader, and hands each complete entry to apply
// as Follow does. A node taking a shard over catches up with it when its
// follower, whose consumer may be recreating itself after a leader
// change, lags.
func (s *Shards) ReadRange(ctx context.Context, vs uint16, from, to uint64, apply func(pos uint64, entry []byte) error) error {
	var a assembler
	for pos := from + 1; pos <= to; pos++ {
		msg, err := s.log.GetMsg(ctx, pos)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // a record of another subject, or deleted
		}
		if err != nil {
			return fmt.Errorf("cluster: read record %d of shard %d's log: %w", pos, vs, err)
		}
		if msg.Subject != logSubject(vs) {
			continue
		}
		if err := a.add(pos, msg.Header, msg.Data, apply); err != nil {
			return err
		}
	}
	return nil
}

// assembler turns a log's records, in order, into entries: the parts of
// an entry joined, a fence as a nil entry.
type assembler struct {
	parts [][]byte // of the entry being joined
}

func (a *assembler) add(pos uint64, h nats.Header, data []byte, apply func(pos uint64, entry []byte) error) error {
	switch {
	case h.Get(fenceHeader) != "":
		a.parts = a.parts[:0] // an entry cut off by its owner's end
		return apply(pos, nil)
	case h.Get(chunkHeader) != "":
		i, n, ok := parseChunk(h.Get(chunkHeader))
		if !ok {
			return fmt.Errorf("cluster: log record %d has a bad %s %q", pos, chunkHeader, h.Get(chunkHeader))
		}
		if i == 1 {
			a.parts = a.parts[:0]
		}
		if i != len(a.parts)+1 {
			return nil // a part of an entry whose first part came before the reading began
		}
		a.parts = append(a.parts, data)
		if i < n {
			return nil
		}
		entry := joinParts(a.parts)
		a.parts = a.parts[:0]
		return apply(pos, entry)
	default:
		a.parts = a.parts[:0]
		return apply(pos, data)
	}
}

func parseChunk(v string) (i, n int, ok bool) {
	a, b, found := strings.Cut(v, "/")
	i, err1 := strconv.Atoi(a)
	n, err2 := strconv.Atoi(b)
	return i, n, found && err1 == nil && err2 == nil && i >= 1 && i <= n
}

func joinParts(parts [][]byte) []byte {
	var size int
	for _, p := range parts {
		size += len(p)
	}
	out := make([]byte, 0, size)
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// Last returns the log's last position: where a follower that has applied
// it is caught up.
func (s *Shards) Last(ctx context.Context) (uint64, error) {
	info, err := s.log.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.State.LastSeq, nil
}

// leadHere asks the leaders of the cluster's streams (the log and the
// buckets) to hand their leadership to the NATS server named server, the
// one embedded in the shards' owner: a standby that dies then never takes
// a leader with it, so the owner's appends and renewals go on without an
// election. A stream that server leads already is left alone.
func (s *Shards) leadHere(ctx context.Context, server string) error {
	req, err := json.Marshal(map[string]any{"placement": map[string]string{"preferred": server}})
	if err != nil {
		return err
	}
	return s.moveLeaders(ctx, req, func(leader string) bool { return leader != server })
}

// leaveLeadership asks the streams that the NATS server named server
// leads to elect another leader, for an owner that stops: the leaders
// move at once, instead of after an election timeout once it is gone.
func (s *Shards) leaveLeadership(ctx context.Context, server string) error {
	return s.moveLeaders(ctx, nil, func(leader string) bool { return leader == server })
}

// moveLeaders asks each of the cluster's streams whose leader move
// approves to step down, with req as the request.
func (s *Shards) moveLeaders(ctx context.Context, req []byte, move func(leader string) bool) error {
	var errs []error
	for _, name := range []string{logStream, "KV_" + ownersBucket, "KV_" + nodesBucket} {
		st, err := s.js.Stream(ctx, name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		info, err := st.Info(ctx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if info.Cluster == nil || !move(info.Cluster.Leader) {
			continue
		}
		msg, err := s.js.Conn().RequestWithContext(ctx, "$JS.API.STREAM.LEADER.STEPDOWN."+name, req)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
			continue
		}
		var resp struct {
			Error *struct {
				Description string `json:"description"`
			} `json:"error"`
		}
		if json.Unmarshal(msg.Data, &resp) == nil && resp.Error != nil {
			errs = append(errs, fmt.Errorf("%s: %s", name, resp.Error.Description))
		}
	}
	return errors.Join(errs...)
}
