package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/twin"
)

// keyLine is a line of an --api-keys file for key.
func keyLine(role, key, name string) string {
	d := sha256.Sum256([]byte(key))
	return fmt.Sprintf("%s %s %s\n", role, hex.EncodeToString(d[:]), name)
}

// writeKeys writes an --api-keys file and returns its path.
func writeKeys(t *testing.T, path, content string) string {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "keys")
	}
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// as is a context whose calls carry key.
func as(key string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+key)
}

// roleKeys is an --api-keys file with a key of each role, each key its
// role's name with "-secret" appended.
var roleKeys = "# one key of each role\n\n" +
	keyLine("viewer", "viewer-secret", "vera") +
	keyLine("operator", "operator-secret", "otto") + "   # a comment after a key\n" +
	keyLine("provisioner", "provisioner-secret", "pia") +
	keyLine("admin", "admin-secret", "ada")

// services are the clients of every operator service on s.
type services struct {
	twins    twinv1.TwinServiceClient
	commands twinv1.CommandServiceClient
	rules    twinv1.RuleServiceClient
	keys     twinv1.KeyServiceClient
}

func clients(s *testServer) services {
	return services{twins: s.twins, commands: twinv1.NewCommandServiceClient(s.conn),
		rules: twinv1.NewRuleServiceClient(s.conn), keys: twinv1.NewKeyServiceClient(s.conn)}
}

// TestMethodRoles fails for an operator method that methodRoles does not
// name, and for an entry that names no method: every method's role is
// decided in one place, on purpose.
func TestMethodRoles(t *testing.T) {
	s := startServer(t, nil, nil)
	registered := map[string]bool{}
	for svc, info := range s.grpc.GetServiceInfo() {
		for _, m := range info.Methods {
			name := "/" + svc + "/" + m.Name
			if openMethod(name) {
				continue
			}
			registered[name] = true
			if _, ok := methodRoles[name]; !ok {
				t.Errorf("%s has no entry in methodRoles: say which role may call it", name)
			}
		}
	}
	for name := range methodRoles {
		if !registered[name] {
			t.Errorf("methodRoles names %s, which the server does not serve", name)
		}
	}
	if len(registered) < 25 {
		t.Errorf("only %d operator methods registered; the walk missed services", len(registered))
	}
}

