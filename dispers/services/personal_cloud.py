"""A personal-cloud host's gRPC servicer: converts, calls the protocol object, maps errors."""

from __future__ import annotations

from typing import Any, Protocol

from dispers.proto import personal_cloud_pb2 as pb
from dispers.proto import personal_cloud_pb2_grpc
from dispers.protocol.api import PersonalCloudAdminAPI, PersonalCloudAPI
from dispers.transport import convert
from dispers.transport.grpc_errors import rpc


class PersonalCloudService(PersonalCloudAPI, PersonalCloudAdminAPI, Protocol):
    """What a host serves: contributions to T and administration."""


class PersonalCloudServicer(personal_cloud_pb2_grpc.PersonalCloudServicer):
    """Personal-cloud RPCs over a host."""

    def __init__(self, host: PersonalCloudService) -> None:
        self._host = host

    @rpc
    def Contribute(self, request: pb.ContributeRequest, context: Any) -> pb.ContributeResponse:
        """Compute and seal the contributions of a batch of instances."""
        batch = self._host.contribute(convert.contribution_request_from_proto(request.request))
        return pb.ContributeResponse(batch=convert.contribution_batch_to_proto(batch))

    @rpc
    def SubscribeAll(self, request: pb.SubscribeAllRequest, context: Any) -> pb.SubscribeAllResponse:
        """(Un)subscribe every instance the host serves."""
        changed = self._host.subscribe_all(convert.op_from_proto(request.op))
        return pb.SubscribeAllResponse(changed=changed)
