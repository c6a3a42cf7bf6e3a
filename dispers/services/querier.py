"""The Querier's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import querier_pb2 as pb
from dispers.proto import querier_pb2_grpc
from dispers.protocol.querier import Querier
from dispers.services.base import CallerOf
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class QuerierServicer(querier_pb2_grpc.QuerierServicer):
    """Querier RPCs over a Querier (its own operator's CLI, under the querier's identity)."""

    def __init__(self, querier: Querier, caller_of: CallerOf) -> None:
        self._querier = querier
        self._caller_of = caller_of

    @rpc
    def Submit(self, request: pb.QuerierSubmitRequest, context: Any) -> pb.QuerierSubmitResponse:
        """Build, sign and submit a query."""
        caller = self._caller_of(context)
        spec = convert.spec_from_json(request.spec_json)
        return pb.QuerierSubmitResponse(query_id=self._querier.submit(caller, spec))

    @rpc
    def Outcome(self, request: pb.OutcomeRequest, context: Any) -> pb.OutcomeResponse:
        """C's record of a query and, once released, the opened result."""
        outcome = self._querier.outcome(self._caller_of(context), request.query_id, request.wait_s)
        return convert.outcome_to_proto(outcome)
