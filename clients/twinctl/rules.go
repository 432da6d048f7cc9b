package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

func ruleCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "rule", Short: "Manage rules (written in YAML or JSON files)"}

	printRules := func(w io.Writer, rules ...*twinv1.Rule) {
		var rows [][]string
		for _, r := range rules {
			types := strings.Join(r.Types, ",")
			if types == "" {
				types = "*"
			}
			rows = append(rows, []string{r.Id, types, strings.TrimPrefix(r.Trigger.String(), "TRIGGER_"),
				strconv.FormatBool(r.GetEnabled()), strconv.FormatInt(r.Status.GetFireCount(), 10),
				strconv.FormatInt(r.Status.GetErrorCount(), 10), r.Condition})
		}
		table(w, []string{"ID", "TYPES", "TRIGGER", "ENABLED", "FIRED", "ERRORS", "CONDITION"}, rows)
	}
	printRule := func(w io.Writer, r *twinv1.Rule) error {
		if a.output != outTable {
			return a.printMessage(w, r)
		}
		printRules(w, r)
		return nil
	}
	var file string
	fromFile := func(cmd *cobra.Command) (*twinv1.Rule, error) {
		if file == "" {
			return nil, fmt.Errorf("give the rule with -f FILE (YAML or JSON; - for standard input)")
		}
		r := &twinv1.Rule{}
		return r, readMessage(cmd, file, "rule", r)
	}

	// put creates or replaces the rule in the file.
	put := func(use, short string, send func(cmd *cobra.Command, r *twinv1.Rule) (*twinv1.Rule, error)) *cobra.Command {
		return &cobra.Command{
			Use: use + " -f FILE", Short: short, Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				r, err := fromFile(cmd)
				if err != nil {
					return err
				}
				if r, err = send(cmd, r); err != nil {
					return err
				}
				return printRule(cmd.OutOrStdout(), r)
			},
		}
	}
	create := put("create", "Create a rule from a YAML or JSON file", func(cmd *cobra.Command, r *twinv1.Rule) (*twinv1.Rule, error) {
		c, err := a.connect()
		if err != nil {
			return nil, err
		}
		resp, err := c.Rules.CreateRule(cmd.Context(), &twinv1.CreateRuleRequest{Rule: r})
		return resp.GetRule(), err
	})
	update := put("update", "Replace a rule (the file's id names it)", func(cmd *cobra.Command, r *twinv1.Rule) (*twinv1.Rule, error) {
		c, err := a.connect()
		if err != nil {
			return nil, err
		}
		resp, err := c.Rules.UpdateRule(cmd.Context(), &twinv1.UpdateRuleRequest{Rule: r})
		return resp.GetRule(), err
	})
	validate := &cobra.Command{
		Use: "validate -f FILE", Short: "Check a rule without saving it", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := fromFile(cmd)
			if err != nil {
				return err
			}
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Rules.ValidateRule(cmd.Context(), &twinv1.ValidateRuleRequest{Rule: r})
			if err != nil {
				return err
			}
			if a.output != outTable {
				if err := a.printMessage(cmd.OutOrStdout(), resp); err != nil {
					return err
				}
			} else if resp.Valid {
				fmt.Fprintf(cmd.OutOrStdout(), "valid; condition cost estimate %d\n", resp.CostEstimate)
			} else {
				for _, is := range resp.Issues {
					pos := ""
					if is.Line > 0 {
						pos = fmt.Sprintf(":%d:%d", is.Line, is.Column)
					}
					fmt.Fprintf(cmd.OutOrStdout(), "%s%s: %s\n", is.Field, pos, is.Message)
				}
			}
			if !resp.Valid {
				return fmt.Errorf("the rule has %d issue(s)", len(resp.Issues))
			}
			return nil
		},
	}
	for _, c := range []*cobra.Command{create, update, validate} {
		c.Flags().StringVarP(&file, "file", "f", "", "rule file, YAML or JSON (- for standard input)")
	}

	get := &cobra.Command{
		Use: "get ID", Short: "Show a rule and its status", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Rules.GetRule(cmd.Context(), &twinv1.GetRuleRequest{Id: args[0]})
			if err != nil {
				return err
			}
			return printRule(cmd.OutOrStdout(), resp.Rule)
		},
	}
	list := &cobra.Command{
		Use: "list", Short: "List rules", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			var all []*twinv1.Rule
			tok := ""
			for {
				resp, err := c.Rules.ListRules(cmd.Context(), &twinv1.ListRulesRequest{PageSize: 1000, PageToken: tok})
				if err != nil {
					return err
				}
				all = append(all, resp.Rules...)
				if tok = resp.NextPageToken; tok == "" {
					break
				}
			}
			if a.output != outTable {
				return a.printList(cmd.OutOrStdout(), listDoc{Kind: "RuleList"}, messages(all))
			}
			printRules(cmd.OutOrStdout(), all...)
			return nil
		},
	}
	del := &cobra.Command{
		Use: "delete ID", Short: "Delete a rule", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			if _, err := c.Rules.DeleteRule(cmd.Context(), &twinv1.DeleteRuleRequest{Id: args[0]}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted %s\n", args[0])
			return nil
		},
	}

	var id, before, after string
	test := &cobra.Command{
		Use: "test (-f FILE | --id ID) --after TWIN [--before TWIN]", Short: "Show what a rule would do for a change, with no side effects",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req := &twinv1.TestRuleRequest{Rule: &twinv1.Rule{Id: id}}
			if file != "" {
				r, err := fromFile(cmd)
				if err != nil {
					return err
				}
				req.Rule = r
			} else if id == "" {
				return fmt.Errorf("give the rule with -f FILE or --id ID")
			}
			for _, p := range []struct {
				src string
				dst **twinv1.Twin
			}{{before, &req.Before}, {after, &req.After}} {
				if p.src == "" {
					continue
				}
				t := &twinv1.Twin{}
				if err := readTwinArg(p.src, t); err != nil {
					return err
				}
				*p.dst = t
			}
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Rules.TestRule(cmd.Context(), req)
			if err != nil {
				return err
			}
			if a.output != outTable {
				return a.printMessage(cmd.OutOrStdout(), resp)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "fired: %v (condition before %v, after %v)\n", resp.Fired, resp.PreviousCondition, resp.Condition)
			if resp.Error != "" {
				fmt.Fprintf(w, "error: %s\n", resp.Error)
			}
			for _, c := range resp.Commands {
				fmt.Fprintf(w, "command: %s %s\n", c.Name, compact(c.Params))
			}
			if resp.DesiredPatch != nil {
				fmt.Fprintf(w, "set desired: %s\n", compact(resp.DesiredPatch))
			}
			for _, e := range resp.Events {
				fmt.Fprintf(w, "emit %s: %s\n", strings.TrimPrefix(e.Severity.String(), "SEVERITY_"), e.Message)
			}
			return nil
		},
	}
	test.Flags().StringVarP(&file, "file", "f", "", "an unsaved rule, YAML or JSON")
	test.Flags().StringVar(&id, "id", "", "a saved rule")
	test.Flags().StringVar(&before, "before", "", "the twin before the change (JSON, or @FILE)")
	test.Flags().StringVar(&after, "after", "", "the twin after the change (JSON, or @FILE)")

	var ruleID, twinID string
	events := &cobra.Command{
		Use: "events", Short: "Stream rule firings and emitted events", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			stream, err := c.Rules.WatchRuleEvents(cmd.Context(), &twinv1.WatchRuleEventsRequest{RuleId: ruleID, TwinId: twinID})
			if err != nil {
				return err
			}
			for {
				m, err := stream.Recv()
				if err != nil {
					if cmd.Context().Err() != nil {
						return nil
					}
					return err
				}
				ev := m.Event
				if a.output != outTable {
					if err := printLine(cmd.OutOrStdout(), ev); err != nil {
						return err
					}
					continue
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\t%s\tv%d\t%s\t%s\n", ts(ev.Time), strings.TrimPrefix(ev.Kind.String(), "RULE_EVENT_KIND_"),
					ev.RuleId, ev.TwinVersion, ev.TwinId, ev.Message)
			}
		},
	}
	events.Flags().StringVar(&ruleID, "rule", "", "only this rule's events")
	events.Flags().StringVar(&twinID, "twin", "", "only this twin's events")

	cmd.AddCommand(create, get, list, update, del, validate, test, events)
	return cmd
}

// readTwinArg reads a twin given as JSON, or as @FILE holding YAML or JSON.
func readTwinArg(s string, t *twinv1.Twin) error {
	if strings.HasPrefix(s, "@") {
		return readMessage(nil, s[1:], "twin", t)
	}
	return readJSON(s, t)
}
