package main

import (
	"context"
	"fmt"
	"io"
	"regexp"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/twind-io/twind/clients/twind"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// What twinsim makes is marked as its own, so that it never takes over,
// drives or removes anything else: its twins carry the label
// twinsim=<name>, and its rules' descriptions begin with
// "twinsim run <name>: " or "twinsim bench <name>: ".

// label is the key of the label that marks a twin as twinsim's; its value
// is the name of the run (--name).
const label = "twinsim"

var validName = regexp.MustCompile(`^[A-Za-z0-9._-]{1,48}$`)

func checkName(name string) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("--name %q: use 1 to 48 of [A-Za-z0-9._-]", name)
	}
	return nil
}

// ownFilter is a CEL expression matching the twins of the run name.
func ownFilter(name string) string {
	return fmt.Sprintf("twin.labels.?%s.orValue('') == '%s'", label, name)
}

// ruleMark begins the description of the rules that twinsim's mode ("run"
// or "bench") makes for the run name.
func ruleMark(mode, name string) string { return fmt.Sprintf("twinsim %s %s: ", mode, name) }

var anyRuleMark = regexp.MustCompile(`^twinsim (run|bench) [A-Za-z0-9._-]+: `)

// ownsRule reports whether r was made by twinsim for the run name, or by
// any run if name is empty.
func ownsRule(r *twinv1.Rule, name string) bool {
	m := anyRuleMark.FindStringSubmatch(r.GetDescription())
	return m != nil && (name == "" || m[0] == ruleMark(m[1], name))
}

// claim creates the twin id of type typ as the run name's, or checks that
// the twin already there is the run's. It never takes over a twin that
// twinsim did not create for the run: that is an error, and the twin is
// left as it is.
func claim(ctx context.Context, c *twind.Client, id, typ, name string) error {
	_, err := c.CreateTwin(ctx, id, typ, map[string]string{label: name})
	if !twind.IsAlreadyExists(err) {
		return err
	}
	t, err := c.GetTwin(ctx, id)
	if err != nil {
		return err
	}
	if got := t.Labels[label]; got != name {
		return fmt.Errorf("twin %s exists and is not this run's (it lacks the label %s=%s), so twinsim leaves it alone: "+
			"choose another --prefix or --name", id, label, name)
	}
	if t.Type != typ {
		return fmt.Errorf("twin %s is run %s's but of type %q, not %q: remove it with 'twinsim clean --name %s'", id, name, t.Type, typ, name)
	}
	return nil
}

// removeTwins deletes the twins with the label twinsim=name, or with the
// label twinsim at all if name is empty, and returns how many it deleted.
func removeTwins(ctx context.Context, c *twind.Client, name string) (int, error) {
	filter := fmt.Sprintf("'%s' in twin.labels", label)
	if name != "" {
		filter = ownFilter(name)
	}
	var ids []string
	for t, err := range c.ListTwins(ctx, filter) {
		if err != nil {
			return 0, err
		}
		ids = append(ids, t.Id)
	}
	return len(ids), deleteTwins(ctx, c, ids)
}

// deleteTwins deletes twins, a few at a time; one already gone is no error.
func deleteTwins(ctx context.Context, c *twind.Client, ids []string) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, id := range ids {
		g.Go(func() error {
			_, err := c.Twins.DeleteTwin(gctx, &twinv1.DeleteTwinRequest{Id: id})
			if err != nil && !twind.IsNotFound(err) {
				return fmt.Errorf("delete twin %s: %w", id, err)
			}
			return nil
		})
	}
	return g.Wait()
}

// listRules returns every rule.
func listRules(ctx context.Context, c *twind.Client) ([]*twinv1.Rule, error) {
	var all []*twinv1.Rule
	req := &twinv1.ListRulesRequest{PageSize: 1000}
	for {
		resp, err := c.Rules.ListRules(ctx, req)
		if err != nil {
			return nil, err
		}
		all = append(all, resp.Rules...)
		if req.PageToken = resp.NextPageToken; req.PageToken == "" {
			return all, nil
		}
	}
}

// removeRules deletes the rules twinsim made for the run name (every run's
// if name is empty) and returns how many it deleted.
func removeRules(ctx context.Context, c *twind.Client, name string) (int, error) {
	rules, err := listRules(ctx, c)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range rules {
		if !ownsRule(r, name) {
			continue
		}
		_, err := c.Rules.DeleteRule(ctx, &twinv1.DeleteRuleRequest{Id: r.Id})
		if err != nil && !twind.IsNotFound(err) {
			return n, fmt.Errorf("delete rule %s: %w", r.Id, err)
		}
		n++
	}
	return n, nil
}

// clean removes the twins and rules twinsim made for the run name, or for
// every run if name is empty.
func clean(ctx context.Context, c *twind.Client, name string, out io.Writer) error {
	twins, err := removeTwins(ctx, c, name)
	if err != nil {
		return err
	}
	rules, err := removeRules(ctx, c, name)
	if err != nil {
		return err
	}
	whose := "run " + name
	if name == "" {
		whose = "every run"
	}
	fmt.Fprintf(out, "removed %d twins and %d rules of twinsim %s\n", twins, rules, whose)
	return nil
}

// cleanupContext is for removing what a run made after its own context
// ended (Ctrl-C): a fresh one, bounded.
func cleanupContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), time.Minute)
}