// TestRoles makes, for every role, a call the role allows and one it does
// not, and checks the calls without a key and with a wrong one.
func TestRoles(t *testing.T) {
	file := writeKeys(t, "", roleKeys)
	s := startServer(t, nil, func(o *Options) { o.APIKeysFile = file })
	c := clients(s)
	admin := as("admin-secret")
	if _, err := c.twins.CreateTwin(admin, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "f1", Type: "fridge"}}); err != nil {
		t.Fatal(err)
	}
	patch := mustStruct(t, map[string]any{"target_c": 4.0})
	rule := &twinv1.Rule{Id: "warm", Condition: "twin.reported.temp_c > 8.0",
		Actions: []*twinv1.Action{{Action: &twinv1.Action_Emit{Emit: &twinv1.EmitAction{Message: "'warm'"}}}}}
	calls := map[string]func(ctx context.Context) error{
		"ListTwins": func(ctx context.Context) error {
			_, err := c.twins.ListTwins(ctx, &twinv1.ListTwinsRequest{})
			return err
		},
		"WatchTwins": func(ctx context.Context) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			st, err := c.twins.WatchTwins(ctx, &twinv1.WatchTwinsRequest{StartRevision: 1})
			if err == nil {
				_, err = st.Recv() // the creation of f1
			}
			return err
		},
		"UpdateDesired": func(ctx context.Context) error {
			_, err := c.twins.UpdateDesired(ctx, &twinv1.UpdateDesiredRequest{Id: "f1", Patch: patch})
			return err
		},
		"CreateTwin": func(ctx context.Context) error {
			_, err := c.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "new-" + fmt.Sprint(ctx.Value(nameKey{}))}})
			return err
		},
		"SendCommand": func(ctx context.Context) error {
			_, err := c.commands.SendCommand(ctx, &twinv1.SendCommandRequest{DeviceId: "f1", Name: "defrost"})
			return err
		},
		"IssueDeviceToken": func(ctx context.Context) error {
			_, err := c.twins.IssueDeviceToken(ctx, &twinv1.IssueDeviceTokenRequest{Id: "f1"})
			return err
		},
		"CreateRule": func(ctx context.Context) error {
			_, err := c.rules.CreateRule(ctx, &twinv1.CreateRuleRequest{Rule: rule})
			return err
		},
		"ListKeys": func(ctx context.Context) error {
			_, err := c.keys.ListKeys(ctx, &twinv1.ListKeysRequest{})
			return err
		},
	}
	for _, tc := range []struct {
		key, name, role string
		allowed, denied []string
		needs           string // what the refusal of denied[0] names
	}{
		{"viewer-secret", "vera", "viewer", []string{"ListTwins", "WatchTwins"}, []string{"UpdateDesired", "CreateTwin", "CreateRule", "ListKeys"}, "the operator role (or admin)"},
		{"operator-secret", "otto", "operator", []string{"UpdateDesired", "SendCommand", "ListTwins"}, []string{"CreateTwin", "IssueDeviceToken", "CreateRule"}, "the provisioner role (or admin)"},
		{"provisioner-secret", "pia", "provisioner", []string{"CreateTwin", "IssueDeviceToken", "ListTwins"}, []string{"SendCommand", "UpdateDesired", "ListKeys"}, "the operator role (or admin)"},
		{"admin-secret", "ada", "admin", []string{"CreateRule", "ListKeys", "UpdateDesired", "CreateTwin", "WatchTwins"}, nil, ""},
	} {
		ctx := context.WithValue(as(tc.key), nameKey{}, tc.name)
		for _, m := range tc.allowed {
			if err := calls[m](ctx); err != nil {
				t.Errorf("%s as %s: %v; want it allowed", m, tc.role, err)
			}
		}
		for i, m := range tc.denied {
			err := calls[m](ctx)
			if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), fmt.Sprintf("key %q has the %s role", tc.name, tc.role)) {
				t.Errorf("%s as %s = %v; want PERMISSION_DENIED naming the key's role", m, tc.role, err)
			}
			if i == 0 && !strings.Contains(err.Error(), "needs "+tc.needs) {
				t.Errorf("%s as %s = %v; want it to say it needs %s", m, tc.role, err, tc.needs)
			}
		}
		who, err := c.keys.WhoAmI(ctx, &twinv1.WhoAmIRequest{})
		if err != nil || who.Key.GetName() != tc.name || who.Key.GetRole().String() != "ROLE_"+strings.ToUpper(tc.role) || who.Open {
			t.Errorf("WhoAmI as %s = %v, %v", tc.role, who, err)
		}
	}

	// No key, a wrong key, a key in the wrong scheme.
	for name, ctx := range map[string]context.Context{
		"no key":      context.Background(),
		"a wrong key": as("admin-secreT"),
		"basic auth":  metadata.AppendToOutgoingContext(context.Background(), "authorization", "Basic admin-secret"),
	} {
		for _, m := range []string{"ListTwins", "WatchTwins", "UpdateDesired", "ListKeys"} {
			if err := calls[m](ctx); status.Code(err) != codes.Unauthenticated {
				t.Errorf("%s with %s = %v; want UNAUTHENTICATED", m, name, err)
			}
		}
		if _, err := c.keys.WhoAmI(ctx, &twinv1.WhoAmIRequest{}); status.Code(err) != codes.Unauthenticated {
			t.Errorf("WhoAmI with %s = %v; want UNAUTHENTICATED", name, err)
		}
	}
	if err := calls["ListTwins"](context.Background()); !strings.Contains(fmt.Sprint(err), "authorization: Bearer <key>") {
		t.Errorf("a call without a key = %v; want it to say how to send one", err)
	}
	// Health and reflection stay open.
	if h, err := healthpb.NewHealthClient(s.conn).Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil || h.Status != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health without a key = %v, %v; want SERVING", h, err)
	}
}

type nameKey struct{}

