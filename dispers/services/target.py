"""The Target's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import common_pb2, target_pb2_grpc
from dispers.proto import target_pb2 as pb
from dispers.protocol.api import TargetAPI
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class TargetServicer(target_pb2_grpc.TargetServicer):
    """Target RPCs over a TargetAPI."""

    def __init__(self, target: TargetAPI) -> None:
        self._target = target

    @rpc
    def Pseudonymize(self, request: pb.PseudonymizeRequest, context: Any) -> pb.PseudonymizeResponse:
        """seal_T(address) -> seal_TF(pseudonym), in order."""
        op = convert.op_from_proto(request.op)
        pseudonyms = self._target.pseudonymize(op, list(request.sealed_addresses), request.batch_id)
        return pb.PseudonymizeResponse(sealed_pseudonyms=pseudonyms)

    @rpc
    def Settle(self, request: common_pb2.SettleRequest, context: Any) -> common_pb2.SettleResponse:
        """Commit or drop a staged subscription batch."""
        self._target.settle(request.batch_id, request.commit)
        return common_pb2.SettleResponse()

    @rpc
    def Collect(self, request: pb.CollectRequest, context: Any) -> pb.CollectResponse:
        """Collect contributions and forward them to the DAs."""
        envelope = convert.envelope_from_proto(request.envelope)
        report = self._target.collect(envelope, request.sealed_pseudonyms)
        return pb.CollectResponse(report=convert.collect_report_to_proto(report))
