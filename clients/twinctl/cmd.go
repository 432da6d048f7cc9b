package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"sigs.k8s.io/yaml"

	"github.com/twind-io/twind/clients/twind"
)

// app holds the global flags and the connection.
type app struct {
	addr   string
	token  string
	tls    bool
	tlsCA  string
	output string
	client *twind.Client
}

func (a *app) connect() (*twind.Client, error) {
	if a.client == nil {
		opts := []grpc.DialOption{twind.WithToken(a.token)}
		if a.tls || a.tlsCA != "" {
			o, err := twind.WithTLS(a.tlsCA)
			if err != nil {
				return nil, err
			}
			opts = append(opts, o)
		}
		c, err := twind.Dial(a.addr, opts...)
		if err != nil {
			return nil, err
		}
		a.client = c
	}
	return a.client, nil
}

// errorText says what went wrong in one line: a gRPC error by its code and
// the server's message.
func errorText(err error) string {
	if st, ok := status.FromError(err); ok {
		return fmt.Sprintf("%s: %s", st.Code(), st.Message())
	}
	return err.Error()
}

func newRoot() *cobra.Command {
	a := &app{addr: os.Getenv("TWIND_ADDR"), token: os.Getenv("TWIND_TOKEN"), tlsCA: os.Getenv("TWIND_TLS_CA")}
	if a.addr == "" {
		a.addr = "localhost:50051"
	}
	root := &cobra.Command{
		Use:           "twinctl",
		Short:         "Manage twind: twins, rules and commands",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			switch a.output {
			case outTable, outJSON, outJSONL:
				return nil
			}
			return fmt.Errorf("-o must be table, json or jsonl, not %q", a.output)
		},
		PersistentPostRun: func(*cobra.Command, []string) {
			if a.client != nil {
				a.client.Close()
			}
		},
	}
	root.PersistentFlags().StringVar(&a.addr, "addr", a.addr, "twind address (env TWIND_ADDR)")
	root.PersistentFlags().StringVar(&a.token, "token", a.token, "API key, if the server requires one (env TWIND_TOKEN)")
	root.PersistentFlags().BoolVar(&a.tls, "tls", false, "connect with TLS, trusting the system's certificate authorities")
	root.PersistentFlags().StringVar(&a.tlsCA, "tls-ca", a.tlsCA, "connect with TLS, trusting the authorities in this PEM file (env TWIND_TLS_CA)")
	root.PersistentFlags().StringVarP(&a.output, "output", "o", outTable,
		"output: table, json (one document; a list is {kind, items, next_page_token}) or jsonl (one compact object per line)")
	root.AddCommand(twinCmd(a), ruleCmd(a), commandCmd(a), keyCmd(a), clusterCmd(a), importCmd(a), exportCmd(a), certCmd())
	return root
}

// Output formats (-o).
const (
	outTable = "table" // aligned columns, for people
	outJSON  = "json"  // one JSON document: the object, or a list object
	outJSONL = "jsonl" // one compact JSON object per line: lists and streams
)

// marshal renders m as protojson with the .proto's field names
// (create_time, as the README and filters spell them) and stable whitespace
// (protojson varies its spacing on purpose, so its output is normalized):
// indented, or compact on one line.
func marshal(m proto.Message, indent bool) ([]byte, error) {
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if indent {
		err = json.Indent(&buf, b, "", "  ")
	} else {
		err = json.Compact(&buf, b)
	}
	return buf.Bytes(), err
}

