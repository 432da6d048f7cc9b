package main

import (
	"flag"
	"fmt"
	"math"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/twind-io/twind/server"
)

// limitFlags defines the flags of the limits and of device certificates.
// The defaults are server.Limits'; the README's Limits table lists them.
// The returned func finishes them once the flags are parsed.
func limitFlags(fs *flag.FlagSet, opts *server.Options) func() error {
	l := &opts.Limits
	fs.DurationVar(&opts.HelloTimeout, "hello-timeout", 10*time.Second, "a device stream that sends no hello for this long is ended with UNAUTHENTICATED")
	streams := fs.Uint("max-streams-per-conn", 2048, "calls in progress on one connection; further ones wait in the client")
	fs.IntVar(&l.MaxConnections, "max-connections", 10_000, "connections in all; further ones wait, unaccepted, until one closes")
	fs.IntVar(&l.MaxHelloWaiting, "max-hello-waiting", 1000, "device streams waiting for their hello, in all; further ones end at once with RESOURCE_EXHAUSTED")
	fs.IntVar(&l.MaxHelloWaitingPerConn, "max-hello-waiting-per-conn", 16, "device streams waiting for their hello on one connection; further ones end at once with RESOURCE_EXHAUSTED")
	headers := byteSize(16 << 10)
	fs.Var(&headers, "max-header-bytes", "largest metadata (headers) of a call; a call with more is refused before it is read")
	fs.IntVar(&l.MaxWatchersPerConn, "max-watchers-per-conn", 100, "WatchTwins and WatchRuleEvents streams on one connection; further ones end at once with RESOURCE_EXHAUSTED")
	fs.IntVar(&l.MaxWatchers, "max-watchers", 1000, "WatchTwins and WatchRuleEvents streams in all; further ones end at once with RESOURCE_EXHAUSTED")
	fs.Float64Var(&l.ReportRate, "report-rate", 100, "reports a second per device, on average (inf: no limit); a report beyond it is refused with RESOURCE_EXHAUSTED")
	fs.IntVar(&l.ReportBurst, "report-burst", 200, "reports per device at once, beyond --report-rate")
	recv := byteSize(4 << 20)
	fs.Var(&recv, "max-recv-msg-size", "largest message twind receives (at least twice --max-document-bytes); a bigger one is refused with RESOURCE_EXHAUSTED")
	fs.DurationVar(&l.KeepaliveTime, "keepalive-time", 30*time.Second, "ping a connection silent for this long (at least 1s)")
	fs.DurationVar(&l.KeepaliveTimeout, "keepalive-timeout", 20*time.Second, "close a connection whose ping is not answered within this long: a dead device shows as disconnected within --keepalive-time plus this")
	fs.DurationVar(&l.KeepaliveMinTime, "keepalive-min-time", 10*time.Second, "clients may ping at most this often; one that pings more often is disconnected")
	fs.StringVar(&opts.DeviceCAFile, "device-ca", envOr("TWIND_DEVICE_CA", ""), "PEM certificate authorities whose client certificates authenticate devices; needs --tls-cert (env TWIND_DEVICE_CA)")
	fs.StringVar(&opts.DeviceCRLFile, "device-crl", envOr("TWIND_DEVICE_CRL", ""), "revocation list (PEM or DER) of --device-ca's certificates, re-read on SIGHUP (env TWIND_DEVICE_CRL)")
	return func() error {
		if *streams > math.MaxUint32 {
			return fmt.Errorf("--max-streams-per-conn %d: at most %d", *streams, uint32(math.MaxUint32))
		}
		l.MaxConcurrentStreams = uint32(*streams)
		if l.ReportRate < 0 || math.IsNaN(l.ReportRate) {
			return fmt.Errorf("--report-rate %v: must be positive, or inf for no limit", l.ReportRate)
		}
		l.MaxRecvMsgSize = int(min(int64(recv), math.MaxInt32))
		l.MaxHeaderBytes = int(min(int64(headers), math.MaxInt32))
		return nil
	}
}

// hangups returns a channel that receives SIGHUP, for server.Options.Reload,
// and a func that stops it.
func hangups() (<-chan os.Signal, func()) {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGHUP)
	return c, func() { signal.Stop(c) }
}
