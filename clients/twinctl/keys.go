package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

func keyCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "key", Short: "Manage API keys (admins), and see which key you use"}

	printKeys := func(w io.Writer, keys ...*twinv1.Key) {
		var rows [][]string
		for _, k := range keys {
			rows = append(rows, []string{k.Name, roleName(k.Role), strings.ToLower(strings.TrimPrefix(k.Source.String(), "KEY_SOURCE_")), ts(k.CreateTime)})
		}
		table(w, []string{"NAME", "ROLE", "SOURCE", "CREATED"}, rows)
	}

	var role string
	create := &cobra.Command{
		Use:   "create NAME --role viewer|operator|provisioner|admin",
		Short: "Create an API key; its secret is printed once (twind keeps only its hash)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, ok := twinv1.Role_value["ROLE_"+strings.ToUpper(role)]
			if !ok || v == 0 {
				return fmt.Errorf("--role %q: use viewer, operator, provisioner or admin", role)
			}
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Keys.CreateKey(cmd.Context(), &twinv1.CreateKeyRequest{Name: args[0], Role: twinv1.Role(v)})
			if err != nil {
				return err
			}
			if a.output != outTable {
				return a.printMessage(cmd.OutOrStdout(), resp)
			}
			// The secret alone on standard output, for scripts; the rest
			// on standard error.
			fmt.Fprintln(cmd.OutOrStdout(), resp.Secret)
			fmt.Fprintf(cmd.ErrOrStderr(), "twinctl: created key %q with the %s role; keep the secret above, it is not shown again\n",
				resp.Key.Name, roleName(resp.Key.Role))
			return nil
		},
	}
	create.Flags().StringVar(&role, "role", "", "viewer, operator, provisioner or admin (required)")
	create.MarkFlagRequired("role")

	list := &cobra.Command{
		Use: "list", Short: "List the API keys: from the file, the flag and the API", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Keys.ListKeys(cmd.Context(), &twinv1.ListKeysRequest{})
			if err != nil {
				return err
			}
			if a.output != outTable {
				return a.printList(cmd.OutOrStdout(), listDoc{Kind: "KeyList"}, messages(resp.Keys))
			}
			printKeys(cmd.OutOrStdout(), resp.Keys...)
			return nil
		},
	}

	revoke := &cobra.Command{
		Use: "revoke NAME", Short: "Revoke an API key made with 'key create'; it stops working at once", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			if _, err := c.Keys.RevokeKey(cmd.Context(), &twinv1.RevokeKeyRequest{Name: args[0]}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "revoked %s\n", args[0])
			return nil
		},
	}

	whoami := &cobra.Command{
		Use: "whoami", Short: "Show the name and role of the key in use (--token, TWIND_TOKEN)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.connect()
			if err != nil {
				return err
			}
			resp, err := c.Keys.WhoAmI(cmd.Context(), &twinv1.WhoAmIRequest{})
			if err != nil {
				return err
			}
			if a.output != outTable {
				return a.printMessage(cmd.OutOrStdout(), resp)
			}
			if resp.Open {
				fmt.Fprintln(cmd.OutOrStdout(), "no API key is configured: the operator API is open to anyone")
				return nil
			}
			printKeys(cmd.OutOrStdout(), resp.Key)
			return nil
		},
	}
	cmd.AddCommand(create, list, revoke, whoami)
	return cmd
}

func roleName(r twinv1.Role) string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "ROLE_"))
}