// TestOpenWithoutKeys: with no key configured, every call is allowed
// without one, WhoAmI says the API is open, and changes have the source
// "api" as before.
func TestOpenWithoutKeys(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	c := clients(s)
	who, err := c.keys.WhoAmI(ctx, &twinv1.WhoAmIRequest{})
	if err != nil || !who.Open || who.Key != nil {
		t.Errorf("WhoAmI on an open server = %v, %v; want open", who, err)
	}
	if _, err := c.twins.CreateTwin(ctx, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "f1"}}); err != nil {
		t.Fatal(err)
	}
	// A bearer that is no key is ignored on an open server.
	if _, err := c.twins.UpdateDesired(as("whatever"), &twinv1.UpdateDesiredRequest{Id: "f1", Patch: mustStruct(t, map[string]any{"a": 1.0})}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: "f1", Patch: mustStruct(t, map[string]any{"b": 1.0})}); err != nil {
		t.Fatal(err)
	}
	h, err := c.twins.ListTwinHistory(ctx, &twinv1.ListTwinHistoryRequest{Id: "f1"})
	if err != nil {
		t.Fatal(err)
	}
	if got := sources(h.Events); got != "device api api" {
		t.Errorf("sources on an open server = %q; want %q", got, "device api api")
	}
}

func sources(evs []*twinv1.TwinEvent) string {
	var out []string
	for _, ev := range evs {
		out = append(out, ev.Source)
	}
	return strings.Join(out, " ")
}

// TestKeyFileErrors: a bad --api-keys file stops the server from starting,
// with the file and line of the first bad line and what to fix.
func TestKeyFileErrors(t *testing.T) {
	good := keyLine("viewer", "k1", "one")
	for _, tc := range []struct{ content, want string }{
		{good + "admin abc two\n", ":2: \"abc\" is not a SHA-256 in hex"},
		{good + "\n# c\nroot " + strings.Repeat("a", 64) + " two\n", ":4: unknown role \"root\""},
		{good + "admin " + strings.Repeat("a", 64) + "\n", ":2: 2 fields"},
		{good + "admin " + strings.Repeat("a", 64) + " two extra\n", ":2: 4 fields"},
		{good + keyLine("admin", "k2", "one"), ":2: the name \"one\" is taken by "},
		{good + keyLine("admin", "k1", "two"), ":2: the same key as \"one\""},
		{good + keyLine("admin", "k2", "bad/name"), ":2: the name \"bad/name\" is not"},
	} {
		file := writeKeys(t, "", tc.content)
		_, err := New(Options{DataDir: "db", APIKeysFile: file, Engine: twin.Options{FS: vfs.NewMem()}})
		if err == nil || !strings.Contains(err.Error(), file+tc.want) {
			t.Errorf("New with a key file of\n%s= %v; want an error containing %q", tc.content, err, file+tc.want)
		}
	}
	_, err := New(Options{DataDir: "db", APIKeysFile: "/no/such/file", Engine: twin.Options{FS: vfs.NewMem()}})
	if err == nil || !strings.Contains(err.Error(), "--api-keys") {
		t.Errorf("New with a missing key file = %v", err)
	}
	_, err = New(Options{DataDir: "db", APIToken: "a", APITokenFile: "/x", Engine: twin.Options{FS: vfs.NewMem()}})
	if err == nil || !strings.Contains(err.Error(), "give one") {
		t.Errorf("New with --api-token and --api-token-file = %v", err)
	}
	// A file with no key, or a token that cannot be sent, would leave
	// the API open or unusable: refused.
	for _, tc := range []struct{ content, want string }{
		{"", "holds no key"},
		{"# only a comment\n\n", "holds no key"},
	} {
		file := writeKeys(t, "", tc.content)
		_, err := New(Options{DataDir: "db", APIKeysFile: file, Engine: twin.Options{FS: vfs.NewMem()}})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New with a key file of %q = %v; want an error containing %q", tc.content, err, tc.want)
		}
	}
	for _, token := range []string{" ", "two words", "x\ny"} {
		tf := writeKeys(t, "", token)
		_, err := New(Options{DataDir: "db", APITokenFile: tf, Engine: twin.Options{FS: vfs.NewMem()}})
		if token != " " && (err == nil || !strings.Contains(err.Error(), "one line of printable characters")) {
			t.Errorf("New with the token file %q = %v; want it refused as not sendable", token, err)
		}
		if token == " " && (err == nil || !strings.Contains(err.Error(), "is empty")) {
			t.Errorf("New with a blank token file = %v; want it refused as empty", err)
		}
	}
	// The flag's key takes the name api-token.
	file := writeKeys(t, "", keyLine("admin", "k1", "api-token"))
	_, err = New(Options{DataDir: "db", APIKeysFile: file, APIToken: "k2", Engine: twin.Options{FS: vfs.NewMem()}})
	if err == nil || !strings.Contains(err.Error(), `the name "api-token" is taken`) {
		t.Errorf("New with a file key named api-token and --api-token = %v", err)
	}
}

