"""Build an actor from the cluster config and serve it over gRPC (one server per actor)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import grpc

from dispers.core.config import ClusterConfig, ClusterSettings
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.core.wire import MAX_FIELDS, ContributionLayout
from dispers.crypto.box import crypto_is_real, sealed_size
from dispers.proto import (
    concept_indexor_pb2_grpc,
    conductor_pb2_grpc,
    data_aggregator_pb2_grpc,
    health_pb2_grpc,
    personal_cloud_pb2_grpc,
    querier_pb2_grpc,
    target_finder_pb2_grpc,
    target_pb2_grpc,
)
from dispers.protocol.assemble import Actor, Closer, assemble_actor
from dispers.protocol.common import frame_size, tokens_bytes
from dispers.protocol.concept_indexor import ConceptIndexor
from dispers.protocol.conductor import Conductor, run_in_thread
from dispers.protocol.data_aggregator import DataAggregator
from dispers.protocol.health import Health
from dispers.protocol.querier import Querier
from dispers.protocol.target import Target
from dispers.protocol.target_finder import PSEUDONYM_FRAME, TargetFinder
from dispers.services.base import CallerOf
from dispers.services.concept_indexor import ConceptIndexorServicer
from dispers.services.conductor import ConductorServicer
from dispers.services.data_aggregator import DataAggregatorServicer
from dispers.services.health import HealthServicer, package_version
from dispers.services.personal_cloud import PersonalCloudServicer
from dispers.services.querier import QuerierServicer
from dispers.services.target import TargetServicer
from dispers.services.target_finder import TargetFinderServicer
from dispers.services.training import register_training
from dispers.transport.grpc_client import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, GrpcPeers
from dispers.transport.grpc_errors import DecodeGuard
from dispers.transport.identity import caller_name, server_credentials

log = logging.getLogger(__name__)

MAX_WORKERS = 16
DEFAULT_GRACE_S = 5.0


def build_actor(config: ClusterConfig, name: str, *, closers: list[Closer] | None = None) -> Actor:
    """Construct the protocol object for roster entry `name` from its key file and stores.

    Resources the actor holds (stores, peer channels) get a close function appended to
    `closers`; if construction fails, those already opened are closed before the error rises.
    """
    own: list[Closer] = []
    try:
        actor = _build(config, name, own)
    except BaseException:
        _close_all(own, name)
        raise
    if closers is not None:
        closers.extend(own)
    return actor


def _build(config: ClusterConfig, name: str, own: list[Closer]) -> Actor:
    # Channels open lazily: free for actors that call no one. They use `name`'s certificate.
    peers = GrpcPeers.for_config(config, name)
    own.append(peers.close)
    return assemble_actor(config, name, peers, run_in_thread, own)


def _close_all(closers: Sequence[Closer], name: str) -> None:
    """Close in reverse order of opening; a failure is logged and the rest still close."""
    for close in reversed(closers):
        try:
            close()
        except Exception:
            log.exception("closing a resource of %s failed", name)


def _register(server: grpc.Server, actor: Actor, caller_of: CallerOf) -> None:
    """Add the servicer of the actor's role to `server`."""
    if isinstance(actor, Conductor):
        conductor_pb2_grpc.add_ConductorServicer_to_server(ConductorServicer(actor, caller_of), server)
    elif isinstance(actor, ConceptIndexor):
        concept_indexor_pb2_grpc.add_ConceptIndexorServicer_to_server(
            ConceptIndexorServicer(actor, caller_of), server
        )
    elif isinstance(actor, TargetFinder):
        target_finder_pb2_grpc.add_TargetFinderServicer_to_server(
            TargetFinderServicer(actor, caller_of), server
        )
    elif isinstance(actor, Target):
        target_pb2_grpc.add_TargetServicer_to_server(TargetServicer(actor, caller_of), server)
    elif isinstance(actor, DataAggregator):
        data_aggregator_pb2_grpc.add_DataAggregatorServicer_to_server(
            DataAggregatorServicer(actor, caller_of), server
        )
    elif isinstance(actor, Querier):
        querier_pb2_grpc.add_QuerierServicer_to_server(QuerierServicer(actor, caller_of), server)
    else:
        personal_cloud_pb2_grpc.add_PersonalCloudServicer_to_server(
            PersonalCloudServicer(actor, caller_of), server
        )
    register_training(server, actor, caller_of)


@dataclass
class RunningServer:
    """One actor served over gRPC in this process."""

    name: str
    role: Role
    endpoint: str  # what it is bound to, host:port
    port: int
    server: grpc.Server
    actor: Actor
    closers: list[Closer] = field(default_factory=list)
    _stopped: bool = field(default=False, repr=False)

    def stop(self, grace: float | None = DEFAULT_GRACE_S) -> None:
        """Stop serving (in-flight calls get `grace` seconds), then release the actor's resources."""
        if self._stopped:
            return
        self._stopped = True
        self.server.stop(grace).wait()
        _close_all(self.closers, self.name)
        log.info("stopped %s (%s)", self.name, self.role.value)


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DispersError(ErrorCode.CONFIG, f"endpoint {endpoint!r} is not host:port")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


