"""The Concept Indexor's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import common_pb2, concept_indexor_pb2_grpc
from dispers.proto import concept_indexor_pb2 as pb
from dispers.protocol.api import ConceptIndexorAPI
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class ConceptIndexorServicer(concept_indexor_pb2_grpc.ConceptIndexorServicer):
    """Concept Indexor RPCs over a ConceptIndexorAPI."""

    def __init__(self, indexor: ConceptIndexorAPI) -> None:
        self._indexor = indexor

    @rpc
    def TokenizeSubscriptions(
        self, request: pb.TokenizeSubscriptionsRequest, context: Any
    ) -> pb.TokenizeSubscriptionsResponse:
        """seal_CI(concepts) -> seal_TF(tokens), in order."""
        op = convert.op_from_proto(request.op)
        tokens = self._indexor.tokenize_subscriptions(op, list(request.sealed_concepts), request.batch_id)
        return pb.TokenizeSubscriptionsResponse(sealed_tokens=tokens)

    @rpc
    def Settle(self, request: common_pb2.SettleRequest, context: Any) -> common_pb2.SettleResponse:
        """Commit or drop a staged subscription batch."""
        self._indexor.settle(request.batch_id, request.commit)
        return common_pb2.SettleResponse()

    @rpc
    def TokenizeQuery(self, request: pb.TokenizeQueryRequest, context: Any) -> pb.TokenizeQueryResponse:
        """A query's concepts -> seal_TF(tokens)."""
        envelope = convert.envelope_from_proto(request.envelope)
        return pb.TokenizeQueryResponse(sealed_tokens=self._indexor.tokenize_query(envelope))
