package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

func commandCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "command", Short: "Send commands to devices and follow them"}

	printCommands := func(w io.Writer, cmds ...*twinv1.Command) {
		var rows [][]string
		for _, c := range cmds {
			msg := c.Message
			if msg == "" {
				msg = "-"
			}
			rows = append(rows, []string{c.Id, c.Name, strings.TrimPrefix(c.State.String(), "COMMAND_STATE_"), c.Source,
				compact(c.Params), compact(c.Result), msg, ts(c.UpdateTime)})
		}
		table(w, []string{"ID", "NAME", "STATE", "SOURCE", "PARAMS", "RESULT", "MESSAGE", "UPDATED"}, rows)
	}
	printCommand := func(w io.Writer, c *twinv1.Command) error {
		if a.output != outTable {
			return a.printMessage(w, c)
		}
		printCommands(w, c)
		return nil
	}

	var params, requestID string
	var ttl, wait time.Duration
	send := &cobra.Command{
		Use: "send DEVICE NAME", Short: "Send a command (to online and offline devices alike)", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			req := &twinv1.SendCommandRequest{DeviceId: args[0], Name: args[1], RequestId: requestID,
				Ttl: durationFlag(ttl), Wait: durationFlag(wait)}
			if params != "" {
				if req.Params, err = parseStruct(cmd, params); err != nil {
					return err
				}
			}
			resp, err := c.Commands.SendCommand(cmd.Context(), req)
			if err != nil {
				return err
			}
			return printCommand(cmd.OutOrStdout(), resp.Command)
		},
	}
	send.Flags().StringVar(&params, "params", "", "parameters (JSON object)")
	send.Flags().StringVar(&requestID, "request-id", "", "idempotency key")
	send.Flags().DurationVar(&ttl, "ttl", 0, "how long the command may wait for a final state (server default 1h)")
	send.Flags().DurationVar(&wait, "wait", 0, "block up to this long for a final state")

	get := &cobra.Command{
		Use: "get ID", Short: "Show a command", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Commands.GetCommand(cmd.Context(), &twinv1.GetCommandRequest{Id: args[0]})
			if err != nil {
				return err
			}
			return printCommand(cmd.OutOrStdout(), resp.Command)
		},
	}

	var states []string
	list := &cobra.Command{
		Use: "list DEVICE", Short: "List a device's commands, oldest first", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &twinv1.ListCommandsRequest{DeviceId: args[0], PageSize: 1000}
			for _, s := range states {
				v, ok := twinv1.CommandState_value["COMMAND_STATE_"+strings.ToUpper(s)]
				if !ok || v == 0 {
					return fmt.Errorf("--state %q: use queued, sent, accepted, succeeded, failed, rejected, expired or canceled", s)
				}
				req.States = append(req.States, twinv1.CommandState(v))
			}
			c, err := a.connect()
			if err != nil {
				return err
			}
			var all []*twinv1.Command
			for {
				resp, err := c.Commands.ListCommands(cmd.Context(), req)
				if err != nil {
					return err
				}
				all = append(all, resp.Commands...)
				if req.PageToken = resp.NextPageToken; req.PageToken == "" {
					break
				}
			}
			if a.output != outTable {
				return a.printList(cmd.OutOrStdout(), listDoc{Kind: "CommandList"}, messages(all))
			}
			printCommands(cmd.OutOrStdout(), all...)
			return nil
		},
	}
	list.Flags().StringSliceVar(&states, "state", nil, "only commands in these states (repeatable or comma-separated)")

	cancel := &cobra.Command{
		Use: "cancel ID", Short: "Cancel an unfinished command", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Commands.CancelCommand(cmd.Context(), &twinv1.CancelCommandRequest{Id: args[0]})
			if err != nil {
				return err
			}
			return printCommand(cmd.OutOrStdout(), resp.Command)
		},
	}
	cmd.AddCommand(send, get, list, cancel)
	return cmd
}
