package server

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"log/slog"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// role is what an API key may do. The roles are not a ladder: operator and
// provisioner each add their own methods to viewer's, and admin has every
// method.
type role int8

const (
	roleNone role = iota
	roleViewer
	roleOperator
	roleProvisioner
	roleAdmin
)

var roleNames = map[role]string{roleViewer: "viewer", roleOperator: "operator", roleProvisioner: "provisioner", roleAdmin: "admin"}

func (r role) String() string {
	if n, ok := roleNames[r]; ok {
		return n
	}
	return fmt.Sprintf("role(%d)", int8(r))
}

// parseRole reads a role's name.
func parseRole(s string) (role, bool) {
	for r, n := range roleNames {
		if n == s {
			return r, true
		}
	}
	return roleNone, false
}

// allows reports whether a key of role r may call a method that needs the
// role need.
func (r role) allows(need role) bool {
	return r == roleAdmin || need == roleViewer && r != roleNone || r == need
}

// needs says which keys may call a method that needs role r, for refusals.
func (r role) needs() string {
	switch r {
	case roleAdmin:
		return "the admin role"
	case roleViewer:
		return "any key"
	}
	return fmt.Sprintf("the %s role (or admin)", r)
}

// methodRoles is the role each operator method needs: the one place that
// says who may do what. A method missing here is refused to every key but
// admin's (TestMethodRoles fails for it first), so a new method is never
// open by mistake.
var methodRoles = map[string]role{
	// Reads and watches.
	twinv1.TwinService_GetTwin_FullMethodName:             roleViewer,
	twinv1.TwinService_ListTwins_FullMethodName:           roleViewer,
	twinv1.TwinService_WatchTwins_FullMethodName:          roleViewer,
	twinv1.TwinService_ListTwinHistory_FullMethodName:     roleViewer,
	twinv1.CommandService_GetCommand_FullMethodName:       roleViewer,
	twinv1.CommandService_ListCommands_FullMethodName:     roleViewer,
	twinv1.RuleService_GetRule_FullMethodName:             roleViewer,
	twinv1.RuleService_ListRules_FullMethodName:           roleViewer,
	twinv1.RuleService_WatchRuleEvents_FullMethodName:     roleViewer,
	twinv1.RuleService_ValidateRule_FullMethodName:        roleViewer,
	twinv1.RuleService_TestRule_FullMethodName:            roleViewer,
	twinv1.KeyService_WhoAmI_FullMethodName:               roleViewer,
	twinv1.ClusterService_GetClusterStatus_FullMethodName: roleViewer,
	twinv1.TwinService_UpdateDesired_FullMethodName:       roleOperator,
	twinv1.TwinService_ReportState_FullMethodName:         roleOperator,
	twinv1.TwinService_UpdateTwin_FullMethodName:          roleOperator,
	twinv1.CommandService_SendCommand_FullMethodName:      roleOperator,
	twinv1.CommandService_CancelCommand_FullMethodName:    roleOperator,
	twinv1.TwinService_CreateTwin_FullMethodName:          roleProvisioner,
	twinv1.TwinService_DeleteTwin_FullMethodName:          roleProvisioner,
	twinv1.TwinService_IssueDeviceToken_FullMethodName:    roleProvisioner,
	// Rules command every device they match; an export holds device token
	// hashes and an import replaces twins and their tokens.
	twinv1.RuleService_CreateRule_FullMethodName:  roleAdmin,
	twinv1.RuleService_UpdateRule_FullMethodName:  roleAdmin,
	twinv1.RuleService_DeleteRule_FullMethodName:  roleAdmin,
	twinv1.TwinService_ImportTwins_FullMethodName: roleAdmin,
	twinv1.TwinService_ExportTwins_FullMethodName: roleAdmin,
	twinv1.KeyService_CreateKey_FullMethodName:    roleAdmin,
	twinv1.KeyService_ListKeys_FullMethodName:     roleAdmin,
	twinv1.KeyService_RevokeKey_FullMethodName:    roleAdmin,
}

// openServices need no API key: devices authenticate on their stream with
// their own credentials, and health checks and reflection are for anyone.
var openServices = []string{"/twin.v1.DeviceService/", "/grpc.health.v1.", "/grpc.reflection."}

func openMethod(method string) bool {
	for _, p := range openServices {
		if strings.HasPrefix(method, p) {
			return true
		}
	}
	return false
}

// caller is who made a call, as the interceptor found: a key, or, for
// ReportState, a bearer token that is no API key and may be the device's
// own token (the handler checks it against the twin), or nobody on an open
// server.
type caller struct {
	// open says the server has no API key: anyone may call.
	open        bool
	key         *apiKey
	deviceToken string
	// device is, for ReportState without a bearer token, the device id
	// of the call's verified client certificate (devicecert.go).
	device string
}

type callerKey struct{}

// callerFrom returns the caller the interceptor found; the zero caller if
// the API is open.
func callerFrom(ctx context.Context) caller {
	c, _ := ctx.Value(callerKey{}).(caller)
	return c
}

// sourceOf is the source of a change made by the caller of ctx:
// "key:<name>" for a key, def on an open server.
func sourceOf(ctx context.Context, def twin.Source) twin.Source {
	if k := callerFrom(ctx).key; k != nil {
		return twin.KeySource(k.name)
	}
	return def
}

// apiAuth checks the API key of every call of the operator services against
// the keys of its keyring, and the key's role against methodRoles. While
// the keyring is empty, the operator API is open.
type apiAuth struct {
	keys *keyring
	// certDevice, if set, returns the device a call's verified client
	// certificate names: "" if it presented none, an error if the one it
	// presented cannot be used (revoked, or naming no device).
	certDevice func(context.Context) (string, error)
	// logger and failures log refused calls, sampled.
	logger   *slog.Logger
	failures *sampledLog
}

