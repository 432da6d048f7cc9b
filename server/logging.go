package server

import (
	"context"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// sampledLog logs one kind of event at most a few times per interval, so
// that a misbehaving fleet (a device retrying a wrong token a thousand
// times a second) cannot flood the log. Each line it writes says how many
// lines of its kind it left out since the one before. It is safe for
// concurrent use.
type sampledLog struct {
	sometimes rate.Sometimes
	dropped   atomic.Int64
}

func newSampledLog() *sampledLog {
	return &sampledLog{sometimes: rate.Sometimes{First: 10, Interval: 10 * time.Second}}
}

func (l *sampledLog) log(logger *slog.Logger, level slog.Level, msg string, args ...any) {
	l.dropped.Add(1)
	l.sometimes.Do(func() {
		if n := l.dropped.Swap(0) - 1; n > 0 {
			args = append(args, "suppressed", n)
		}
		logger.Log(context.Background(), level, msg, args...)
	})
}

// rpcLog is a gRPC stats handler that logs the failures grpc-go answers
// before any handler of ours runs, such as a request too deeply nested to
// decode (answered INTERNAL by grpc-go, although the client is at fault).
type rpcLog struct {
	logger *slog.Logger
	decode *sampledLog
}

type methodKey struct{}

func (h rpcLog) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	return context.WithValue(ctx, methodKey{}, info.FullMethodName)
}

func (h rpcLog) HandleRPC(ctx context.Context, st stats.RPCStats) {
	end, ok := st.(*stats.End)
	if !ok || end.Error == nil {
		return
	}
	s, _ := status.FromError(end.Error)
	if s.Code() == codes.Internal && strings.Contains(s.Message(), "unmarshal") {
		method, _ := ctx.Value(methodKey{}).(string)
		h.decode.log(h.logger, slog.LevelWarn, "a request could not be decoded and was answered INTERNAL; the client sent a message too deeply nested or not of the method's type",
			"method", method, "err", s.Message())
	}
}

func (rpcLog) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (rpcLog) HandleConn(context.Context, stats.ConnStats)                       {}
