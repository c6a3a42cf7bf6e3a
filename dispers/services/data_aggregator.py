"""A Data Aggregator's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import data_aggregator_pb2 as pb
from dispers.proto import data_aggregator_pb2_grpc
from dispers.protocol.api import DataAggregatorAPI
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class DataAggregatorServicer(data_aggregator_pb2_grpc.DataAggregatorServicer):
    """Data Aggregator RPCs over a DataAggregatorAPI."""

    def __init__(self, aggregator: DataAggregatorAPI) -> None:
        self._aggregator = aggregator

    @rpc
    def Prepare(self, request: pb.PrepareRequest, context: Any) -> pb.PrepareResponse:
        """Get ready for a query."""
        self._aggregator.prepare(convert.envelope_from_proto(request.envelope))
        return pb.PrepareResponse()

    @rpc
    def Ingest(self, request: pb.IngestRequest, context: Any) -> pb.IngestResponse:
        """Fold a batch of sealed contributions."""
        accepted = self._aggregator.ingest(request.query_id, list(request.ciphertexts))
        return pb.IngestResponse(accepted=accepted)

    @rpc
    def Absorb(self, request: pb.AbsorbRequest, context: Any) -> pb.AbsorbResponse:
        """Merge a child's sealed partial."""
        self._aggregator.absorb(request.query_id, request.child, request.sealed_partial)
        return pb.AbsorbResponse()

    @rpc
    def Finalize(self, request: pb.FinalizeRequest, context: Any) -> pb.FinalizeResponse:
        """Seal the partial (or, at the root, the result)."""
        return pb.FinalizeResponse(sealed=self._aggregator.finalize(request.query_id))

    @rpc
    def Abort(self, request: pb.AbortRequest, context: Any) -> pb.AbortResponse:
        """Forget a query."""
        self._aggregator.abort(request.query_id)
        return pb.AbortResponse()
