package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// Input formats of twinctl import (--from).
const (
	fromTwind     = "twind"      // twind's NDJSON: twins, twin records, rules
	fromAWSShadow = "aws-shadow" // AWS IoT Device Shadow documents, one a line
)

func importCmd(a *app) *cobra.Command {
	var (
		upsert, keepVersions, quiet bool
		from, typ                   string
		batch                       int
	)
	cmd := &cobra.Command{
		Use:   "import [FILE]",
		Short: "Import twins from NDJSON (a file, or standard input): a fleet, or a backup made by twinctl export",
		Long: `Import twins in bulk from NDJSON: FILE, or standard input if FILE is absent or "-".

Each line is a twin ({"id": ..., "type": ..., "labels": {...}, "reported": {...},
"desired": {...}}), or a line of a twinctl export file, which restores the
backup (use --keep-versions). With --from aws-shadow, each line is an AWS IoT
Device Shadow document with the thing's name added:
{"thingName": "fridge-1", "state": {"reported": {...}, "desired": {...}},
"metadata": {...}, "version": 7}.

Each batch is acknowledged once durable. Refused lines are printed on standard
error with their line number; twinctl exits with status 1 if any was refused.
A progress line (count, rate, elapsed) is shown on standard error when it is a
terminal, unless --quiet.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if from != fromTwind && from != fromAWSShadow {
				return fmt.Errorf("--from must be %s or %s, not %q", fromTwind, fromAWSShadow, from)
			}
			if batch < 1 || batch > 10000 {
				return fmt.Errorf("--batch must be 1 to 10000, not %d", batch)
			}
			in := cmd.InOrStdin()
			name := "standard input"
			if len(args) == 1 && args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return err
				}
				defer f.Close()
				in, name = f, args[0]
			}
			c, err := a.connect()
			if err != nil {
				return err
			}
			errOut := cmd.ErrOrStderr()
			p := startProgress(errOut, "imported", quiet)
			ctx := cmd.Context()
			stream, err := c.Twins.ImportTwins(ctx)
			if err != nil {
				p.stop()
				return err
			}
			// The reader sends batches; this goroutine reads the answers.
			sent := make(chan error, 1)
			var convFailed atomic.Int64 // lines --from could not convert
			go func() {
				sent <- sendImport(stream, in, &twinv1.ImportTwinsRequest{Upsert: upsert, KeepVersions: keepVersions}, batch, from, typ,
					func(line int, err error) {
						convFailed.Add(1)
						p.printf("%s:%d: INVALID_ARGUMENT: %v\n", name, line, err)
					})
			}()
			var last *twinv1.ImportTwinsResponse
			for {
				m, err := stream.Recv()
				if err != nil {
					p.stop()
					if serr := <-sent; serr != nil && !errors.Is(serr, io.EOF) {
						return fmt.Errorf("%s: %w", name, serr)
					}
					return err
				}
				for _, e := range m.GetErrors() {
					p.printf("%s\n", importErrorText(name, e))
				}
				p.set(m.GetTotalImported())
				if m.GetDone() {
					last = m
					break
				}
			}
			p.stop()
			if err := <-sent; err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if !quiet {
				twins := "twins"
				if last.GetTotalImported() == 1 {
					twins = "twin"
				}
				fmt.Fprintf(errOut, "imported %d %s in %v (%.0f/s), revision %d\n", last.GetTotalImported(), twins,
					p.elapsed().Round(time.Millisecond), float64(last.GetTotalImported())/p.elapsed().Seconds(), last.GetRevision())
			}
			if n := last.GetTotalFailed() + convFailed.Load(); n > 0 {
				what := "items were"
				if n == 1 {
					what = "item was"
				}
				return fmt.Errorf("%d %s refused (listed above); the rest are imported", n, what)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&upsert, "upsert", false, "replace twins (and rules and API keys) that exist instead of refusing them")
	cmd.Flags().BoolVar(&keepVersions, "keep-versions", false, "keep each twin's version (to restore a backup)")
	cmd.Flags().StringVar(&from, "from", fromTwind, "input format: twind (twins and export files) or aws-shadow")
	cmd.Flags().StringVar(&typ, "type", "", "with --from aws-shadow: the device type of the twins")
	cmd.Flags().IntVar(&batch, "batch", 1000, "twins per request")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "no progress and no summary")
	return cmd
}

// importErrorText words one refused item.
func importErrorText(name string, e *twinv1.ImportError) string {
	where := fmt.Sprintf("%s:%d", name, e.GetLine())
	if e.GetLine() == 0 {
		where = fmt.Sprintf("item %d", e.GetIndex())
	}
	if e.GetId() != "" {
		what := "twin"
		switch {
		case e.GetRule():
			what = "rule"
		case e.GetKey():
			what = "key"
		}
		where += fmt.Sprintf(" (%s %s)", what, e.GetId())
	}
	return fmt.Sprintf("%s: %s: %s", where, e.GetCode(), e.GetMessage())
}

// sendImport reads lines from in and sends them in batches, then closes the
// sending side. The first request carries the options. Lines keep their
// numbers: a converted line stays one line, and one that does not convert
// is passed to refuse and sent empty.
func sendImport(stream twinv1.TwinService_ImportTwinsClient, in io.Reader, first *twinv1.ImportTwinsRequest, batch int, from, typ string,
	refuse func(line int, err error)) error {
	r := bufio.NewReaderSize(in, 1<<20)
	req := first
	var buf []byte
	n := 0
	lineNo := 0
	for {
		l, err := r.ReadBytes('\n')
		if len(l) > 0 {
			lineNo++
			if from == fromAWSShadow {
				conv, cerr := awsShadowLine(l, typ)
				if cerr != nil {
					// Refused here; an empty line in its place keeps
					// the server's line numbers those of the input.
					refuse(lineNo, cerr)
				}
				l = append(conv, '\n')
			} else if l[len(l)-1] != '\n' {
				l = append(l, '\n')
			}
			buf = append(buf, l...)
			n++
		}
		if n == batch || (err != nil && n > 0) || len(buf) > 2<<20 {
			req.Ndjson = buf
			if serr := stream.Send(req); serr != nil {
				return serr
			}
			req, buf, n = &twinv1.ImportTwinsRequest{}, nil, 0
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
	}
	if req == first {
		// Nothing read: still send the options, so that the import is
		// one of nothing rather than an error.
		if err := stream.Send(req); err != nil {
			return err
		}
	}
	return stream.CloseSend()
}

// awsShadow is an AWS IoT Device Shadow document, with the thing's name.
type awsShadow struct {
	ThingName string `json:"thingName"`
	ID        string `json:"id"`
	State     struct {
		Reported map[string]any `json:"reported"`
		Desired  map[string]any `json:"desired"`
	} `json:"state"`
	Metadata struct {
		Reported map[string]any `json:"reported"`
		Desired  map[string]any `json:"desired"`
	} `json:"metadata"`
	Version   int64 `json:"version"`
	Timestamp int64 `json:"timestamp"`
}

// awsShadowLine converts one AWS shadow document to a twin line: reported
// and desired carry over, each leaf's metadata timestamp becomes its update
// time, and the shadow's version the twin's (kept with --keep-versions).
// AWS's delta is computed again by twind.
func awsShadowLine(l []byte, typ string) ([]byte, error) {
	var s awsShadow
	if err := json.Unmarshal(l, &s); err != nil {
		return nil, fmt.Errorf("not an AWS shadow document: %v", err)
	}
	id := s.ThingName
	if id == "" {
		id = s.ID
	}
	if id == "" {
		return nil, errors.New(`the shadow document has no "thingName" (add the thing's name to each line)`)
	}
	type meta struct {
		UpdateTime time.Time `json:"update_time"`
		Version    int64     `json:"version"`
	}
	t := struct {
		ID         string            `json:"id"`
		Type       string            `json:"type,omitempty"`
		Reported   map[string]any    `json:"reported,omitempty"`
		Desired    map[string]any    `json:"desired,omitempty"`
		Version    int64             `json:"version,omitempty"`
		UpdateTime *time.Time        `json:"update_time,omitempty"`
		Metadata   map[string]any    `json:"metadata,omitempty"`
		Labels     map[string]string `json:"labels,omitempty"`
	}{ID: id, Type: typ, Reported: s.State.Reported, Desired: s.State.Desired, Version: s.Version}
	if s.Timestamp > 0 {
		u := time.Unix(s.Timestamp, 0).UTC()
		t.UpdateTime = &u
	}
	version := max(s.Version, 1)
	md := map[string]any{}
	for _, side := range []struct {
		name      string
		doc, meta map[string]any
	}{{"reported", s.State.Reported, s.Metadata.Reported}, {"desired", s.State.Desired, s.Metadata.Desired}} {
		out := map[string]meta{}
		awsMeta(side.doc, side.meta, "", func(p string, ts int64) {
			out[p] = meta{UpdateTime: time.Unix(ts, 0).UTC(), Version: version}
		})
		if len(out) > 0 {
			md[side.name] = out
		}
	}
	if len(md) > 0 {
		t.Metadata = md
	}
	return json.Marshal(t)
}

// awsMeta calls fn with the JSON Pointer and timestamp of each leaf of doc
// that AWS's metadata stamps. An array is one leaf, stamped with the latest
// timestamp of its elements.
func awsMeta(doc, meta map[string]any, path string, fn func(string, int64)) {
	for k, v := range doc {
		p := path + "/" + strings.NewReplacer("~", "~0", "/", "~1").Replace(k)
		m := meta[k]
		if sub, ok := v.(map[string]any); ok && len(sub) > 0 {
			if mm, ok := m.(map[string]any); ok {
				awsMeta(sub, mm, p, fn)
			}
			continue
		}
		if ts := latestTimestamp(m); ts > 0 {
			fn(p, ts)
		}
	}
}

func latestTimestamp(m any) int64 {
	switch m := m.(type) {
	case map[string]any:
		if ts, ok := m["timestamp"].(float64); ok && ts > 0 && ts < math.MaxInt32*4 {
			return int64(ts)
		}
		var best int64
		for _, v := range m {
			best = max(best, latestTimestamp(v))
		}
		return best
	case []any:
		var best int64
		for _, v := range m {
			best = max(best, latestTimestamp(v))
		}
		return best
	}
	return 0
}

func exportCmd(a *app) *cobra.Command {
	var (
		file  string
		quiet bool
	)
	cmd := &cobra.Command{
		Use:   "export",
		Short: "Export the whole store, consistent at one revision, as NDJSON: a backup that twinctl import --keep-versions restores",
		Long: `Export every twin (with metadata, token hash, commands and rule states) and
every rule, consistent at one revision, as NDJSON: to standard output, or to
FILE with -f (written to FILE.partial, renamed when complete). The first line
is {"export": {"revision": ..., "time": ...}}, then one line per rule and one
per twin. Restore with: twinctl import --keep-versions FILE

Device tokens are in the file as hashes: keep it as secret as the data
directory. A progress line is shown on standard error when it is a terminal,
unless --quiet.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) (err error) {
			c, err := a.connect()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			var f *os.File
			if file != "" && file != "-" {
				if f, err = os.Create(file + ".partial"); err != nil {
					return err
				}
				defer func() {
					if cerr := f.Close(); err == nil {
						err = cerr
					}
					if err == nil {
						err = os.Rename(file+".partial", file)
					} else {
						os.Remove(file + ".partial")
					}
				}()
				out = f
			}
			w := bufio.NewWriterSize(out, 1<<20)
			errOut := cmd.ErrOrStderr()
			p := startProgress(errOut, "exported", quiet)
			defer p.stop()
			stream, err := c.Twins.ExportTwins(cmd.Context(), &twinv1.ExportTwinsRequest{})
			if err != nil {
				return err
			}
			var header *twinv1.ExportHeader
			var n int64
			mo := protojson.MarshalOptions{UseProtoNames: true}
			for {
				m, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					return err
				}
				if header == nil {
					header = m.GetHeader()
					b, err := mo.Marshal(header)
					if err != nil {
						return err
					}
					fmt.Fprintf(w, "{\"export\":%s}\n", compactJSON(b))
				}
				for _, r := range m.GetRules() {
					b, err := mo.Marshal(r)
					if err != nil {
						return err
					}
					fmt.Fprintf(w, "{\"rule\":%s}\n", compactJSON(b))
				}
				for _, k := range m.GetKeys() {
					b, err := mo.Marshal(k)
					if err != nil {
						return err
					}
					fmt.Fprintf(w, "{\"key\":%s}\n", compactJSON(b))
				}
				// protojson is most of an export's cost: lines are
				// written side by side, then in order.
				twins := m.GetTwins()
				lines := make([][]byte, len(twins))
				errs := make([]error, len(twins))
				var wg sync.WaitGroup
				parts := min(runtime.GOMAXPROCS(0), max(len(twins)/64, 1))
				for p := range parts {
					wg.Go(func() {
						for i := len(twins) * p / parts; i < len(twins)*(p+1)/parts; i++ {
							var b []byte
							b, errs[i] = mo.Marshal(twins[i])
							lines[i] = compactJSON(b)
						}
					})
				}
				wg.Wait()
				for i, l := range lines {
					if errs[i] != nil {
						return errs[i]
					}
					w.Write(l)
					w.WriteByte('\n')
				}
				n += int64(len(m.GetTwins()))
				p.set(n)
			}
			if err := w.Flush(); err != nil {
				return err
			}
			p.stop()
			if !quiet {
				fmt.Fprintf(errOut, "exported %d twins at revision %d in %v\n", n, header.GetRevision(), p.elapsed().Round(time.Millisecond))
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "", "write to this file instead of standard output")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "no progress and no summary")
	return cmd
}

// compactJSON removes protojson's varying whitespace.
func compactJSON(b []byte) []byte {
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		return b
	}
	return buf.Bytes()
}

// progress shows a count, its rate and the time elapsed on one line of a
// terminal, redrawn a few times a second by a goroutine that stop ends.
type progress struct {
	w     io.Writer
	what  string
	start time.Time
	n     atomic.Int64
	live  bool // the line is drawn: w is a terminal and not quiet

	mu      sync.Mutex // serializes writes to w
	done    chan struct{}
	stopped sync.WaitGroup
	once    sync.Once
	end     time.Time
}

func startProgress(w io.Writer, what string, quiet bool) *progress {
	p := &progress{w: w, what: what, start: time.Now(), done: make(chan struct{}), live: !quiet && isTerminal(w)}
	if p.live {
		p.stopped.Add(1)
		go func() {
			defer p.stopped.Done()
			t := time.NewTicker(200 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-p.done:
					return
				case <-t.C:
					p.mu.Lock()
					p.draw()
					p.mu.Unlock()
				}
			}
		}()
	}
	return p
}

func (p *progress) set(n int64) { p.n.Store(n) }

// draw redraws the line; p.mu is held.
func (p *progress) draw() {
	el := time.Since(p.start)
	fmt.Fprintf(p.w, "\r\033[K%s %d twins  %.0f/s  %v", p.what, p.n.Load(), float64(p.n.Load())/el.Seconds(), el.Round(time.Second))
}

// printf prints a line above the progress line.
func (p *progress) printf(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.live {
		fmt.Fprint(p.w, "\r\033[K")
	}
	fmt.Fprintf(p.w, format, args...)
}

// stop ends the progress line and waits for its goroutine.
func (p *progress) stop() {
	p.once.Do(func() {
		p.end = time.Now()
		close(p.done)
		p.stopped.Wait()
		if p.live {
			fmt.Fprint(p.w, "\r\033[K")
		}
	})
}

func (p *progress) elapsed() time.Duration {
	if p.end.IsZero() {
		return time.Since(p.start)
	}
	return p.end.Sub(p.start)
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
