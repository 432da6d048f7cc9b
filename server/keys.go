package server

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// keySource says where an API key comes from.
type keySource int8

const (
	fromFile keySource = iota + 1 // the --api-keys file
	fromFlag                      // --api-token or --api-token-file
	fromAPI                       // KeyService.CreateKey, stored under k/
)

// tokenKeyName is the name of the admin key of --api-token.
const tokenKeyName = "api-token"

// apiKey is one API key. It holds the key's digest, never the key.
type apiKey struct {
	name    string
	role    role
	digest  [sha256.Size]byte
	source  keySource
	created time.Time
}

func (k *apiKey) proto() *twinv1.Key {
	return &twinv1.Key{Name: k.name, Role: twinv1.Role(k.role), CreateTime: timeProto(k.created),
		Source: twinv1.KeySource(k.source)}
}

// keySet is the keys in force: immutable once built, replaced as a whole.
type keySet struct {
	keys []*apiKey // by name
}

func (ks *keySet) empty() bool { return ks == nil || len(ks.keys) == 0 }

// admins returns the number of admin keys.
func (ks *keySet) admins() int {
	n := 0
	for _, k := range ks.keys {
		if k.role == roleAdmin {
			n++
		}
	}
	return n
}

// sendableToken reports whether a token can be sent as a bearer token: one
// line of printable ASCII without spaces.
func sendableToken(t string) bool {
	for i := 0; i < len(t); i++ {
		if t[i] <= ' ' || t[i] > '~' {
			return false
		}
	}
	return true
}

// lookup returns the key whose digest is the digest of token, or nil. It
// compares the digest with every key's in constant time, so that its time
// tells nothing about the keys.
func (ks *keySet) lookup(token string) *apiKey {
	d := digest(token)
	var found *apiKey
	for _, k := range ks.keys {
		if subtle.ConstantTimeCompare(k.digest[:], d[:]) == 1 {
			found = k
		}
	}
	return found
}

func (ks *keySet) byName(name string) *apiKey {
	i, ok := slices.BinarySearchFunc(ks.keys, name, func(k *apiKey, n string) int { return strings.Compare(k.name, n) })
	if !ok {
		return nil
	}
	return ks.keys[i]
}

// keyStore is where keys made through the API live (twin.Engine).
type keyStore interface {
	PutAPIKey(name string, record []byte) error
	DeleteAPIKey(name string) error
	APIKeys() (map[string][]byte, error)
}

// keyring holds the keys in force. Lookups are lock-free; changes (a
// created or revoked key, a reload of the files) are serialized by mu and
// take effect for every call that starts after them.
type keyring struct {
	store keyStore
	clock func() time.Time
	// file is the --api-keys file; token and tokenFile the admin key of
	// --api-token or --api-token-file. Each may be empty.
	file, token, tokenFile string

	mu  sync.Mutex // serializes changes of set
	set atomic.Pointer[keySet]

	streamsMu sync.Mutex              // protects streams
	streams   map[*keyStream]struct{} // the streams in progress with a key
}

// keyStream is a stream in progress with a key, which needs the role need.
type keyStream struct {
	key    *apiKey
	need   role
	cancel context.CancelCauseFunc
}

// errKeyRevoked ends the streams of a key that was revoked, or whose role
// no longer allows them.
var errKeyRevoked = errors.New("server: the API key of this stream was revoked or lost its role")

// allowedBy reports whether set still has the stream's key with a role that
// allows it.
func (st *keyStream) allowedBy(set *keySet) bool {
	k := set.byName(st.key.name)
	return k != nil && k.digest == st.key.digest && k.role.allows(st.need)
}

