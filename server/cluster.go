package server

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
)

// ClusterStatusSource answers ClusterService.GetClusterStatus: the cluster
// as this node sees it. It is called on every call, concurrently, and must
// return promptly (within ctx). An error that is a gRPC status is answered
// as it is; any other is answered as UNAVAILABLE with its message, for the
// client to retry.
type ClusterStatusSource func(ctx context.Context) (*twinv1.GetClusterStatusResponse, error)

// errNotClustered answers GetClusterStatus on a twind run alone.
var errNotClustered = status.Error(codes.FailedPrecondition,
	"this twind is not part of a cluster (start it with --node, --cluster-listen and --cluster-peers)")

// clusterService serves ClusterService from a source, on an owner's server
// and on a standby's forwarder alike.
type clusterService struct {
	twinv1.UnimplementedClusterServiceServer
	source ClusterStatusSource // nil: not part of a cluster
}

func (cs clusterService) GetClusterStatus(ctx context.Context, _ *twinv1.GetClusterStatusRequest) (*twinv1.GetClusterStatusResponse, error) {
	if cs.source == nil {
		return nil, errNotClustered
	}
	resp, err := cs.source(ctx)
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, status.Errorf(codes.Unavailable, "the cluster's status is not known now: %v", err)
	}
	return resp, nil
}
