"""A personal-cloud host's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any

from dispers.proto import personal_cloud_pb2 as pb
from dispers.proto import personal_cloud_pb2_grpc
from dispers.protocol.instance.host import PersonalCloudHost
from dispers.services.base import CallerOf
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class PersonalCloudServicer(personal_cloud_pb2_grpc.PersonalCloudServicer):
    """Personal-cloud RPCs over a host."""

    def __init__(self, host: PersonalCloudHost, caller_of: CallerOf) -> None:
        self._host = host
        self._caller_of = caller_of

    @rpc
    def Contribute(self, request: pb.ContributeRequest, context: Any) -> pb.ContributeResponse:
        """One sealed item per instance asked."""
        caller = self._caller_of(context)
        batch = self._host.contribute(caller, convert.contribution_request_from_proto(request.request))
        return pb.ContributeResponse(batch=convert.contribution_batch_to_proto(batch))

    @rpc
    def SubscribeAll(self, request: pb.SubscribeAllRequest, context: Any) -> pb.SubscribeAllResponse:
        """(Un)subscribe every instance the host serves (the host's own operator only)."""
        changed = self._host.subscribe_all(self._caller_of(context), convert.op_from_proto(request.op))
        return pb.SubscribeAllResponse(changed=changed)
