// Command twinctl is the operator's command line for twind: twins, rules and
// commands.
//
//	twinctl twin create fridge-1 --type fridge --label site=berlin
//	twinctl twin desired fridge-1 '{"target_c": 4}'
//	twinctl twin list --filter 'twin.reported.temp_c > 8.0'
//	twinctl rule create -f rules/examples/fridge-warm.json
//	twinctl command send car-1 honk --wait 5s
//
// Output is a readable table by default. -o json prints one JSON document:
// the object, or for a list a list object (kind, items, and next_page_token
// when the list stopped short, as at --limit). -o jsonl prints one compact
// object per line, for big lists and for the streams (twin watch, rule
// events), which print lines for -o json too. Whitespace is stable, so
// scripts may compare output. The server is --addr, or TWIND_ADDR, or
// localhost:50051.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newRoot().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "twinctl:", errorText(err))
		os.Exit(1)
	}
}
