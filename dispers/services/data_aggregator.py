"""A Data Aggregator's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import data_aggregator_pb2 as pb
from dispers.proto import data_aggregator_pb2_grpc
from dispers.protocol.data_aggregator import DataAggregator
from dispers.services.base import CallerOf
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class DataAggregatorServicer(data_aggregator_pb2_grpc.DataAggregatorServicer):
    """Data Aggregator RPCs over a DataAggregator."""

    def __init__(self, aggregator: DataAggregator, caller_of: CallerOf) -> None:
        self._aggregator = aggregator
        self._caller_of = caller_of

    @rpc
    def Prepare(self, request: pb.PrepareRequest, context: Any) -> pb.PrepareResponse:
        """Get ready for a query."""
        caller = self._caller_of(context)
        envelope = convert.envelope_from_proto(request.envelope)
        self._aggregator.prepare(caller, envelope, request.attestation)
        return pb.PrepareResponse()

    @rpc
    def Ingest(self, request: pb.IngestRequest, context: Any) -> pb.IngestResponse:
        """Fold a batch of sealed items (from T only)."""
        caller = self._caller_of(context)
        accepted = self._aggregator.ingest(caller, request.query_id, list(request.ciphertexts))
        return pb.IngestResponse(accepted=accepted)

    @rpc
    def EndIngest(self, request: pb.EndIngestRequest, context: Any) -> pb.EndIngestResponse:
        """T has forwarded all the query's items here (from T only)."""
        self._aggregator.end_ingest(self._caller_of(context), request.query_id, request.forwarded)
        return pb.EndIngestResponse()

    @rpc
    def Absorb(self, request: pb.AbsorbRequest, context: Any) -> pb.AbsorbResponse:
        """Merge a child's sealed partial."""
        caller = self._caller_of(context)
        self._aggregator.absorb(caller, request.query_id, request.child, request.sealed_partial)
        return pb.AbsorbResponse()

    @rpc
    def Finalize(self, request: pb.FinalizeRequest, context: Any) -> pb.FinalizeResponse:
        """Seal the partial (or, at the root, the result)."""
        return pb.FinalizeResponse(
            sealed=self._aggregator.finalize(self._caller_of(context), request.query_id)
        )

    @rpc
    def Budget(self, request: pb.BudgetRequest, context: Any) -> pb.BudgetResponse:
        """A querier's privacy budget (the querier itself only)."""
        status = self._aggregator.budget(self._caller_of(context), request.querier)
        return pb.BudgetResponse(
            epsilon_total=status.total.epsilon,
            delta_total=status.total.delta,
            epsilon_spent=status.spent.epsilon,
            delta_spent=status.spent.delta,
            queries=status.queries,
        )

    @rpc
    def Abort(self, request: pb.AbortRequest, context: Any) -> pb.AbortResponse:
        """Forget a query."""
        self._aggregator.abort(self._caller_of(context), request.query_id)
        return pb.AbortResponse()
