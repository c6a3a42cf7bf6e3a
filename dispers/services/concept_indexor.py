"""The Concept Indexor's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import common_pb2, concept_indexor_pb2_grpc
from dispers.proto import concept_indexor_pb2 as pb
from dispers.protocol.concept_indexor import ConceptIndexor
from dispers.services.base import CallerOf
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class ConceptIndexorServicer(concept_indexor_pb2_grpc.ConceptIndexorServicer):
    """Concept Indexor RPCs over a ConceptIndexor."""

    def __init__(self, indexor: ConceptIndexor, caller_of: CallerOf) -> None:
        self._indexor = indexor
        self._caller_of = caller_of

    @rpc
    def TokenizeSubscriptions(
        self, request: pb.TokenizeSubscriptionsRequest, context: Any
    ) -> pb.TokenizeSubscriptionsResponse:
        """seal_CI(concepts, nonce) -> seal_TF(tokens, nonce), in order, signed."""
        caller = self._caller_of(context)
        op = convert.op_from_proto(request.op)
        tokens = self._indexor.tokenize_subscriptions(
            caller, request.batch_id, op, list(request.sealed_concepts)
        )
        return pb.TokenizeSubscriptionsResponse(tokens=convert.signed_items_to_proto(tokens))

    @rpc
    def Settle(self, request: common_pb2.SettleRequest, context: Any) -> common_pb2.SettleResponse:
        """Commit or drop a staged subscription batch."""
        self._indexor.settle(self._caller_of(context), request.batch_id, request.commit, request.receipt)
        return common_pb2.SettleResponse()

    @rpc
    def TokenizeQuery(self, request: pb.TokenizeQueryRequest, context: Any) -> pb.TokenizeQueryResponse:
        """A query's concepts -> seal_TF(tokens)."""
        caller = self._caller_of(context)
        envelope = convert.envelope_from_proto(request.envelope)
        return pb.TokenizeQueryResponse(sealed_tokens=self._indexor.tokenize_query(caller, envelope))
