"""The gRPC test world survives a port taken by another process between pick and bind."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.integration.conftest import grpc_world
from tests.integration.world import make_setup


def test_a_taken_port_is_replaced_and_the_cluster_still_starts(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, n=20)
    host, port = setup.config.roster.get("t").endpoint.rsplit(":", 1)
    squatter = socket.socket()
    squatter.bind((host, int(port)))
    squatter.listen()
    try:
        world = grpc_world(setup)
        try:
            assert setup.config.roster.get("t").endpoint != f"{host}:{port}"
            assert world.subscribe() == 20
        finally:
            world.close()
    finally:
        squatter.close()
