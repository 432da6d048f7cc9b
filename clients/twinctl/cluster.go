package main

import (
	"fmt"
	"io"
	"strconv"

	"github.com/spf13/cobra"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

func clusterCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "cluster", Short: "See the nodes of a twind cluster"}
	st := &cobra.Command{
		Use:   "status",
		Short: "Show the nodes, which one owns the shards, and how far each has applied the replicated log",
		Long: "Show the cluster as the node that answers sees it (any node answers; none forwards this call): " +
			"the owner of the virtual shards, the replicated log's last sequence, and for each node its role " +
			"(owner, standby, or down when not heard from within its lease), its API address, the last log " +
			"sequence it applied, how far behind that is, and when it last reported.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Cluster.GetClusterStatus(cmd.Context(), &twinv1.GetClusterStatusRequest{})
			if err != nil {
				return err
			}
			if a.output != outTable {
				return a.printMessage(cmd.OutOrStdout(), resp)
			}
			printClusterStatus(cmd.OutOrStdout(), resp)
			return nil
		},
	}
	cmd.AddCommand(st)
	return cmd
}

// printClusterStatus prints the cluster's summary line, then its nodes.
func printClusterStatus(w io.Writer, s *twinv1.GetClusterStatusResponse) {
	owner := s.Owner
	if owner == "" {
		owner = "none (calls fail with UNAVAILABLE until a node takes the shards)"
	}
	fmt.Fprintf(w, "owner: %s\nlog: %d\nvirtual shards: %d\nanswered by: %s\n\n", owner, s.LogLast, s.VirtualShards, s.Node)
	var rows [][]string
	for _, n := range s.Nodes {
		rows = append(rows, []string{n.Name, n.Role, n.Addr, strconv.FormatUint(n.Applied, 10), strconv.FormatUint(n.Lag, 10), ts(n.Updated)})
	}
	table(w, []string{"NODE", "ROLE", "ADDR", "APPLIED", "LAG", "UPDATED"}, rows)
}