// track registers a stream made with key k: install ends it (with
// errKeyRevoked) once k no longer allows it. The caller must call the
// function returned when the stream ends.
func (kr *keyring) track(k *apiKey, need role, cancel context.CancelCauseFunc) (untrack func()) {
	st := &keyStream{key: k, need: need, cancel: cancel}
	kr.streamsMu.Lock()
	if kr.streams == nil {
		kr.streams = map[*keyStream]struct{}{}
	}
	kr.streams[st] = struct{}{}
	kr.streamsMu.Unlock()
	// Keys that changed since the call was authorized, before it was
	// registered, are seen here; later ones by install.
	if !st.allowedBy(kr.current()) {
		cancel(errKeyRevoked)
	}
	return func() {
		kr.streamsMu.Lock()
		delete(kr.streams, st)
		kr.streamsMu.Unlock()
	}
}

// install puts set in force and ends the streams it no longer allows.
func (kr *keyring) install(set *keySet) {
	kr.set.Store(set)
	kr.streamsMu.Lock()
	defer kr.streamsMu.Unlock()
	for st := range kr.streams {
		if !st.allowedBy(set) {
			st.cancel(errKeyRevoked)
		}
	}
}

func (kr *keyring) current() *keySet { return kr.set.Load() }

// keyRecord is a key made through the API, as stored under k/<name>.
type keyRecord struct {
	Role       string    `json:"role"`
	SHA256     string    `json:"sha256"`
	CreateTime time.Time `json:"create_time"`
}

// newKeyring loads the keys made through the API from store, then the file
// and the flag's key.
func newKeyring(store keyStore, clock func() time.Time, file, token, tokenFile string) (*keyring, error) {
	if token != "" && tokenFile != "" {
		return nil, errors.New("--api-token and --api-token-file are both set; give one")
	}
	kr := &keyring{store: store, clock: clock, file: file, token: token, tokenFile: tokenFile}
	recs, err := store.APIKeys()
	if err != nil {
		return nil, fmt.Errorf("read the API keys in the store: %w", err)
	}
	var stored []*apiKey
	for name, b := range recs {
		var rec keyRecord
		r, okRole := roleNone, false
		d, herr := []byte(nil), error(nil)
		err := json.Unmarshal(b, &rec)
		if err == nil {
			r, okRole = parseRole(rec.Role)
			d, herr = hex.DecodeString(rec.SHA256)
		}
		if err != nil || !okRole || herr != nil || len(d) != sha256.Size {
			return nil, fmt.Errorf("the store's API key %q cannot be read (%q); the store is damaged", name, b)
		}
		k := &apiKey{name: name, role: r, source: fromAPI, created: rec.CreateTime}
		copy(k.digest[:], d)
		stored = append(stored, k)
	}
	set, err := kr.build(stored, nil)
	if err != nil {
		return nil, err
	}
	kr.set.Store(set)
	return kr, nil
}

// Reload re-reads the --api-keys file and --api-token-file; keys made
// through the API stay. On an error the keys in force stay as they are.
func (kr *keyring) reload() error {
	kr.mu.Lock()
	defer kr.mu.Unlock()
	cur := kr.current()
	var stored []*apiKey
	for _, k := range cur.keys {
		if k.source == fromAPI {
			stored = append(stored, k)
		}
	}
	set, err := kr.build(stored, cur)
	if err != nil {
		return err
	}
	kr.install(set)
	return nil
}

