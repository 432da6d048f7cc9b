// Package console is twind's web console: a few static pages and plain
// JavaScript modules, embedded in the binary, that call twind's API over
// the Connect protocol (JSON over HTTP) on the same port. There is no build
// step: the files in static/ are what the browser runs.
//
// The server mounts Handler under every path that is not an RPC.
package console

import (
	"embed"
	"encoding/json"
	"io/fs"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

//go:embed static
var static embed.FS

// Config is what the console learns from the server before its first call.
type Config struct {
	// Services are the full names of the services the server serves, e.g.
	// "twin.v1.TwinService". The console uses the optional ones (such as
	// twin.v1.KeyService, for WhoAmI) only when they are listed.
	Services []string `json:"services"`
	// AuthRequired says the operator API needs a key: the console asks for
	// one before its first call.
	AuthRequired bool `json:"auth_required"`
	// AuthRequiredNow, if set, says it as of each request for the
	// configuration, in place of AuthRequired: keys come and go while the
	// server runs.
	AuthRequiredNow func() bool `json:"-"`
}

// Handler serves the console: its files, and GET /console.json, the
// Config. Anything else is 404. It is safe for concurrent use.
func Handler(cfg Config) http.Handler {
	cfg.Services = slices.Sorted(slices.Values(cfg.Services))
	config := func() []byte {
		c := cfg
		if c.AuthRequiredNow != nil {
			c.AuthRequired = c.AuthRequiredNow()
		}
		b, err := json.Marshal(c)
		if err != nil {
			panic(err) // a Config always encodes
		}
		return b
	}
	files, err := fs.Sub(static, "static")
	if err != nil {
		panic(err)
	}
	fileServer := http.FileServerFS(files)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if svc, _, ok := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/"); ok && slices.Contains(cfg.Services, svc) {
			// A method of a service the server has, in a form the
			// transcoder did not take: say what it takes.
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnsupportedMediaType)
			json.NewEncoder(w).Encode(map[string]string{"code": "invalid_argument",
				"message": "call " + r.URL.Path + " with POST and Content-Type: application/json (a unary call, or application/connect+json " +
					"for a server stream; gRPC-Web and gRPC work too); got " + r.Method + " with Content-Type " + strconv.Quote(r.Header.Get("Content-Type"))})
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			// An RPC to a service or method the server does not have:
			// a Connect error, which Connect clients read from a 404 too.
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			json.NewEncoder(w).Encode(map[string]string{"code": "unimplemented",
				"message": "no such service or method: " + r.URL.Path + " (paths are /<package>.<Service>/<Method>, e.g. /twin.v1.TwinService/GetTwin)"})
			return
		}
		if r.URL.Path != "/" && strings.HasSuffix(r.URL.Path, "/") {
			http.NotFound(w, r) // no directory listings
			return
		}
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		if r.URL.Path == "/console.json" {
			h.Set("Content-Type", "application/json")
			w.Write(config())
			return
		}
		fileServer.ServeHTTP(w, r)
	})
}
