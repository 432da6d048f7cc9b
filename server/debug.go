package server

import (
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
)

// debugHandler serves /metrics and /debug/pprof/. While any API key exists,
// a request must carry one (any role) as 'Authorization: Bearer <key>';
// while none does, it is served only on a loopback listener (Run refuses
// to start on another with no key). /debug/pprof/cmdline is not served: it
// would show twind's arguments, --api-token among them.
func (s *Server) debugHandler(loopback bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", s.MetricsHandler())
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "not served: it would show twind's command line", http.StatusNotFound)
	})
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		set := s.keys.current()
		if set.empty() {
			if !loopback {
				http.Error(w, "no API key is configured, and this address is not a loopback one: configure keys (--api-keys, --api-token-file), or serve --debug-addr on localhost", http.StatusForbidden)
				return
			}
			mux.ServeHTTP(w, r)
			return
		}
		scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			w.Header().Set("WWW-Authenticate", `Bearer realm="twind"`)
			http.Error(w, "an API key is required: send the header 'Authorization: Bearer <key>'", http.StatusUnauthorized)
			return
		}
		k := set.lookup(strings.TrimSpace(tok))
		if k == nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="twind", error="invalid_token"`)
			http.Error(w, "the API key is not valid: it is unknown or was revoked", http.StatusUnauthorized)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/debug/") && k.role != roleAdmin {
			// Profiles show the server's insides (every goroutine's
			// stack, the heap): for admins, not for a dashboard's key.
			http.Error(w, fmt.Sprintf("profiles need an admin key; key %q has the %s role (/metrics takes any key)", k.name, k.role), http.StatusForbidden)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// exposedAddr reports whether a listener's address can be reached from
// other machines: a TCP address that is not a loopback one.
func exposedAddr(a net.Addr) bool {
	t, ok := a.(*net.TCPAddr)
	return ok && !t.IP.IsLoopback()
}

// loopbackHost reports whether the host of addr (host:port) names only
// loopback addresses: "localhost" or a loopback IP. An empty host listens
// on every interface.
func loopbackHost(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