// build makes a key set of the stored keys, the file's and the flag's.
// Keys that were in prev keep their creation time.
func (kr *keyring) build(stored []*apiKey, prev *keySet) (*keySet, error) {
	now := kr.clock()
	keys := slices.Clone(stored)
	where := map[string]string{}
	for _, k := range stored {
		where[k.name] = "a key made with KeyService.CreateKey"
	}
	add := func(k *apiKey, at string) error {
		if w, ok := where[k.name]; ok {
			return fmt.Errorf("%s: the name %q is taken by %s; give the key another name", at, k.name, w)
		}
		for _, o := range keys {
			if o.digest == k.digest {
				return fmt.Errorf("%s: the same key as %q; every key must be different", at, o.name)
			}
		}
		where[k.name] = at
		k.created = now
		if prev != nil {
			if p := prev.byName(k.name); p != nil && p.digest == k.digest && p.source == k.source {
				k.created = p.created
			}
		}
		keys = append(keys, k)
		return nil
	}
	if kr.file != "" {
		fileKeys, err := parseKeyFile(kr.file)
		if err != nil {
			return nil, err
		}
		if len(fileKeys) == 0 {
			// An emptied file (a truncating redirect, a config tool)
			// must not open the API to anyone.
			return nil, fmt.Errorf("--api-keys %s holds no key: with it, the operator API would be open to anyone; "+
				"add a key line, or run twind without --api-keys", kr.file)
		}
		for _, fk := range fileKeys {
			if err := add(fk.key, fk.at); err != nil {
				return nil, err
			}
		}
	}
	token, at := kr.token, "--api-token"
	if kr.tokenFile != "" {
		b, err := os.ReadFile(kr.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("--api-token-file: %w", err)
		}
		if token, at = strings.TrimSpace(string(b)), kr.tokenFile; token == "" {
			return nil, fmt.Errorf("--api-token-file %s is empty; write the token in it", kr.tokenFile)
		}
	}
	if token != "" && !sendableToken(token) {
		return nil, fmt.Errorf("%s: the token must be one line of printable characters without spaces (a client sends it as 'authorization: Bearer <token>')", at)
	}
	if token != "" {
		if err := add(&apiKey{name: tokenKeyName, role: roleAdmin, digest: digest(token), source: fromFlag}, at); err != nil {
			return nil, err
		}
	}
	slices.SortFunc(keys, func(a, b *apiKey) int { return strings.Compare(a.name, b.name) })
	return &keySet{keys: keys}, nil
}

// fileKey is a key of the --api-keys file and where it is (file:line).
type fileKey struct {
	key *apiKey
	at  string
}

// keyNameRE is what a key's name may be.
var keyNameRE = regexp.MustCompile(`^[A-Za-z0-9._@-]{1,64}$`)

// parseKeyFile reads an --api-keys file: one key a line, `<role> <sha256
// of the key, hex> <name>`, with blank lines and `#` comments. It reports
// the first bad line with its file and line number.
func parseKeyFile(path string) ([]fileKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--api-keys: %w", err)
	}
	var out []fileKey
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		at := fmt.Sprintf("%s:%d", path, n)
		if len(f) != 3 {
			return nil, fmt.Errorf("%s: %d fields; a line is '<role> <sha256 of the key, 64 hex digits> <name>'", at, len(f))
		}
		r, ok := parseRole(f[0])
		if !ok {
			return nil, fmt.Errorf("%s: unknown role %q; use viewer, operator, provisioner or admin", at, f[0])
		}
		d, err := hex.DecodeString(f[1])
		if err != nil || len(d) != sha256.Size {
			return nil, fmt.Errorf("%s: %.70q is not a SHA-256 in hex (64 hex digits); hash the key with: printf %%s \"$KEY\" | sha256sum", at, f[1])
		}
		if !keyNameRE.MatchString(f[2]) {
			return nil, fmt.Errorf("%s: the name %.70q is not 1-64 characters of [A-Za-z0-9._@-]", at, f[2])
		}
		k := &apiKey{name: f[2], role: r, source: fromFile}
		copy(k.digest[:], d)
		out = append(out, fileKey{key: k, at: at})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("--api-keys %s: %w", path, err)
	}
	return out, nil
}

// create makes a key with a role, stores it and puts it in force. It
// returns the key's secret.
func (kr *keyring) create(name string, r role) (*apiKey, string, error) {
	kr.mu.Lock()
	defer kr.mu.Unlock()
	cur := kr.current()
	if k := cur.byName(name); k != nil {
		return nil, "", status.Errorf(codes.AlreadyExists, "a key named %q exists already (%s); choose another name, or revoke it first",
			name, k.sourceText())
	}
	if cur.empty() && r != roleAdmin {
		return nil, "", status.Errorf(codes.FailedPrecondition, "the first key closes the operator API to callers without a key, so it must be an admin key, "+
			"which can manage the others: create %q with the admin role", name)
	}
	secret := "twk_" + base64.RawURLEncoding.EncodeToString(randomBytes(32))
	k := &apiKey{name: name, role: r, digest: digest(secret), source: fromAPI, created: kr.clock()}
	b, err := json.Marshal(keyRecord{Role: r.String(), SHA256: hex.EncodeToString(k.digest[:]), CreateTime: k.created})
	if err != nil {
		return nil, "", err
	}
	if err := kr.store.PutAPIKey(name, b); err != nil {
		return nil, "", err
	}
	keys := append(slices.Clone(cur.keys), k)
	slices.SortFunc(keys, func(a, b *apiKey) int { return strings.Compare(a.name, b.name) })
	kr.install(&keySet{keys: keys})
	return k, secret, nil
}

