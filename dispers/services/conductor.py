"""The Conductor's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import conductor_pb2 as pb
from dispers.proto import conductor_pb2_grpc
from dispers.protocol.conductor import Conductor
from dispers.services.base import CallerOf
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class ConductorServicer(conductor_pb2_grpc.ConductorServicer):
    """Conductor RPCs over a Conductor."""

    def __init__(self, conductor: Conductor, caller_of: CallerOf) -> None:
        self._conductor = conductor
        self._caller_of = caller_of

    @rpc
    def GetRoster(self, request: pb.GetRosterRequest, context: Any) -> pb.GetRosterResponse:
        """The cluster's public roster."""
        roster = self._conductor.get_roster(self._caller_of(context))
        return pb.GetRosterResponse(roster=convert.roster_to_proto(roster))

    @rpc
    def GetVocabulary(self, request: pb.GetVocabularyRequest, context: Any) -> pb.GetVocabularyResponse:
        """The cluster's public concept vocabulary."""
        return pb.GetVocabularyResponse(concepts=self._conductor.get_vocabulary(self._caller_of(context)))

    @rpc
    def Subscribe(self, request: pb.SubscribeRequest, context: Any) -> pb.SubscribeResponse:
        """Relay a host's signed batch of subscriptions."""
        caller = self._caller_of(context)
        batch = convert.subscription_batch_from_proto(request.batch)
        return pb.SubscribeResponse(changed=self._conductor.subscribe(caller, batch))

    @rpc
    def Submit(self, request: pb.ConductorSubmitRequest, context: Any) -> pb.ConductorSubmitResponse:
        """Accept a query."""
        caller = self._caller_of(context)
        envelope = convert.envelope_from_proto(request.envelope)
        return pb.ConductorSubmitResponse(query_id=self._conductor.submit(caller, envelope))

    @rpc
    def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        """A query's record, for the querier who submitted it."""
        record = self._conductor.status(self._caller_of(context), request.query_id, request.wait_s)
        return pb.StatusResponse(record=convert.query_record_to_proto(record))