// bearer returns the token of the call's 'authorization: Bearer <token>'.
func bearer(md metadata.MD) (string, bool) {
	vals := md.Get("authorization")
	if len(vals) == 0 {
		return "", false
	}
	// The scheme is case-insensitive (RFC 7235). The token is all that
	// follows, less the spaces and tabs around it, and must be one that
	// can be sent: an empty one is none (it would match no key and pass
	// for a device's token of nothing).
	scheme, tok, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.Trim(tok, " \t")
	return tok, tok != "" && sendableToken(tok)
}

// authorize checks a call and returns its context with the caller in it.
func (a *apiAuth) authorize(ctx context.Context, method string) (context.Context, error) {
	if openMethod(method) {
		return ctx, nil
	}
	set := a.keys.current()
	if set.empty() {
		c := caller{open: true}
		if method == twinv1.TwinService_ReportState_FullMethodName && a.certDevice != nil {
			// Even on an open server, a device that reports with its
			// certificate (and no other credentials) reports for its own
			// twin only.
			if md, _ := metadata.FromIncomingContext(ctx); len(md.Get("authorization")) == 0 {
				c.device, _ = a.certDevice(ctx) // a revoked one is no one's: the API is open
			}
		}
		return context.WithValue(ctx, callerKey{}, c), nil
	}
	need, ok := methodRoles[method]
	if !ok {
		need = roleAdmin
	}
	md, _ := metadata.FromIncomingContext(ctx)
	tok, ok := bearer(md)
	if method == twinv1.TwinService_ReportState_FullMethodName && a.certDevice != nil {
		dev, err := a.certDevice(ctx)
		if err != nil {
			// A device whose certificate is revoked is refused,
			// whatever token it also sends.
			return nil, err
		}
		if dev != "" && !ok && len(md.Get("authorization")) == 0 {
			// A device with a certificate reports for its own twin,
			// which the handler checks.
			return context.WithValue(ctx, callerKey{}, caller{device: dev}), nil
		}
	}
	if !ok {
		if len(md.Get("authorization")) > 0 {
			return nil, status.Error(codes.Unauthenticated, "the authorization metadata must be 'Bearer <key>' (the scheme Bearer, a space, the key)")
		}
		return nil, status.Error(codes.Unauthenticated, "this server requires an API key: send the metadata 'authorization: Bearer <key>'")
	}
	k := set.lookup(tok)
	if k == nil {
		if method == twinv1.TwinService_ReportState_FullMethodName {
			// Maybe the device's own token: the handler checks it
			// against the twin it reports for.
			return context.WithValue(ctx, callerKey{}, caller{deviceToken: tok}), nil
		}
		return nil, status.Error(codes.Unauthenticated, "the API key is not valid: it is unknown or was revoked")
	}
	if !k.role.allows(need) {
		return nil, status.Errorf(codes.PermissionDenied, "%s needs %s; key %q has the %s role",
			method[strings.LastIndexByte(method, '/')+1:], need.needs(), k.name, k.role)
	}
	return context.WithValue(ctx, callerKey{}, caller{key: k}), nil
}

func (a *apiAuth) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	actx, err := a.authorize(ctx, info.FullMethod)
	if err != nil {
		a.refused(ctx, info.FullMethod, err)
		return nil, err
	}
	return handler(actx, req)
}

func (a *apiAuth) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, err := a.authorize(ss.Context(), info.FullMethod)
	if err != nil {
		a.refused(ss.Context(), info.FullMethod, err)
		return err
	}
	if k := callerFrom(ctx).key; k != nil {
		// A stream outlives its authorization: it ends when its key is
		// revoked or no longer allows it.
		var cancel context.CancelCauseFunc
		ctx, cancel = context.WithCancelCause(ctx)
		defer cancel(nil)
		defer a.keys.track(k, methodRoles[info.FullMethod], cancel)()
	}
	if ctx != ss.Context() {
		ss = contextStream{ServerStream: ss, ctx: ctx}
	}
	return handler(srv, ss)
}

// refused logs a call refused for its credentials, with where it came from.
func (a *apiAuth) refused(ctx context.Context, method string, err error) {
	if a.logger == nil {
		return
	}
	addr := ""
	if p, ok := peer.FromContext(ctx); ok {
		addr = p.Addr.String()
	}
	msg := "operator call refused: authentication failed"
	if status.Code(err) == codes.PermissionDenied {
		msg = "operator call refused: the key's role does not allow it"
	}
	a.failures.log(a.logger, slog.LevelWarn, msg, "method", method, "peer", addr, "reason", status.Convert(err).Message())
}

// deviceTokenValid reports whether token is the device token of twin id.
// An unknown twin and a wrong token are alike to the caller, so that a
// stranger cannot probe for device ids.
func (s *Server) deviceTokenValid(id, token string) bool {
	h := hashToken(token) // first, whether the twin exists or not
	tw, err := s.engine.Get(id)
	want := make([]byte, len(h)) // compared against for a twin without a token
	if err == nil && tw.TokenHash != nil {
		want = tw.TokenHash
	}
	return subtle.ConstantTimeCompare(want, h) == 1 && token != "" && err == nil && tw.TokenHash != nil
}

// digest is the SHA-256 of a key, as keys are stored and compared.
func digest(key string) [sha256.Size]byte { return sha256.Sum256([]byte(key)) }