// restore puts in force a key that an export carried (KeyRecord): its
// name and stored record. A key of that name made through the API is
// replaced only with upsert; a key of the file or the flag never is.
func (kr *keyring) restore(name string, def []byte, upsert bool) error {
	if !keyNameRE.MatchString(name) {
		return status.Errorf(codes.InvalidArgument, "key name %.70q is not 1-64 characters of [A-Za-z0-9._@-]", name)
	}
	var rec keyRecord
	r, okRole := roleNone, false
	var d []byte
	err := json.Unmarshal(def, &rec)
	if err == nil {
		r, okRole = parseRole(rec.Role)
		d, err = hex.DecodeString(rec.SHA256)
	}
	if err != nil || !okRole || len(d) != sha256.Size {
		return status.Errorf(codes.InvalidArgument, "key %q: the record %.100q is not a key as an export writes it "+
			`({"role": "viewer|operator|provisioner|admin", "sha256": "<64 hex digits>", "create_time": ...})`, name, def)
	}
	k := &apiKey{name: name, role: r, source: fromAPI, created: rec.CreateTime}
	copy(k.digest[:], d)
	kr.mu.Lock()
	defer kr.mu.Unlock()
	cur := kr.current()
	old := cur.byName(name)
	switch {
	case old != nil && old.source != fromAPI:
		return status.Errorf(codes.FailedPrecondition, "key %q is %s here; rename one of them", name, old.sourceText())
	case old != nil && !upsert:
		return status.Errorf(codes.AlreadyExists, "a key named %q exists already; import with upsert to replace it", name)
	}
	for _, o := range cur.keys {
		if o.digest == k.digest && o.name != name {
			return status.Errorf(codes.AlreadyExists, "key %q is the same key as %q, which exists already", name, o.name)
		}
	}
	b, err := json.Marshal(keyRecord{Role: r.String(), SHA256: hex.EncodeToString(k.digest[:]), CreateTime: k.created})
	if err != nil {
		return err
	}
	if err := kr.store.PutAPIKey(name, b); err != nil {
		return err
	}
	keys := slices.DeleteFunc(slices.Clone(cur.keys), func(o *apiKey) bool { return o == old })
	keys = append(keys, k)
	slices.SortFunc(keys, func(a, b *apiKey) int { return strings.Compare(a.name, b.name) })
	kr.install(&keySet{keys: keys})
	return nil
}

// revoke deletes a key made through the API; it stops working at once.
func (kr *keyring) revoke(name string) error {
	kr.mu.Lock()
	defer kr.mu.Unlock()
	cur := kr.current()
	k := cur.byName(name)
	switch {
	case k == nil:
		return status.Errorf(codes.NotFound, "no key is named %q; ListKeys lists them", name)
	case k.source == fromFile:
		return status.Errorf(codes.FailedPrecondition, "key %q comes from the --api-keys file %s: delete its line there and send twind SIGHUP", name, kr.file)
	case k.source == fromFlag:
		return status.Errorf(codes.FailedPrecondition, "key %q comes from twind's --api-token or --api-token-file: restart twind without it (or change the file and send twind SIGHUP)", name)
	case len(cur.keys) == 1:
		return status.Errorf(codes.FailedPrecondition, "key %q is the last key: without keys the operator API is open to anyone; create another key first", name)
	case k.role == roleAdmin && cur.admins() == 1:
		return status.Errorf(codes.FailedPrecondition, "key %q is the last admin key: without it nobody could manage keys or rules; create another admin key first", name)
	}
	if err := kr.store.DeleteAPIKey(name); err != nil {
		return err
	}
	keys := slices.DeleteFunc(slices.Clone(cur.keys), func(o *apiKey) bool { return o == k })
	kr.install(&keySet{keys: keys})
	return nil
}

