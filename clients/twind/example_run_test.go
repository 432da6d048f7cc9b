package twind_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/twind-io/twind/clients/twind"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
)

// An operator and a planter, against a twind started in this process.
func Example() {
	dir, _ := os.MkdirTemp("", "twind-example")
	defer os.RemoveAll(dir)
	ctx, stop := context.WithCancel(context.Background())
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	ready, served := make(chan net.Addr, 1), make(chan error, 1)
	go func() {
		served <- server.Run(ctx, server.Options{Addr: "localhost:0", DataDir: dir, Logger: quiet, Ready: func(a net.Addr) { ready <- a }})
	}()
	c, err := twind.Dial((<-ready).String())
	if err != nil {
		panic(err)
	}

	// The operator sets up the planter and what it should do.
	c.CreateTwin(ctx, "planter-1", "planter", map[string]string{"room": "kitchen"})
	c.UpdateDesired(ctx, "planter-1", map[string]any{"lamp": "on"}, 0)
	token, _ := c.IssueDeviceToken(ctx, "planter-1")

	// The planter connects, applies desired state and runs commands.
	applied := make(chan map[string]any, 1)
	dev := c.Device(twind.DeviceConfig{
		DeviceID: "planter-1", Token: token, Logger: quiet,
		OnDesired: func(_ context.Context, d twind.DesiredChange) error {
			applied <- d.Delta
			return nil
		},
		OnCommand: func(_ context.Context, cmd *twinv1.Command) twind.CommandResult {
			return twind.CommandResult{Result: map[string]any{"watered_s": cmd.Params.AsMap()["seconds"]}}
		},
	})
	devCtx, devStop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- dev.Run(devCtx) }()
	fmt.Println("planter applies", <-applied)
	if _, err := dev.Report(ctx, map[string]any{"lamp": "on", "soil_moisture": 24}); err != nil {
		panic(err)
	}

	// The operator finds dry planters and waters them, waiting for the answer.
	for t, err := range c.ListTwins(ctx, `twin.type == "planter" && twin.reported.soil_moisture < 30.0`) {
		if err != nil {
			panic(err)
		}
		cmd, _ := c.SendCommand(ctx, t.Id, "water", map[string]any{"seconds": 30}, twind.SendOptions{Wait: 10 * time.Second})
		fmt.Println(t.Id, cmd.Name, cmd.State, cmd.Result.AsMap())
	}

	devStop()
	<-ran
	c.Close()
	stop()
	<-served
	// Output:
	// planter applies map[lamp:on]
	// planter-1 water COMMAND_STATE_SUCCEEDED map[watered_s:30]
}
