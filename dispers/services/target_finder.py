"""The Target Finder's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import target_finder_pb2 as pb
from dispers.proto import target_finder_pb2_grpc
from dispers.protocol.api import TargetFinderAPI
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class TargetFinderServicer(target_finder_pb2_grpc.TargetFinderServicer):
    """Target Finder RPCs over a TargetFinderAPI."""

    def __init__(self, finder: TargetFinderAPI) -> None:
        self._finder = finder

    @rpc
    def ApplySubscriptions(
        self, request: pb.ApplySubscriptionsRequest, context: Any
    ) -> pb.ApplySubscriptionsResponse:
        """Add or remove pseudonyms."""
        op = convert.op_from_proto(request.op)
        items = [convert.tokenized_from_proto(i) for i in request.items]
        return pb.ApplySubscriptionsResponse(changed=self._finder.apply_subscriptions(op, items))

    @rpc
    def FindTargets(self, request: pb.FindTargetsRequest, context: Any) -> pb.FindTargetsResponse:
        """Evaluate a query's expression."""
        envelope = convert.envelope_from_proto(request.envelope)
        found = self._finder.find_targets(envelope, request.sealed_tokens)
        return pb.FindTargetsResponse(found=convert.found_targets_to_proto(found))