func (k *apiKey) sourceText() string {
	switch k.source {
	case fromFile:
		return "from the --api-keys file"
	case fromFlag:
		return "from --api-token"
	}
	return "made with CreateKey"
}

// keyService implements twinv1.KeyServiceServer.
type keyService struct {
	twinv1.UnimplementedKeyServiceServer
	s *Server
}

func (ks *keyService) CreateKey(ctx context.Context, req *twinv1.CreateKeyRequest) (*twinv1.CreateKeyResponse, error) {
	if !keyNameRE.MatchString(req.GetName()) {
		return nil, invalid("name %.70q is not 1-64 characters of [A-Za-z0-9._@-]", req.GetName())
	}
	r := role(req.GetRole())
	if _, ok := roleNames[r]; !ok {
		if req.GetRole() == 0 {
			return nil, invalid("role is required: ROLE_VIEWER, ROLE_OPERATOR, ROLE_PROVISIONER or ROLE_ADMIN")
		}
		return nil, invalid("role %d is not a role: give ROLE_VIEWER, ROLE_OPERATOR, ROLE_PROVISIONER or ROLE_ADMIN", req.GetRole())
	}
	k, secret, err := ks.s.keys.create(req.GetName(), r)
	if err != nil {
		return nil, ks.s.status("CreateKey", err)
	}
	ks.s.opts.Logger.Info("API key created", "name", k.name, "role", k.role.String(), "by", string(sourceOf(ctx, "api")))
	return &twinv1.CreateKeyResponse{Key: k.proto(), Secret: secret}, nil
}

func (ks *keyService) ListKeys(ctx context.Context, req *twinv1.ListKeysRequest) (*twinv1.ListKeysResponse, error) {
	resp := &twinv1.ListKeysResponse{}
	for _, k := range ks.s.keys.current().keys {
		resp.Keys = append(resp.Keys, k.proto())
	}
	return resp, nil
}

func (ks *keyService) RevokeKey(ctx context.Context, req *twinv1.RevokeKeyRequest) (*twinv1.RevokeKeyResponse, error) {
	if req.GetName() == "" {
		return nil, invalid("name is required: the name of the key to revoke (ListKeys lists them)")
	}
	if err := ks.s.keys.revoke(req.GetName()); err != nil {
		return nil, ks.s.status("RevokeKey", err)
	}
	ks.s.opts.Logger.Info("API key revoked", "name", req.GetName(), "by", string(sourceOf(ctx, "api")))
	return &twinv1.RevokeKeyResponse{}, nil
}

func (ks *keyService) WhoAmI(ctx context.Context, req *twinv1.WhoAmIRequest) (*twinv1.WhoAmIResponse, error) {
	if k := callerFrom(ctx).key; k != nil {
		return &twinv1.WhoAmIResponse{Key: k.proto()}, nil
	}
	return &twinv1.WhoAmIResponse{Open: true}, nil
}

// Reload re-reads what twind reads from files at run time: the --api-keys
// file and --api-token-file, and the device certificate revocation list
// (--device-crl), whose newly revoked certificates' streams end at once.
// What fails to load keeps what was in force, and the error says why. It
// logs what it did. twind calls it on SIGHUP. It is safe for concurrent
// use.
func (s *Server) Reload() error {
	had := !s.keys.current().empty()
	err := errors.Join(s.keys.reload(), s.certs.reload())
	set := s.keys.current()
	if err != nil {
		s.opts.Logger.Error("reload failed; what was in force stays", "err", err)
	} else {
		s.opts.Logger.Info("reloaded", "keys", len(set.keys), "device_crl", s.opts.DeviceCRLFile)
	}
	if had && set.empty() {
		s.opts.Logger.Warn("no API key remains: the operator API is open to anyone who can reach it")
	}
	return err
}
