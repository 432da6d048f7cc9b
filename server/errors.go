package server

import (
	"context"
	"errors"
	"log/slog"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/twind-io/twind/rules"
	"github.com/twind-io/twind/twin"
)

// Errors of this package.
var (
	errBadPageToken = errors.New("server: invalid page token")
	errUnauthorized = errors.New("server: unauthenticated")
	errShutdown     = errors.New("server: shutting down")
	// errFutureRevision: a watch asked to start beyond the next revision.
	errFutureRevision = errors.New("server: revision not reached yet")
	// errSlowReader: a stream's client did not take a message in time.
	errSlowReader = errors.New("server: the client is not reading")
)

// toStatus translates an error of any layer into the gRPC status the client
// sees. It is the one place where errors are mapped to codes. Errors the
// client did not cause are logged with their detail and returned as
// INTERNAL without it.
func toStatus(log *slog.Logger, method string, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, twin.ErrNotFound), errors.Is(err, rules.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, twin.ErrAlreadyExists), errors.Is(err, rules.ErrExists):
		code = codes.AlreadyExists
	case errors.Is(err, twin.ErrVersionMismatch), errors.Is(err, twin.ErrFinished):
		code = codes.FailedPrecondition
	case errors.Is(err, twin.ErrInvalidID), errors.Is(err, twin.ErrInvalidArgument),
		errors.Is(err, twin.ErrInvalidPatch), errors.Is(err, rules.ErrInvalid),
		errors.Is(err, errBadPageToken):
		code = codes.InvalidArgument
	case errors.Is(err, twin.ErrLimit):
		code = codes.InvalidArgument
	case errors.Is(err, twin.ErrCompacted), errors.Is(err, errFutureRevision):
		code = codes.OutOfRange
	case errors.Is(err, twin.ErrOverloaded), errors.Is(err, errSlowReader), errors.Is(err, errRateLimited):
		code = codes.ResourceExhausted
	case errors.Is(err, twin.ErrClosed), errors.Is(err, errShutdown):
		code = codes.Unavailable
	case errors.Is(err, errUnauthorized), errors.Is(err, twin.ErrTokenRevoked), errors.Is(err, errKeyRevoked):
		code = codes.Unauthenticated
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	}
	if code == codes.Internal {
		log.Error("internal error", "method", method, "err", err)
		return status.Error(code, "internal error; see the server log")
	}
	return status.Error(code, err.Error())
}

// invalid returns an INVALID_ARGUMENT status.
func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}