// TestReload: Reload puts the file's new keys in force and ends the old
// ones; a bad file keeps the keys in force.
func TestReload(t *testing.T) {
	file := writeKeys(t, "", keyLine("viewer", "old-key", "old"))
	tokenFile := writeKeys(t, "", "token-1\n")
	s := startServer(t, nil, func(o *Options) { o.APIKeysFile, o.APITokenFile = file, tokenFile })
	list := func(key string) error {
		_, err := s.twins.ListTwins(as(key), &twinv1.ListTwinsRequest{})
		return err
	}
	if err := list("old-key"); err != nil {
		t.Fatal(err)
	}
	if err := list("token-1"); err != nil {
		t.Fatal(err)
	}
	writeKeys(t, file, keyLine("operator", "new-key", "new"))
	writeKeys(t, tokenFile, "token-2")
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]codes.Code{"old-key": codes.Unauthenticated, "new-key": codes.OK,
		"token-1": codes.Unauthenticated, "token-2": codes.OK} {
		if err := list(key); status.Code(err) != want {
			t.Errorf("after reload, a call with %s = %v; want %v", key, err, want)
		}
	}
	writeKeys(t, file, keyLine("operator", "new-key", "new")+"admin nothex other\n")
	if err := s.Reload(); err == nil || !strings.Contains(err.Error(), file+":2:") {
		t.Errorf("Reload of a bad file = %v; want the error with its line", err)
	}
	if err := list("new-key"); err != nil {
		t.Errorf("after a failed reload, the keys in force: %v; want them kept", err)
	}
	// An emptied file (a truncating redirect before the SIGHUP) would open
	// the API: refused, the keys in force stay.
	writeKeys(t, file, "")
	if err := s.Reload(); err == nil || !strings.Contains(err.Error(), "holds no key") {
		t.Errorf("Reload of an emptied file = %v; want it refused", err)
	}
	if err := list("new-key"); err != nil {
		t.Errorf("after reloading an emptied file, the keys in force: %v; want them kept", err)
	}
	writeKeys(t, file, keyLine("operator", "new-key", "new"))
	os.Remove(tokenFile)
	if err := s.Reload(); err == nil || !strings.Contains(err.Error(), "--api-token-file") {
		t.Errorf("Reload with the token file gone = %v", err)
	}
	if err := list("token-2"); err != nil {
		t.Errorf("after a failed reload, the token in force: %v; want it kept", err)
	}
}

