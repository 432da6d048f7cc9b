package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/twind-io/twind/internal/testserver"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
)

// TestClusterStatus prints a cluster's status, as a table and as JSON, from
// a twind whose cluster status is a fixed answer; and the error of a twind
// that is not part of a cluster.
func TestClusterStatus(t *testing.T) {
	updated := timestamppb.New(time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC))
	answer := &twinv1.GetClusterStatusResponse{Node: "n2", Owner: "n1", LogLast: 1042, VirtualShards: 256, Nodes: []*twinv1.ClusterNode{
		{Name: "n1", Addr: "10.0.0.1:50051", Role: "owner", Applied: 1042, ShardsOwned: 256, Updated: updated},
		{Name: "n2", Addr: "10.0.0.2:50051", Role: "standby", Applied: 1040, Lag: 2, Updated: updated},
		{Name: "n3", Addr: "10.0.0.3:50051", Role: "down", Applied: 17, Lag: 1025},
	}}
	addr := testserver.StartWith(t, t.TempDir(), "", server.Options{
		ClusterStatus: func(context.Context) (*twinv1.GetClusterStatusResponse, error) { return answer, nil },
	}).Addr
	out, err := run(t, addr, "", "cluster", "status")
	if err != nil {
		t.Fatalf("cluster status: %v\n%s", errorText(err), out)
	}
	want := "owner: n1\nlog: 1042\nvirtual shards: 256\nanswered by: n2\n\n" +
		"NODE  ROLE     ADDR            APPLIED  LAG   UPDATED\n" +
		"n1    owner    10.0.0.1:50051  1042     0     " + ts(updated) + "\n" +
		"n2    standby  10.0.0.2:50051  1040     2     " + ts(updated) + "\n" +
		"n3    down     10.0.0.3:50051  17       1025  -\n"
	if out != want {
		t.Errorf("cluster status =\n%s\nwant\n%s", out, want)
	}

	out, err = run(t, addr, "", "-o", "json", "cluster", "status")
	if err != nil {
		t.Fatalf("cluster status -o json: %v\n%s", errorText(err), out)
	}
	var doc struct {
		Owner   string `json:"owner"`
		LogLast string `json:"log_last"`
		Nodes   []struct {
			Name, Role string
			Lag        string `json:"lag"`
		} `json:"nodes"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil || doc.Owner != "n1" || doc.LogLast != "1042" || len(doc.Nodes) != 3 || doc.Nodes[2].Lag != "1025" {
		t.Errorf("cluster status -o json = %+v, %v:\n%s", doc, err, out)
	}

	// A twind alone says how to make it part of a cluster.
	alone := startTwind(t)
	out, err = run(t, alone, "", "cluster", "status")
	if err == nil || !strings.Contains(errorText(err), "FailedPrecondition") || !strings.Contains(errorText(err), "--cluster-peers") {
		t.Errorf("cluster status of a twind alone = %v, %q; want FailedPrecondition naming the flags", err, out)
	}
}
