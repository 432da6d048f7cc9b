package main

import (
	"fmt"
	"io"
	"strconv"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

func twinCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "twin", Short: "Create, read, change, watch and delete twins"}

	printTwins := func(w io.Writer, twins ...*twinv1.Twin) error {
		if a.output == "json" {
			msgs := make([]proto.Message, len(twins))
			for i, t := range twins {
				msgs[i] = t
			}
			return printJSON(w, msgs...)
		}
		var rows [][]string
		for _, t := range twins {
			conn := "offline"
			if t.GetPresence().GetConnected() {
				conn = "online"
			}
			rows = append(rows, []string{t.Id, t.Type, strconv.FormatInt(t.Version, 10), conn,
				sortedLabels(t.Labels), compact(t.Reported), compact(t.Desired), compact(t.Delta)})
		}
		table(w, []string{"ID", "TYPE", "VERSION", "PRESENCE", "LABELS", "REPORTED", "DESIRED", "DELTA"}, rows)
		return nil
	}

	var typ, reported, desired string
	var labels []string
	create := &cobra.Command{
		Use: "create ID", Short: "Create a twin", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			l, err := parseLabels(labels)
			if err != nil {
				return err
			}
			t := &twinv1.Twin{Id: args[0], Type: typ, Labels: l}
			if reported != "" {
				if t.Reported, err = parseStruct(cmd, reported); err != nil {
					return err
				}
			}
			if desired != "" {
				if t.Desired, err = parseStruct(cmd, desired); err != nil {
					return err
				}
			}
			resp, err := c.Twins.CreateTwin(cmd.Context(), &twinv1.CreateTwinRequest{Twin: t})
			if err != nil {
				return err
			}
			return printTwins(cmd.OutOrStdout(), resp.Twin)
		},
	}
	create.Flags().StringVar(&typ, "type", "", "device type, e.g. fridge")
	create.Flags().StringArrayVar(&labels, "label", nil, "label key=value (repeatable)")
	create.Flags().StringVar(&reported, "reported", "", "initial reported state (JSON)")
	create.Flags().StringVar(&desired, "desired", "", "initial desired state (JSON)")

	get := &cobra.Command{
		Use: "get ID", Short: "Show a twin", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			t, err := c.GetTwin(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printTwins(cmd.OutOrStdout(), t)
		},
	}

	var filter string
	var limit int
	list := &cobra.Command{
		Use: "list", Short: "List twins, optionally filtered by a CEL expression over twin", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			var twins []*twinv1.Twin
			for t, err := range c.ListTwins(cmd.Context(), filter) {
				if err != nil {
					return err
				}
				if twins = append(twins, t); limit > 0 && len(twins) == limit {
					break
				}
			}
			return printTwins(cmd.OutOrStdout(), twins...)
		},
	}
	list.Flags().StringVar(&filter, "filter", "", `CEL filter, e.g. 'twin.type == "fridge" && twin.reported.temp_c > 8.0'`)
	list.Flags().IntVar(&limit, "limit", 0, "show at most this many (0: all)")

	var expect int64
	patchCmd := func(use, short string, desired bool) *cobra.Command {
		c := &cobra.Command{
			Use: use + " ID PATCH", Short: short, Args: cobra.ExactArgs(2),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := a.connect()
				if err != nil {
					return err
				}
				p, err := parseStruct(cmd, args[1])
				if err != nil {
					return err
				}
				var t *twinv1.Twin
				if desired {
					resp, err := c.Twins.UpdateDesired(cmd.Context(), &twinv1.UpdateDesiredRequest{Id: args[0], Patch: p, ExpectedVersion: expect})
					if err != nil {
						return err
					}
					t = resp.Twin
				} else {
					resp, err := c.Twins.ReportState(cmd.Context(), &twinv1.ReportStateRequest{Id: args[0], Patch: p, ExpectedVersion: expect})
					if err != nil {
						return err
					}
					t = resp.Twin
				}
				return printTwins(cmd.OutOrStdout(), t)
			},
		}
		c.Flags().Int64Var(&expect, "expect-version", 0, "fail unless the twin is at this version")
		return c
	}

	del := &cobra.Command{
		Use: "delete ID", Short: "Delete a twin", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			if _, err := c.Twins.DeleteTwin(cmd.Context(), &twinv1.DeleteTwinRequest{Id: args[0], ExpectedVersion: expect}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted %s\n", args[0])
			return nil
		},
	}
	del.Flags().Int64Var(&expect, "expect-version", 0, "fail unless the twin is at this version")

	var from int64
	watch := &cobra.Command{
		Use: "watch", Short: "Stream changes as they commit (resuming across breaks)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			for ev, err := range c.Watch(cmd.Context(), filter, from) {
				if err != nil {
					if cmd.Context().Err() != nil {
						return nil
					}
					return err
				}
				if a.output == "json" {
					printJSON(w, ev)
					continue
				}
				fmt.Fprintf(w, "%d\t%s\t%s\tv%d\t%s\t%s\n", ev.Revision, ts(ev.Time), ev.Twin.Id, ev.Twin.Version,
					shortKind(ev.Kind), compact(ev.Patch))
			}
			return nil
		},
	}
	watch.Flags().StringVar(&filter, "filter", "", "CEL filter over twin")
	watch.Flags().Int64Var(&from, "from", 0, "replay from this revision (0: only new changes)")

	history := &cobra.Command{
		Use: "history ID", Short: "Show a twin's retained changes, newest first", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Twins.ListTwinHistory(cmd.Context(), &twinv1.ListTwinHistoryRequest{Id: args[0], PageSize: int32(max(limit, 0))})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			var rows [][]string
			for _, ev := range resp.Events {
				rows = append(rows, []string{strconv.FormatInt(ev.Twin.Version, 10), strconv.FormatInt(ev.Revision, 10),
					ts(ev.Time), shortKind(ev.Kind), ev.Source, compact(ev.Patch)})
			}
			table(cmd.OutOrStdout(), []string{"VERSION", "REVISION", "TIME", "KIND", "SOURCE", "PATCH"}, rows)
			return nil
		},
	}
	history.Flags().IntVar(&limit, "limit", 20, "entries to show")

	token := &cobra.Command{
		Use: "token ID", Short: "Issue a device token (shown once; revokes the previous one)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Twins.IssueDeviceToken(cmd.Context(), &twinv1.IssueDeviceTokenRequest{Id: args[0]})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintln(cmd.OutOrStdout(), resp.Token)
			return nil
		},
	}

	cmd.AddCommand(create, get, list, patchCmd("desired", "Merge a patch into desired state", true),
		patchCmd("report", "Merge a patch into reported state", false), del, watch, history, token)
	return cmd
}

func shortKind(k twinv1.TwinEventKind) string {
	s := k.String()
	const p = "TWIN_EVENT_KIND_"
	if len(s) > len(p) {
		return s[len(p):]
	}
	return s
}
