package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

func twinCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "twin", Short: "Create, read, change, watch and delete twins"}

	// printTwin prints one twin; printTwins a list of them.
	printTwin := func(w io.Writer, t *twinv1.Twin) error {
		if a.output != outTable {
			return a.printMessage(w, t)
		}
		twinTable(w, t)
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
			return printTwin(cmd.OutOrStdout(), resp.Twin)
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
			return printTwin(cmd.OutOrStdout(), t)
		},
	}

	var listFilter, listPage string
	var listLimit int
	list := &cobra.Command{
		Use: "list", Short: "List twins by id, optionally filtered by a CEL expression over twin", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if listLimit < 0 {
				return fmt.Errorf("--limit %d: give 0 for all, or how many to show", listLimit)
			}
			c, err := a.connect()
			if err != nil {
				return err
			}
			req := &twinv1.ListTwinsRequest{Filter: listFilter, PageToken: listPage}
			var twins []*twinv1.Twin
			var rev, filterErrors int64
			var firstFilterError string
			for first := true; ; first = false {
				req.PageSize = pageSize(listLimit, len(twins))
				resp, err := c.Twins.ListTwins(cmd.Context(), req)
				if err != nil {
					return err
				}
				if first {
					rev = resp.Revision // the lowest of the pages'
				}
				twins = append(twins, resp.Twins...)
				if resp.FilterErrorCount > 0 && filterErrors == 0 {
					firstFilterError = resp.FirstFilterError
				}
				filterErrors += resp.FilterErrorCount
				if req.PageToken = resp.NextPageToken; req.PageToken == "" || listLimit > 0 && len(twins) >= listLimit {
					break
				}
			}
			w := cmd.OutOrStdout()
			if a.output == outTable {
				twinTable(w, twins...)
			} else if err := a.printList(w, listDoc{Kind: "TwinList", NextPageToken: req.PageToken, Revision: rev}, messages(twins)); err != nil {
				return err
			}
			a.more(cmd, len(twins), "twins", req.PageToken)
			if filterErrors > 0 {
				// Twins the filter failed on are left out: say so, or the
				// list looks complete.
				fmt.Fprintf(cmd.ErrOrStderr(), "the filter failed on %d twins, which are not listed; the first: %s\n",
					filterErrors, firstFilterError)
			}
			return nil
		},
	}
	list.Flags().StringVar(&listFilter, "filter", "", `CEL filter, e.g. 'twin.type == "fridge" && twin.reported.temp_c > 8.0'`)
	list.Flags().IntVar(&listLimit, "limit", 0, "show at most this many (0: all)")
	list.Flags().StringVar(&listPage, "page-token", "", "go on where a list stopped short (its next_page_token; same --filter)")

	patchCmd := func(use, short string, desired bool) *cobra.Command {
		var expect int64
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
				return printTwin(cmd.OutOrStdout(), t)
			},
		}
		c.Flags().Int64Var(&expect, "expect-version", 0, "fail unless the twin is at this version")
		return c
	}

	var delExpect int64
	del := &cobra.Command{
		Use: "delete ID", Short: "Delete a twin", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			if _, err := c.Twins.DeleteTwin(cmd.Context(), &twinv1.DeleteTwinRequest{Id: args[0], ExpectedVersion: delExpect}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted %s\n", args[0])
			return nil
		},
	}
	del.Flags().Int64Var(&delExpect, "expect-version", 0, "fail unless the twin is at this version")

	var watchFilter, watchSource string
	var from int64
	watch := &cobra.Command{
		Use: "watch", Short: "Stream changes as they commit (resuming across breaks)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			for ev, err := range c.Watch(cmd.Context(), watchFilter, from) {
				if err != nil {
					if cmd.Context().Err() != nil {
						return nil
					}
					return err
				}
				if !sourceMatches(watchSource, ev.Source) {
					continue
				}
				if a.output != outTable {
					if err := printLine(w, ev); err != nil {
						return err
					}
					continue
				}
				fmt.Fprintf(w, "%d\t%s\t%s\tv%d\t%s\t%s\t%s\n", ev.Revision, ts(ev.Time), ev.GetTwin().GetId(), ev.GetTwin().GetVersion(),
					shortKind(ev.Kind), ev.Source, compact(ev.Patch))
			}
			return nil
		},
	}
	watch.Flags().StringVar(&watchFilter, "filter", "", "CEL filter over twin")
	watch.Flags().Int64Var(&from, "from", 0, "replay from this revision (0: only new changes)")
	watch.Flags().StringVar(&watchSource, "source", "", `only changes made by this source: "key:ops", "device", "rule:<id>"; "key:*" for every key`)

	var histLimit int
	var histPage, histSource string
	history := &cobra.Command{
		Use: "history ID", Short: "Show a twin's retained changes, newest first", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if histLimit < 0 {
				return fmt.Errorf("--limit %d: give 0 for all, or how many to show", histLimit)
			}
			c, err := a.connect()
			if err != nil {
				return err
			}
			req := &twinv1.ListTwinHistoryRequest{Id: args[0], PageToken: histPage, Source: histSource}
			var evs []*twinv1.TwinEvent
			for {
				req.PageSize = pageSize(histLimit, len(evs))
				resp, err := c.Twins.ListTwinHistory(cmd.Context(), req)
				if err != nil {
					return err
				}
				evs = append(evs, resp.Events...)
				if req.PageToken = resp.NextPageToken; req.PageToken == "" || histLimit > 0 && len(evs) >= histLimit {
					break
				}
			}
			w := cmd.OutOrStdout()
			if a.output != outTable {
				if err := a.printList(w, listDoc{Kind: "TwinEventList", NextPageToken: req.PageToken}, messages(evs)); err != nil {
					return err
				}
			} else {
				var rows [][]string
				for _, ev := range evs {
					rows = append(rows, []string{strconv.FormatInt(ev.Twin.Version, 10), strconv.FormatInt(ev.Revision, 10),
						ts(ev.Time), shortKind(ev.Kind), ev.Source, compact(ev.Patch)})
				}
				table(w, []string{"VERSION", "REVISION", "TIME", "KIND", "SOURCE", "PATCH"}, rows)
			}
			a.more(cmd, len(evs), "changes", req.PageToken)
			return nil
		},
	}
	history.Flags().IntVar(&histLimit, "limit", 20, "show at most this many, newest first (0: all retained)")
	history.Flags().StringVar(&histPage, "page-token", "", "go on where a history stopped short (its next_page_token)")
	history.Flags().StringVar(&histSource, "source", "", `only changes made by this source: "key:ops", "device", "rule:<id>"; "key:*" for every key`)

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
			if a.output != outTable {
				return a.printMessage(cmd.OutOrStdout(), resp)
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

// twinTable prints twins as a table.
func twinTable(w io.Writer, twins ...*twinv1.Twin) {
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
}

// pageSize is the page to ask for when limit items are wanted (0: all) and
// have items already: never more than the limit, so that a listing that
// stops there can go on from the server's page token.
func pageSize(limit, have int) int32 {
	const most = 1000 // the servers' maximum page
	if limit <= 0 {
		return most
	}
	return int32(min(most, limit-have))
}

// sourceMatches reports whether a change's source passes a --source filter,
// as the server filters history: empty passes all, "key:*" every source
// starting with "key:".
func sourceMatches(filter, source string) bool {
	if p, ok := strings.CutSuffix(filter, "*"); ok {
		return strings.HasPrefix(source, p)
	}
	return filter == "" || filter == source
}
