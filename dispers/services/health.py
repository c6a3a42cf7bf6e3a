"""The Health servicer every actor's server carries: who serves here, for `dispers up` and `ps`."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from dispers.proto import health_pb2 as pb
from dispers.proto import health_pb2_grpc
from dispers.protocol.health import Health
from dispers.services.base import CallerOf
from dispers.transport.grpc_errors import rpc


def package_version() -> str:
    """The installed dispers version ("unknown" when run from a tree that is not installed)."""
    try:
        return metadata.version("dispers")
    except metadata.PackageNotFoundError:
        return "unknown"


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Health RPCs over a Health."""

    def __init__(self, health: Health, caller_of: CallerOf) -> None:
        self._health = health
        self._caller_of = caller_of

    @rpc
    def Check(self, request: pb.HealthCheckRequest, context: Any) -> pb.HealthCheckResponse:
        """The actor's roster name, role and version."""
        info = self._health.check(self._caller_of(context))
        return pb.HealthCheckResponse(
            name=info.name, role=info.role.value, serving=info.serving, version=info.version
        )
