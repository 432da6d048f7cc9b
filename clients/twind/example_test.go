package twind_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/twind-io/twind/clients/twind"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// An operator sets what a fridge should be and watches fridges change.
func Example_operator() {
	ctx := context.Background()
	c, err := twind.Dial("localhost:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	if _, err := c.CreateTwin(ctx, "fridge-1", "fridge", map[string]string{"site": "berlin"}); err != nil && !twind.IsAlreadyExists(err) {
		log.Fatal(err)
	}
	if _, err := c.UpdateDesired(ctx, "fridge-1", map[string]any{"target_c": 4}, 0); err != nil {
		log.Fatal(err)
	}
	for t, err := range c.ListTwins(ctx, `twin.type == "fridge" && twin.reported.temp_c > 8.0`) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println("warm:", t.Id)
	}
	for ev, err := range c.Watch(ctx, `twin.type == "fridge"`, 0) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(ev.Revision, ev.Kind, ev.Twin.Id)
	}
}

// A device keeps its stream up, applies desired state, runs commands and
// reports.
func Example_device() {
	ctx := context.Background()
	c, err := twind.Dial("localhost:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	dev := c.Device(twind.DeviceConfig{
		DeviceID: "planter-1",
		Token:    "twd_...", // from TwinService.IssueDeviceToken
		OnDesired: func(ctx context.Context, d twind.DesiredChange) error {
			fmt.Println("apply", d.Delta)
			return nil
		},
		OnCommand: func(ctx context.Context, cmd *twinv1.Command) twind.CommandResult {
			fmt.Println("run", cmd.Name)
			return twind.CommandResult{State: twinv1.CommandState_COMMAND_STATE_SUCCEEDED}
		},
	})
	go func() {
		for range time.Tick(10 * time.Second) {
			if _, err := dev.Report(ctx, map[string]any{"soil_moisture": 41.5}); err != nil {
				log.Print(err)
			}
		}
	}()
	log.Fatal(dev.Run(ctx))
}
