package main

import (
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
			if a.output != "table" && a.output != "json" {
				return fmt.Errorf("-o must be table or json, not %q", a.output)
			}
			return nil
		},
		PersistentPostRun: func(*cobra.Command, []string) {
			if a.client != nil {
				a.client.Close()
			}
		},
	}
	root.PersistentFlags().StringVar(&a.addr, "addr", a.addr, "twind address (env TWIND_ADDR)")
	root.PersistentFlags().StringVar(&a.token, "token", a.token, "API token, if the server requires one (env TWIND_TOKEN)")
	root.PersistentFlags().BoolVar(&a.tls, "tls", false, "connect with TLS, trusting the system's certificate authorities")
	root.PersistentFlags().StringVar(&a.tlsCA, "tls-ca", a.tlsCA, "connect with TLS, trusting the authorities in this PEM file (env TWIND_TLS_CA)")
	root.PersistentFlags().StringVarP(&a.output, "output", "o", "table", "output: table or json")
	root.AddCommand(twinCmd(a), ruleCmd(a), commandCmd(a))
	return root
}

// printJSON writes messages as protojson, one per line for streams.
func printJSON(w io.Writer, msgs ...proto.Message) error {
	for _, m := range msgs {
		b, err := protojson.MarshalOptions{Multiline: len(msgs) == 1, Indent: "  "}.Marshal(m)
		if err != nil {
			return err
		}
		fmt.Fprintln(w, string(b))
	}
	return nil
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
