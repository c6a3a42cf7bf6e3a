"""The Conductor's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import conductor_pb2 as pb
from dispers.proto import conductor_pb2_grpc
from dispers.protocol.api import ConductorAPI
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class ConductorServicer(conductor_pb2_grpc.ConductorServicer):
    """Conductor RPCs over a ConductorAPI."""

    def __init__(self, conductor: ConductorAPI) -> None:
        self._conductor = conductor

    @rpc
    def GetRoster(self, request: pb.GetRosterRequest, context: Any) -> pb.GetRosterResponse:
        """The cluster's public roster."""
        return pb.GetRosterResponse(roster=convert.roster_to_proto(self._conductor.get_roster()))

    @rpc
    def Subscribe(self, request: pb.SubscribeRequest, context: Any) -> pb.SubscribeResponse:
        """Relay a batch of subscriptions."""
        op = convert.op_from_proto(request.op)
        items = [convert.subscription_item_from_proto(i) for i in request.items]
        return pb.SubscribeResponse(changed=self._conductor.subscribe(op, items))

    @rpc
    def Submit(self, request: pb.ConductorSubmitRequest, context: Any) -> pb.ConductorSubmitResponse:
        """Accept a query."""
        envelope = convert.envelope_from_proto(request.envelope)
        return pb.ConductorSubmitResponse(query_id=self._conductor.submit(envelope))

    @rpc
    def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        """A query's record."""
        record = self._conductor.status(request.query_id, request.wait_s)
        return pb.StatusResponse(record=convert.query_record_to_proto(record))
