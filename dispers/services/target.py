"""The Target's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import common_pb2, target_pb2_grpc
from dispers.proto import target_pb2 as pb
from dispers.protocol.target import Target
from dispers.services.base import CallerOf
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class TargetServicer(target_pb2_grpc.TargetServicer):
    """Target RPCs over a Target."""

    def __init__(self, target: Target, caller_of: CallerOf) -> None:
        self._target = target
        self._caller_of = caller_of

    @rpc
    def Pseudonymize(self, request: pb.PseudonymizeRequest, context: Any) -> pb.PseudonymizeResponse:
        """seal_T(address, nonce) -> seal_TF(pseudonym, nonce), in order, signed."""
        caller = self._caller_of(context)
        header = convert.batch_header_from_proto(request.header)
        pseudonyms = self._target.pseudonymize(caller, header, list(request.sealed_addresses))
        return pb.PseudonymizeResponse(pseudonyms=convert.signed_items_to_proto(pseudonyms))

    @rpc
    def Settle(self, request: common_pb2.SettleRequest, context: Any) -> common_pb2.SettleResponse:
        """Commit or drop a staged subscription batch."""
        self._target.settle(self._caller_of(context), request.batch_id, request.commit, request.receipt)
        return common_pb2.SettleResponse()

    @rpc
    def Collect(self, request: pb.CollectRequest, context: Any) -> pb.CollectResponse:
        """Collect the targets' items and forward them to the DAs."""
        caller = self._caller_of(context)
        envelope = convert.envelope_from_proto(request.envelope)
        report = self._target.collect(caller, envelope, request.sealed_pseudonyms)
        return pb.CollectResponse(report=convert.collect_report_to_proto(report))
