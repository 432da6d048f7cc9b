package server

import (
	"context"
	"crypto/subtle"
	"log/slog"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// apiAuth checks the operator token on every call of the operator services
// (TwinService, CommandService, RuleService). Devices authenticate with
// their own tokens in DeviceService.Connect; health checks and reflection
// stay open.
type apiAuth struct {
	token []byte // empty: no check
	// logger and failures log refused calls, sampled.
	logger   *slog.Logger
	failures *sampledLog
}

func (a apiAuth) needed(method string) bool {
	if len(a.token) == 0 {
		return false
	}
	for _, open := range []string{"/twin.v1.DeviceService/", "/grpc.health.v1.", "/grpc.reflection."} {
		if strings.HasPrefix(method, open) {
			return false
		}
	}
	return true
}

func (a apiAuth) check(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) == 0 {
		return status.Error(codes.Unauthenticated, "this server requires an API token: send the metadata 'authorization: Bearer <token>'")
	}
	// The scheme is case-insensitive (RFC 7235).
	scheme, tok, ok := strings.Cut(vals[0], " ")
	if ok && !strings.EqualFold(scheme, "Bearer") {
		ok = false
	}
	if !ok || subtle.ConstantTimeCompare([]byte(tok), a.token) != 1 {
		return status.Error(codes.Unauthenticated, "the API token is not valid")
	}
	return nil
}

func (a apiAuth) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if a.needed(info.FullMethod) {
		if err := a.check(ctx); err != nil {
			a.refused(ctx, info.FullMethod, err)
			return nil, err
		}
	}
	return handler(ctx, req)
}

func (a apiAuth) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if a.needed(info.FullMethod) {
		if err := a.check(ss.Context()); err != nil {
			a.refused(ss.Context(), info.FullMethod, err)
			return err
		}
	}
	return handler(srv, ss)
}

// refused logs a call refused for its credentials, with where it came from.
func (a apiAuth) refused(ctx context.Context, method string, err error) {
	if a.logger == nil {
		return
	}
	addr := ""
	if p, ok := peer.FromContext(ctx); ok {
		addr = p.Addr.String()
	}
	a.failures.log(a.logger, slog.LevelWarn, "operator call refused: authentication failed",
		"method", method, "peer", addr, "reason", status.Convert(err).Message())
}
