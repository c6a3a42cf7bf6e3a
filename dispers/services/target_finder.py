"""The Target Finder's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import target_finder_pb2 as pb
from dispers.proto import target_finder_pb2_grpc
from dispers.protocol.target_finder import TargetFinder
from dispers.services.base import CallerOf
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class TargetFinderServicer(target_finder_pb2_grpc.TargetFinderServicer):
    """Target Finder RPCs over a TargetFinder."""

    def __init__(self, finder: TargetFinder, caller_of: CallerOf) -> None:
        self._finder = finder
        self._caller_of = caller_of

    @rpc
    def ApplySubscriptions(
        self, request: pb.ApplySubscriptionsRequest, context: Any
    ) -> pb.ApplySubscriptionsResponse:
        """Apply one signed, nonce-paired subscription batch."""
        caller = self._caller_of(context)
        receipt = self._finder.apply_subscriptions(
            caller,
            convert.op_from_proto(request.op),
            request.batch_id,
            convert.signed_items_from_proto(request.tokens),
            convert.signed_items_from_proto(request.pseudonyms),
        )
        return pb.ApplySubscriptionsResponse(changed=receipt.applied, receipt=receipt.signature)

    @rpc
    def FindTargets(self, request: pb.FindTargetsRequest, context: Any) -> pb.FindTargetsResponse:
        """Evaluate a query's expression."""
        caller = self._caller_of(context)
        envelope = convert.envelope_from_proto(request.envelope)
        found = self._finder.find_targets(caller, envelope, request.sealed_tokens)
        return pb.FindTargetsResponse(found=convert.found_targets_to_proto(found))