// TestKeyService creates, lists and revokes keys, checks that a created
// key works with its role at once and across a restart, that a revoked one
// stops at once, and that keys of the file and the flag cannot be revoked.
func TestKeyService(t *testing.T) {
	fs := vfs.NewMem()
	file := writeKeys(t, "", keyLine("viewer", "file-key", "watcher"))
	mod := func(o *Options) { o.APIKeysFile, o.APIToken = file, "flag-token" }
	s := startServer(t, fs, mod)
	c := clients(s)
	admin := as("flag-token")
	created, err := c.keys.CreateKey(admin, &twinv1.CreateKeyRequest{Name: "ops", Role: twinv1.Role_ROLE_OPERATOR})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(created.Secret, "twk_") || len(created.Secret) < 40 || created.Key.Source != twinv1.KeySource_KEY_SOURCE_API {
		t.Errorf("CreateKey = %v", created)
	}
	ops := as(created.Secret)
	if who, err := c.keys.WhoAmI(ops, &twinv1.WhoAmIRequest{}); err != nil || who.Key.GetName() != "ops" || who.Key.GetRole() != twinv1.Role_ROLE_OPERATOR {
		t.Errorf("WhoAmI with the new key = %v, %v", who, err)
	}
	if _, err := c.keys.ListKeys(ops, &twinv1.ListKeysRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("ListKeys as an operator = %v; want PERMISSION_DENIED", err)
	}
	for _, tc := range []struct {
		req  *twinv1.CreateKeyRequest
		code codes.Code
	}{
		{&twinv1.CreateKeyRequest{Name: "ops", Role: twinv1.Role_ROLE_VIEWER}, codes.AlreadyExists},
		{&twinv1.CreateKeyRequest{Name: "watcher", Role: twinv1.Role_ROLE_VIEWER}, codes.AlreadyExists},
		{&twinv1.CreateKeyRequest{Name: "x", Role: twinv1.Role_ROLE_UNSPECIFIED}, codes.InvalidArgument},
		{&twinv1.CreateKeyRequest{Name: "no spaces", Role: twinv1.Role_ROLE_VIEWER}, codes.InvalidArgument},
		{&twinv1.CreateKeyRequest{Name: "", Role: twinv1.Role_ROLE_VIEWER}, codes.InvalidArgument},
	} {
		if _, err := c.keys.CreateKey(admin, tc.req); status.Code(err) != tc.code {
			t.Errorf("CreateKey(%v) = %v; want %v", tc.req, err, tc.code)
		}
	}
	list, err := c.keys.ListKeys(admin, &twinv1.ListKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, k := range list.Keys {
		got = append(got, fmt.Sprintf("%s %s %s %v", k.Name, k.Role, k.Source, k.CreateTime != nil))
	}
	want := "api-token ROLE_ADMIN KEY_SOURCE_FLAG true, ops ROLE_OPERATOR KEY_SOURCE_API true, watcher ROLE_VIEWER KEY_SOURCE_FILE true"
	if strings.Join(got, ", ") != want {
		t.Errorf("ListKeys = %s; want %s", strings.Join(got, ", "), want)
	}
	if _, err := c.keys.RevokeKey(admin, &twinv1.RevokeKeyRequest{Name: "watcher"}); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), file) {
		t.Errorf("RevokeKey of a file key = %v; want FAILED_PRECONDITION naming the file", err)
	}
	if _, err := c.keys.RevokeKey(admin, &twinv1.RevokeKeyRequest{Name: "api-token"}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("RevokeKey of the flag's key = %v; want FAILED_PRECONDITION", err)
	}
	if _, err := c.keys.RevokeKey(admin, &twinv1.RevokeKeyRequest{Name: "nobody"}); status.Code(err) != codes.NotFound {
		t.Errorf("RevokeKey of no key = %v; want NOT_FOUND", err)
	}
	temp, err := c.keys.CreateKey(admin, &twinv1.CreateKeyRequest{Name: "temp", Role: twinv1.Role_ROLE_ADMIN})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.keys.RevokeKey(admin, &twinv1.RevokeKeyRequest{Name: "temp"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.twins.ListTwins(as(temp.Secret), &twinv1.ListTwinsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("a call with a revoked key = %v; want UNAUTHENTICATED", err)
	}

	// Across a restart: ops still works, temp still does not.
	if err := s.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if vs, err := twin.Check(twin.Options{Dir: "db", FS: fs}); err != nil || len(vs) != 0 {
		t.Errorf("twind check on a store with API keys = %v, %v; want no violations", vs, err)
	}
	s = startServer(t, fs, mod)
	c = clients(s)
	if who, err := c.keys.WhoAmI(ops, &twinv1.WhoAmIRequest{}); err != nil || who.Key.GetName() != "ops" {
		t.Errorf("after a restart, WhoAmI with the created key = %v, %v", who, err)
	}
	if _, err := c.twins.ListTwins(as(temp.Secret), &twinv1.ListTwinsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("after a restart, a call with a revoked key = %v; want UNAUTHENTICATED", err)
	}
}

// TestFirstKeyClosesTheAPI: on an open server anyone may create the first
// key, which closes the API; the last key cannot be revoked, which would
// open it again.
func TestFirstKeyClosesTheAPI(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, nil, nil)
	c := clients(s)
	// The first key must be an admin's, or nobody could manage keys.
	if _, err := c.keys.CreateKey(ctx, &twinv1.CreateKeyRequest{Name: "dash", Role: twinv1.Role_ROLE_VIEWER}); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "must be an admin key") {
		t.Errorf("a viewer as the first key = %v; want FAILED_PRECONDITION", err)
	}
	if _, err := c.keys.CreateKey(ctx, &twinv1.CreateKeyRequest{Name: "x", Role: 99}); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "99 is not a role") {
		t.Errorf("an unknown role = %v; want INVALID_ARGUMENT naming it", err)
	}
	k, err := c.keys.CreateKey(ctx, &twinv1.CreateKeyRequest{Name: "root", Role: twinv1.Role_ROLE_ADMIN})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.twins.ListTwins(ctx, &twinv1.ListTwinsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("a call without a key after the first key = %v; want UNAUTHENTICATED", err)
	}
	if _, err := c.keys.RevokeKey(as(k.Secret), &twinv1.RevokeKeyRequest{Name: "root"}); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "last key") {
		t.Errorf("revoking the last key = %v; want FAILED_PRECONDITION saying it is the last", err)
	}
	// Nor the last admin key, while other keys remain.
	if _, err := c.keys.CreateKey(as(k.Secret), &twinv1.CreateKeyRequest{Name: "dash", Role: twinv1.Role_ROLE_VIEWER}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.keys.RevokeKey(as(k.Secret), &twinv1.RevokeKeyRequest{Name: "root"}); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "last admin key") {
		t.Errorf("revoking the last admin key = %v; want FAILED_PRECONDITION saying it is the last admin", err)
	}
	if _, err := c.keys.RevokeKey(as(k.Secret), &twinv1.RevokeKeyRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("RevokeKey without a name = %v; want INVALID_ARGUMENT", err)
	}
}

