// Command twinsim simulates fleets of fridges, cars and indoor planters
// against a twind server, and doubles as its load generator.
//
//	twinsim run --fridges 10 --cars 5 --planters 20
//	twinsim clean
//	twinsim bench --devices 1000 --duration 10s --rules 10
//	twinsim fleet --twins 10000
//
// It touches only what it made: its twins carry the label twinsim=<name>
// (--name; "sim" for run, "bench" for bench) and ids with its prefix, and
// a twin of such an id that lacks the label is an error, never taken over.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/twind-io/twind/clients/twind"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := rootCmd().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "twinsim:", err)
		os.Exit(1)
	}
}

func rootCmd() *cobra.Command {
	addr := os.Getenv("TWIND_ADDR")
	if addr == "" {
		addr = "localhost:50051"
	}
	root := &cobra.Command{
		Use:           "twinsim",
		Short:         "Simulate fridges, cars and planters against twind, or load-test it",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	token := os.Getenv("TWIND_TOKEN")
	root.PersistentFlags().StringVar(&addr, "addr", addr, "twind address (env TWIND_ADDR)")
	root.PersistentFlags().StringVar(&token, "token", token, "API token, if the server requires one (env TWIND_TOKEN)")
	tlsCA := os.Getenv("TWIND_TLS_CA")
	useTLS := false
	root.PersistentFlags().BoolVar(&useTLS, "tls", false, "connect with TLS, trusting the system's certificate authorities")
	root.PersistentFlags().StringVar(&tlsCA, "tls-ca", tlsCA, "connect with TLS, trusting the authorities in this PEM file (env TWIND_TLS_CA)")
	dial := func() (*twind.Client, error) {
		opts := []grpc.DialOption{twind.WithToken(token)}
		if useTLS || tlsCA != "" {
			o, err := twind.WithTLS(tlsCA)
			if err != nil {
				return nil, err
			}
			opts = append(opts, o)
		}
		return twind.Dial(addr, opts...)
	}

	var ro runOptions
	run := &cobra.Command{
		Use:   "run",
		Short: "Run a simulated fleet: creates its own twins and copies of the example rules, then reports, obeys desired state and runs commands",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := dial()
			if err != nil {
				return err
			}
			defer c.Close()
			return runFleet(cmd.Context(), c, ro, cmd.OutOrStdout())
		},
	}
	run.Flags().IntVar(&ro.fridges, "fridges", 3, "number of fridges")
	run.Flags().IntVar(&ro.cars, "cars", 2, "number of cars")
	run.Flags().IntVar(&ro.planters, "planters", 5, "number of indoor planters")
	run.Flags().DurationVar(&ro.tick, "tick", time.Second, "how often each device reports")
	run.Flags().DurationVar(&ro.duration, "duration", 0, "stop after this long (0: run until interrupted)")
	run.Flags().StringVar(&ro.name, "name", "sim", "the run's name: its twins are labelled twinsim=NAME, and only those are driven")
	run.Flags().StringVar(&ro.prefix, "prefix", "", "prefix of the twin and rule ids (default NAME-)")
	run.Flags().BoolVar(&ro.noRules, "no-rules", false, "do not create the run's copies of the example rules")

	var cleanName string
	var cleanAll bool
	cleanCmd := &cobra.Command{
		Use:   "clean",
		Short: "Remove the twins and rules a run or bench made (those labelled twinsim=NAME)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cleanAll {
				cleanName = ""
			} else if err := checkName(cleanName); err != nil {
				return err
			}
			c, err := dial()
			if err != nil {
				return err
			}
			defer c.Close()
			return clean(cmd.Context(), c, cleanName, cmd.OutOrStdout())
		},
	}
	cleanCmd.Flags().StringVar(&cleanName, "name", "sim", "the run's name (twinsim bench's is bench)")
	cleanCmd.Flags().BoolVar(&cleanAll, "all", false, "remove what every run and bench made")

	var bo benchOptions
	bench := &cobra.Command{
		Use:   "bench",
		Short: "Drive many device streams and measure acknowledged reports per second and latencies",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if bo.output != "text" && bo.output != "json" {
				return fmt.Errorf("-o must be text or json, not %q", bo.output)
			}
			c, err := dial()
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = runBench(cmd.Context(), c, bo, cmd.OutOrStdout(), cmd.ErrOrStderr())
			return err
		},
	}
	bench.Flags().IntVar(&bo.devices, "devices", 1000, "concurrent device streams")
	bench.Flags().DurationVar(&bo.duration, "duration", 10*time.Second, "how long to drive the load")
	bench.Flags().Float64Var(&bo.rate, "rate", 0, "target reports per second across all devices (0: as fast as acks allow)")
	bench.Flags().IntVar(&bo.rules, "rules", 10, "rules loaded for the devices' type, "+benchType+" (one of them fires on every 50th report)")
	bench.Flags().IntVar(&bo.window, "window", 4, "reports in flight per stream")
	bench.Flags().StringVar(&bo.name, "name", "bench", "the bench's name: its twins are labelled twinsim=NAME")
	bench.Flags().StringVar(&bo.prefix, "prefix", "", "prefix of the twin and rule ids (default NAME-)")
	bench.Flags().BoolVar(&bo.keep, "keep", false, "keep the twins when the bench ends ('twinsim clean --name NAME' removes them)")
	bench.Flags().StringVarP(&bo.output, "output", "o", "text", "output format: text or json")

	var fo fleetOptions
	fleet := &cobra.Command{
		Use:   "fleet",
		Short: "Run a twind of its own with a fleet of N fridge twins and measure start-up, memory and durable report throughput",
		Long: `Run a twind of its own (--twind, or one built with 'go build' from the
repository) on a fresh store, create --twins fridge twins (fridge-0, ...)
with many CreateTwin calls in flight, and measure: start-up until serving
(empty, after a clean restart, after kill -9 during a load), resident
memory (VmRSS), and durable ReportState throughput to random twins,
uniform and 80/20. --addr, --token and --tls are not used.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := runFleetBench(cmd.Context(), fo, cmd.OutOrStdout(), cmd.ErrOrStderr())
			return err
		},
	}
	fleet.Flags().IntVar(&fo.twins, "twins", 10_000, "fridge twins in the fleet")
	fleet.Flags().StringVar(&fo.create, "create", "import", "how to create the twins: import (ImportTwins, batches of 1,000) or calls (CreateTwin)")
	fleet.Flags().StringVar(&fo.twind, "twind", "", "twind binary to run (default: go build one into the work directory)")
	fleet.Flags().StringArrayVar(&fo.twindArgs, "twind-arg", nil, "a further flag for twind, e.g. --twind-arg=--workers=8 (repeatable)")
	fleet.Flags().StringVar(&fo.dir, "dir", "", "work directory for the store (DIR/data) and twind.log (default: a temporary one, removed unless --keep); twins already there are kept")
	fleet.Flags().BoolVar(&fo.keep, "keep", false, "keep the temporary work directory")
	fleet.Flags().BoolVar(&fo.skipCreate, "skip-create", false, "do not create the twins: --dir holds them from an earlier run with --keep")
	fleet.Flags().IntVar(&fo.createClients, "create-clients", 128, "CreateTwin calls in flight")
	fleet.Flags().IntVar(&fo.clients, "clients", 64, "concurrent ReportState clients, each with one call in flight")
	fleet.Flags().IntVar(&fo.conns, "conns", 4, "gRPC connections the clients share")
	fleet.Flags().DurationVar(&fo.duration, "duration", 10*time.Second, "length of each report phase")
	fleet.Flags().DurationVar(&fo.killAfter, "kill-after", 2*time.Second, "how long the report load runs before twind is killed with SIGKILL")
	fleet.Flags().IntVar(&fo.countMax, "count-max", 200_000, "count the twins with ListTwins after each restart if there are at most this many")
	fleet.Flags().StringVarP(&fo.output, "output", "o", "text", "output format: text or json")

	root.AddCommand(run, cleanCmd, bench, fleet)
	return root
}
