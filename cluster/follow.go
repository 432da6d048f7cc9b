package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

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
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("cluster: follow shard %d's log: %w", vs, err)
	}
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	defer it.Stop()
	var parts [][]byte // of the entry being joined
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
		pos := meta.Sequence.Stream
		h := msg.Headers()
		switch {
		case h.Get(fenceHeader) != "":
			parts = parts[:0] // an entry cut off by its owner's end
			err = apply(pos, nil)
		case h.Get(chunkHeader) != "":
			i, n, ok := parseChunk(h.Get(chunkHeader))
			if !ok {
				return fmt.Errorf("cluster: shard %d's log record %d has a bad %s %q", vs, pos, chunkHeader, h.Get(chunkHeader))
			}
			if i == 1 {
				parts = parts[:0]
			}
			if i != len(parts)+1 {
				continue // a part of an entry whose first part came before from
			}
			parts = append(parts, msg.Data())
			if i == n {
				err = apply(pos, joinParts(parts))
				parts = parts[:0]
			}
		default:
			parts = parts[:0]
			err = apply(pos, msg.Data())
		}
		if err != nil {
			return err
		}
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
		if info.Cluster == nil || info.Cluster.Leader == server {
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