MiB = 1024 * 1024


def max_request_bytes(role: Role, settings: ClusterSettings) -> int:
    """The largest request an actor of `role` accepts: what its largest legitimate message
    can be under the cluster's settings, with room for framing; larger ones are refused by
    gRPC before they are read (RESOURCE_EXHAUSTED)."""
    items = settings.batch_size
    subscription = items * (
        frame_size(settings.concepts_bytes) + frame_size(settings.address_bytes) + 2 * 32 + 64
    )
    envelope = (
        frame_size(settings.concepts_bytes) + frame_size(settings.expression_bytes)
        + frame_size(settings.request_bytes) + 64 * frame_size(settings.spec_bytes)
    )  # fmt: skip
    if role is Role.TARGET:  # Collect carries the target list: 44 bytes per target, unbounded here
        return MAX_MESSAGE_BYTES
    by_role = {
        Role.CONDUCTOR: subscription,
        Role.CONCEPT_INDEXOR: subscription,
        Role.TARGET_FINDER: items * (frame_size(tokens_bytes(settings)) + frame_size(PSEUDONYM_FRAME) + 64),
        Role.DATA_AGGREGATOR: items * (sealed_size(ContributionLayout(MAX_FIELDS).size) + 8)
        + frame_size(settings.partial_bytes),
        Role.PERSONAL_CLOUD: items * 600 + settings.request_bytes,
        Role.QUERIER: 0,
    }
    return min(MAX_MESSAGE_BYTES, by_role[role] + envelope + MiB)


def start_server(config: ClusterConfig, name: str, *, port_override: int | None = None) -> RunningServer:
    """Build actor `name` and serve it on its roster endpoint (or on `port_override`; 0 = any)."""
    if not crypto_is_real():
        raise DispersError(
            ErrorCode.CONFIG, "this process seals in clear (a simulation's mode): no service may start"
        )
    entry = config.roster.get(name)
    host, port = _split_endpoint(entry.endpoint)
    if port_override is not None:
        port = port_override
    address = f"{host}:{port}"
    identity = config.tls_identity(name)  # before building: a TLS misconfiguration fails fast
    if identity is None:
        log.warning(
            "%s listens on %s without TLS ([cluster] insecure = true): callers are not "
            "authenticated; use this only for experiments on loopback%s",
            name,
            address,
            "" if _is_loopback(host.strip("[]")) else " (this address is NOT loopback)",
        )
    closers: list[Closer] = []
    actor = build_actor(config, name, closers=closers)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix=f"dispers-{name}"),
        # No SO_REUSEPORT: a second server on a taken port must fail, not share its traffic.
        options=(
            *(o for o in CHANNEL_OPTIONS if o[0] != "grpc.max_receive_message_length"),
            ("grpc.max_receive_message_length", max_request_bytes(entry.role, config.settings)),
            ("grpc.so_reuseport", 0),
        ),
        interceptors=(DecodeGuard(),),
    )
    try:
        roster, insecure = config.roster, config.insecure

        def caller_of(context: Any) -> str:
            return caller_name(context, roster, insecure=insecure)

        _register(server, actor, caller_of)
        health_pb2_grpc.add_HealthServicer_to_server(
            HealthServicer(Health(roster, name, package_version()), caller_of), server
        )
        try:
            if identity is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, server_credentials(identity))
        except RuntimeError:  # grpc raises when the address cannot be bound
            bound = 0
        if not bound:
            raise DispersError(ErrorCode.CONFIG, f"{name} cannot listen on {address}")
        server.start()
    except BaseException:
        _close_all(closers, name)
        raise
    return RunningServer(name, entry.role, f"{host}:{bound}", bound, server, actor, closers)


def start_all_in_process(config: ClusterConfig, names: Sequence[str] | None = None) -> list[RunningServer]:
    """Serve every actor (or those named) from this process, each with its own server."""
    started: list[RunningServer] = []
    try:
        for name in names if names is not None else [e.name for e in config.roster]:
            started.append(start_server(config, name))
    except BaseException:
        for running in reversed(started):
            running.stop(0)
        raise
    return started


def serve_forever(config: ClusterConfig, name: str, *, grace_s: float = DEFAULT_GRACE_S) -> None:
    """Serve actor `name` until SIGTERM or SIGINT, then stop gracefully."""
    running = start_server(config, name)
    log.info("serving %s (%s) on %s", name, running.role.value, running.endpoint)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received %s; stopping", name, signal.Signals(signum).name)
        stop.set()

    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, on_signal)
            stop.wait()
        else:  # signals reach only the main thread: serve until the server is stopped
            running.server.wait_for_termination()
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: the handler was not installed from Python
                signal.signal(sig, handler)
        running.stop(grace_s)
