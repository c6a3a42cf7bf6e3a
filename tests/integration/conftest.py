"""Fixtures: the same worlds over the in-process transport and over real gRPC services."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.messages import SubscriptionOp
from dispers.protocol.api import Peers, PersonalCloudAdminAPI, QuerierAPI
from dispers.protocol.data_aggregator import DataAggregator
from dispers.protocol.querier import Querier
from dispers.transport.local import LocalCluster
from tests.integration.world import Setup, make_setup


@dataclass
class World:
    """One running cluster, whatever the transport."""

    transport: str
    setup: Setup
    querier: QuerierAPI
    host: PersonalCloudAdminAPI
    peers_as: Callable[[str], Peers]  # clients of every actor, as the named caller reaches them
    actors: dict[str, Any]  # the protocol objects behind the actors (to inspect their state)
    querier_object: Querier  # builds envelopes for hand-made bad queries
    close: Callable[[], None]
    servers: list[Any] = field(default_factory=list)  # gRPC only: the RunningServers

    def subscribe(self) -> int:
        return self.host.subscribe_all(SubscriptionOp.SUBSCRIBE)

    @property
    def peers(self) -> Peers:
        """Clients of every actor as the Conductor reaches them."""
        return self.peers_as("conductor")

    @property
    def das(self) -> dict[str, DataAggregator]:
        return {n: a for n, a in self.actors.items() if isinstance(a, DataAggregator)}


def local_world(setup: Setup) -> World:
    cluster = LocalCluster.from_config(setup.config)
    actors: dict[str, Any] = {
        "conductor": cluster.conductor_actor,
        "ci": cluster.ci,
        "tf": cluster.tf,
        "t": cluster.t,
        **cluster.das,
        **cluster.hosts,
        **cluster.queriers,
    }
    return World(
        "local", setup, cluster.querier(), cluster.host_admin("pc-1"), cluster.as_caller, actors,
        cluster.querier_object(), cluster.close,
    )  # fmt: skip


def _new_ports(setup: Setup) -> None:
    """Rewrite the cluster file with fresh free ports and reload it."""
    import re

    from dispers.core.cluster_files import free_port
    from dispers.core.config import load_config

    path = setup.directory / "cluster.toml"
    used: set[int] = set()

    def fresh(match: re.Match[str]) -> str:
        port = free_port()
        while port in used:
            port = free_port()
        used.add(port)
        return f"{match.group(1)}{port}"

    path.write_text(re.sub(r'(endpoint = "127\.0\.0\.1:)\d+', fresh, path.read_text()))
    setup.config = load_config(path)


def grpc_world(setup: Setup) -> World:
    from dispers.services.server import start_all_in_process
    from dispers.transport.grpc_client import GrpcPeers, PersonalCloudClient, QuerierClient, client_for

    for attempt in range(3):
        try:
            servers = start_all_in_process(setup.config)
            break
        except DispersError as exc:
            # Another process (a parallel test run on this machine) took a port between
            # write_cluster's pick and our bind: pick new ones and retry.
            if exc.code is not ErrorCode.CONFIG or "cannot listen" not in exc.message or attempt == 2:
                raise
            _new_ports(setup)
    config = setup.config
    # Tests reach the other actors as the Conductor does (its certificate), the Querier as the
    # researcher and the host as its own administrator.
    opened: list[GrpcPeers] = []

    def peers_as(name: str) -> GrpcPeers:
        peers = GrpcPeers.for_config(config, name)
        opened.append(peers)
        return peers

    querier = client_for(config, "researcher", "researcher", QuerierClient)
    host = client_for(config, "pc-1", "pc-1", PersonalCloudClient)
    actors = {s.name: s.actor for s in servers}

    def close() -> None:
        querier.close()
        host.close()
        for peers in opened:
            peers.close()
        for s in servers:
            s.stop(0)

    return World(
        "grpc",
        setup,
        querier,
        host,
        peers_as,
        actors,
        actors["researcher"],
        close,
        servers,
    )


BUILDERS = {"local": local_world, "grpc": grpc_world}


@pytest.fixture(params=["local", "grpc"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def world_factory(tmp_path: Path, transport: str) -> Iterator[Callable[..., World]]:
    made: list[World] = []

    def make(**kwargs: Any) -> World:
        setup = make_setup(tmp_path / f"w{len(made)}", **kwargs)
        world = BUILDERS[transport](setup)
        made.append(world)
        return world

    yield make
    for world in made:
        world.close()