// TestAuditSource: every change and command made with a key names it, and
// history and watches filter by source.
func TestAuditSource(t *testing.T) {
	file := writeKeys(t, "", roleKeys)
	s := startServer(t, nil, func(o *Options) { o.APIKeysFile = file })
	c := clients(s)
	pia, otto := as("provisioner-secret"), as("operator-secret")
	// Each watch ends by the deadline, if the events it waits for never come.
	wctx, cancel := context.WithTimeout(as("viewer-secret"), 20*time.Second)
	defer cancel()
	watch, err := c.twins.WatchTwins(wctx, &twinv1.WatchTwinsRequest{StartRevision: 1, Source: "key:otto"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.twins.CreateTwin(pia, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "f1", Type: "fridge"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.twins.UpdateDesired(otto, &twinv1.UpdateDesiredRequest{Id: "f1", Patch: mustStruct(t, map[string]any{"eco": true})}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.twins.UpdateTwin(otto, &twinv1.UpdateTwinRequest{Id: "f1", Labels: map[string]string{"site": "b"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.twins.ReportState(otto, &twinv1.ReportStateRequest{Id: "f1", Patch: mustStruct(t, map[string]any{"temp_c": 5.0})}); err != nil {
		t.Fatal(err)
	}
	cmd, err := c.commands.SendCommand(otto, &twinv1.SendCommandRequest{DeviceId: "f1", Name: "defrost"})
	if err != nil || cmd.Command.Source != "key:otto" {
		t.Errorf("SendCommand's command = %v, %v; want source key:otto", cmd, err)
	}
	canceled, err := c.commands.CancelCommand(as("admin-secret"), &twinv1.CancelCommandRequest{Id: cmd.GetCommand().GetId()})
	if err != nil || canceled.Command.Message != "canceled by key:ada" {
		t.Errorf("CancelCommand = %v, %v; want the message to name key:ada", canceled, err)
	}
	h, err := c.twins.ListTwinHistory(as("viewer-secret"), &twinv1.ListTwinHistoryRequest{Id: "f1"})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := sources(h.Events), "key:otto key:otto key:otto key:pia"; got != want {
		t.Errorf("history sources = %q; want %q", got, want)
	}
	for filter, want := range map[string]string{"key:pia": "key:pia", "key:*": "key:otto key:otto key:otto key:pia", "device": "", "key:ot*": "key:otto key:otto key:otto"} {
		h, err := c.twins.ListTwinHistory(otto, &twinv1.ListTwinHistoryRequest{Id: "f1", Source: filter})
		if err != nil || sources(h.Events) != want {
			t.Errorf("history with source %q = %q, %v; want %q", filter, sources(h.GetEvents()), err, want)
		}
	}
	// Paging through a filtered history: one at a time.
	var paged []*twinv1.TwinEvent
	req := &twinv1.ListTwinHistoryRequest{Id: "f1", Source: "key:otto", PageSize: 1}
	for {
		h, err := c.twins.ListTwinHistory(otto, req)
		if err != nil {
			t.Fatal(err)
		}
		paged = append(paged, h.Events...)
		if req.PageToken = h.NextPageToken; req.PageToken == "" {
			break
		}
	}
	if got := sources(paged); got != "key:otto key:otto key:otto" {
		t.Errorf("filtered history paged one by one = %q", got)
	}
	for i := range 3 {
		ev, err := watch.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if ev.Event.Source != "key:otto" {
			t.Errorf("watch with source key:otto, event %d: source %q", i, ev.Event.Source)
		}
	}
	if _, err := c.twins.DeleteTwin(pia, &twinv1.DeleteTwinRequest{Id: "f1"}); err != nil {
		t.Fatal(err)
	}
	all, err := c.twins.WatchTwins(wctx, &twinv1.WatchTwinsRequest{StartRevision: 1, Source: "key:pia"})
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for range 2 {
		ev, err := all.Recv()
		if err != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, ev.Event.Kind.String()+" "+ev.Event.Source)
	}
	if got, want := strings.Join(kinds, ", "), "TWIN_EVENT_KIND_CREATED key:pia, TWIN_EVENT_KIND_DELETED key:pia"; got != want {
		t.Errorf("watch with source key:pia = %s; want %s", got, want)
	}
}

// TestDeviceReportState: a device without a stream reports for its own
// twin with its device token, and with nothing else.
func TestDeviceReportState(t *testing.T) {
	file := writeKeys(t, "", roleKeys)
	s := startServer(t, nil, func(o *Options) { o.APIKeysFile = file })
	c := clients(s)
	pia := as("provisioner-secret")
	var tokens []string
	for _, id := range []string{"f1", "f2"} {
		if _, err := c.twins.CreateTwin(pia, &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: id}}); err != nil {
			t.Fatal(err)
		}
		tok, err := c.twins.IssueDeviceToken(pia, &twinv1.IssueDeviceTokenRequest{Id: id})
		if err != nil {
			t.Fatal(err)
		}
		tokens = append(tokens, tok.Token)
	}
	report := func(ctx context.Context, id string) error {
		_, err := c.twins.ReportState(ctx, &twinv1.ReportStateRequest{Id: id, Patch: mustStruct(t, map[string]any{"temp_c": 3.0})})
		return err
	}
	if err := report(as(tokens[0]), "f1"); err != nil {
		t.Fatalf("ReportState with the device's token: %v", err)
	}
	h, err := c.twins.ListTwinHistory(pia, &twinv1.ListTwinHistoryRequest{Id: "f1", PageSize: 1})
	if err != nil || h.Events[0].Source != "device" || h.Events[0].Twin.Presence.GetLastSeen() == nil {
		t.Errorf("the device's report in history = %v, %v; want source device and last_seen set", h, err)
	}
	for name, tc := range map[string]struct {
		ctx  context.Context
		id   string
		code codes.Code
		msg  string
	}{
		"another device's token": {as(tokens[1]), "f1", codes.Unauthenticated, `device token of twin "f1"`},
		"a wrong token":          {as("twd_nope"), "f1", codes.Unauthenticated, "IssueDeviceToken"},
		"an unknown twin":        {as(tokens[0]), "f9", codes.Unauthenticated, `device token of twin "f9"`},
		"no token":               {context.Background(), "f1", codes.Unauthenticated, "API key"},
		"a viewer's key":         {as("viewer-secret"), "f1", codes.PermissionDenied, "operator role"},
	} {
		if err := report(tc.ctx, tc.id); status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("ReportState with %s = %v; want %v saying %q", name, err, tc.code, tc.msg)
		}
	}
	// The device token grants nothing else.
	if _, err := c.twins.GetTwin(as(tokens[0]), &twinv1.GetTwinRequest{Id: "f1"}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("GetTwin with a device token = %v; want UNAUTHENTICATED", err)
	}
	if _, err := c.twins.UpdateDesired(as(tokens[0]), &twinv1.UpdateDesiredRequest{Id: "f1", Patch: mustStruct(t, map[string]any{"a": 1.0})}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("UpdateDesired with a device token = %v; want UNAUTHENTICATED", err)
	}
	// A rotated token stops working.
	if _, err := c.twins.IssueDeviceToken(pia, &twinv1.IssueDeviceTokenRequest{Id: "f1"}); err != nil {
		t.Fatal(err)
	}
	if err := report(as(tokens[0]), "f1"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("ReportState with a rotated token = %v; want UNAUTHENTICATED", err)
	}
	// An operator's key reports too, under its own name.
	if err := report(as("operator-secret"), "f2"); err != nil {
		t.Fatal(err)
	}
}

// TestRevokeEndsStreams: a watch made with a key ends with UNAUTHENTICATED
// when the key is revoked, or reloaded away, and keeps going when the
// reload keeps it.
func TestRevokeEndsStreams(t *testing.T) {
	file := writeKeys(t, "", roleKeys)
	s := startServer(t, nil, func(o *Options) { o.APIKeysFile = file })
	c := clients(s)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	k, err := c.keys.CreateKey(as("admin-secret"), &twinv1.CreateKeyRequest{Name: "w", Role: twinv1.Role_ROLE_VIEWER})
	if err != nil {
		t.Fatal(err)
	}
	watch := func(key string) twinv1.TwinService_WatchTwinsClient {
		st, err := c.twins.WatchTwins(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key), &twinv1.WatchTwinsRequest{StartRevision: 1})
		if err != nil {
			t.Fatal(err)
		}
		// The first event says the stream is set up.
		if _, err := st.Recv(); err != nil {
			t.Fatal(err)
		}
		return st
	}
	if _, err := c.twins.CreateTwin(as("admin-secret"), &twinv1.CreateTwinRequest{Twin: &twinv1.Twin{Id: "f1"}}); err != nil {
		t.Fatal(err)
	}
	byAPI, byFile, kept := watch(k.Secret), watch("viewer-secret"), watch("operator-secret")
	if _, err := c.keys.RevokeKey(as("admin-secret"), &twinv1.RevokeKeyRequest{Name: "w"}); err != nil {
		t.Fatal(err)
	}
	if _, err := byAPI.Recv(); status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("a watch whose key was revoked = %v; want UNAUTHENTICATED saying so", err)
	}
	writeKeys(t, file, strings.ReplaceAll(roleKeys, keyLine("viewer", "viewer-secret", "vera"), ""))
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if _, err := byFile.Recv(); status.Code(err) != codes.Unauthenticated {
		t.Errorf("a watch whose key left the file = %v; want UNAUTHENTICATED", err)
	}
	if _, err := c.twins.UpdateDesired(as("admin-secret"), &twinv1.UpdateDesiredRequest{Id: "f1", Patch: mustStruct(t, map[string]any{"a": 1.0})}); err != nil {
		t.Fatal(err)
	}
	if ev, err := kept.Recv(); err != nil || ev.Event.Kind != twinv1.TwinEventKind_TWIN_EVENT_KIND_DESIRED {
		t.Errorf("a watch whose key the reload kept = %v, %v; want the next event", ev, err)
	}
}