// printMessage prints one message: indented for -o json, on one line for
// -o jsonl.
func (a *app) printMessage(w io.Writer, m proto.Message) error {
	b, err := marshal(m, a.output != outJSONL)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// printLine prints one message of a stream on one line, for -o json and
// -o jsonl alike: a stream has no end, so it cannot be one document.
func printLine(w io.Writer, m proto.Message) error {
	b, err := marshal(m, false)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// listDoc is what -o json prints for a list, as kubectl does: one object
// holding the items, and where the listing stopped if it stopped short.
type listDoc struct {
	Kind  string            `json:"kind"`
	Items []json.RawMessage `json:"items"`
	// NextPageToken continues the listing (--page-token) when it stopped
	// short of the end; absent when it is complete.
	NextPageToken string `json:"next_page_token,omitempty"`
	// Revision is ListTwins' revision: every change up to it is in the
	// list. A string, as protojson writes 64-bit integers.
	Revision int64 `json:"revision,omitempty,string"`
}

// printList prints a list: one list object for -o json, one object per line
// for -o jsonl. Table output is the caller's.
func (a *app) printList(w io.Writer, doc listDoc, items []proto.Message) error {
	if a.output == outJSONL {
		for _, m := range items {
			if err := printLine(w, m); err != nil {
				return err
			}
		}
		return nil
	}
	doc.Items = make([]json.RawMessage, len(items))
	for i, m := range items {
		b, err := marshal(m, false)
		if err != nil {
			return err
		}
		doc.Items[i] = b
	}
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	return enc.Encode(doc)
}

// more tells a person, on standard error, that a list stopped short of the
// end (-o json says so in next_page_token instead).
func (a *app) more(cmd *cobra.Command, shown int, what, next string) {
	if next == "" || a.output == outJSON {
		return
	}
	if shown == 1 {
		what = strings.TrimSuffix(what, "s")
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "twinctl: showing %d %s; there are more: raise --limit (0 for all) or go on with --page-token %s\n",
		shown, what, next)
}

// messages converts a slice of messages of one type to proto.Message.
func messages[M proto.Message](ms []M) []proto.Message {
	out := make([]proto.Message, len(ms))
	for i, m := range ms {
		out[i] = m
	}
	return out
}

// table prints rows under a header, aligned.
func table(w io.Writer, header []string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

// compact renders a Struct as one line of JSON ("-" for none).
func compact(s *structpb.Struct) string {
	if s == nil || len(s.Fields) == 0 {
		return "-"
	}
	b, _ := json.Marshal(s.AsMap())
	return string(b)
}

func ts(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().Local().Format(time.DateTime)
}

// parseStruct reads a JSON object given on the command line; "-" reads
// standard input.
func parseStruct(cmd *cobra.Command, s string) (*structpb.Struct, error) {
	if s == "-" {
		b, err := io.ReadAll(cmd.InOrStdin())
		if err != nil {
			return nil, err
		}
		s = string(b)
	}
	out := &structpb.Struct{}
	if err := out.UnmarshalJSON([]byte(s)); err != nil {
		return nil, fmt.Errorf("%.60q is not a JSON object: %v", s, err)
	}
	return out, nil
}

// readMessage reads a message from a YAML or JSON file ("-" for standard
// input). A file may hold the message itself or a request wrapping it under
// `field` (as the example rules do).
func readMessage(cmd *cobra.Command, path, field string, m proto.Message) error {
	var b []byte
	var err error
	if path == "-" {
		b, err = io.ReadAll(cmd.InOrStdin())
	} else {
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return err
	}
	js, err := yaml.YAMLToJSON(b)
	if err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	var probe map[string]json.RawMessage
	if json.Unmarshal(js, &probe) == nil && len(probe) == 1 && probe[field] != nil {
		js = probe[field]
	}
	if err := protojson.Unmarshal(js, m); err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	return nil
}

func durationFlag(d time.Duration) *durationpb.Duration {
	if d <= 0 {
		return nil
	}
	return durationpb.New(d)
}

func sortedLabels(m map[string]string) string {
	if len(m) == 0 {
		return "-"
	}
	var kv []string
	for k, v := range m {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}

// parseLabels reads k=v pairs.
func parseLabels(pairs []string) (map[string]string, error) {
	if len(pairs) == 0 {
		return nil, nil
	}
	out := map[string]string{}
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("label %q is not key=value", p)
		}
		out[k] = v
	}
	return out, nil
}

// readJSON reads a message written as protojson.
func readJSON(s string, m proto.Message) error {
	if err := protojson.Unmarshal([]byte(s), m); err != nil {
		return fmt.Errorf("%.60q: %v", s, err)
	}
	return nil
}
