"""Mutual TLS over real gRPC on loopback: who may connect, and who the server sees calling."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.config import ClusterConfig, Roster
from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.tls import TlsIdentity, issue_cert, make_ca
from dispers.proto import conductor_pb2, conductor_pb2_grpc
from dispers.services.server import RunningServer, start_server
from dispers.transport.grpc_client import (
    CALLER_METADATA_KEY,
    ConductorClient,
    GrpcPeers,
    client_for,
    open_channel,
)
from dispers.transport.identity import caller_name, server_credentials


def _identity(config: ClusterConfig, name: str) -> TlsIdentity:
    identity = config.tls_identity(name)
    assert identity is not None
    return identity


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterConfig, RunningServer]]:
    config = write_cluster(tmp_path_factory.mktemp("mtls"), ClusterLayout(backend="memory"))
    running = start_server(config, "conductor")
    yield config, running
    running.stop(0)


def _get_roster(channel: grpc.Channel) -> Any:
    stub = conductor_pb2_grpc.ConductorStub(channel)
    return stub.GetRoster(conductor_pb2.GetRosterRequest(), timeout=10)


def _assert_still_serves(config: ClusterConfig) -> None:
    with client_for(config, "researcher", "conductor", ConductorClient) as client:
        assert client.get_roster() == config.roster


def test_client_with_a_cluster_certificate_can_call(cluster: tuple[ClusterConfig, RunningServer]) -> None:
    config, running = cluster
    with client_for(config, "researcher", "conductor", ConductorClient) as client:
        assert client.get_roster() == config.roster
    peers = GrpcPeers.for_config(config, "t")
    try:
        assert peers.conductor().get_roster() == config.roster
    finally:
        peers.close()


def test_plain_channel_cannot_call(cluster: tuple[ClusterConfig, RunningServer]) -> None:
    config, running = cluster
    with grpc.insecure_channel(running.endpoint) as channel, pytest.raises(grpc.RpcError) as info:
        _get_roster(channel)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    _assert_still_serves(config)


def test_tls_client_without_a_certificate_cannot_call(cluster: tuple[ClusterConfig, RunningServer]) -> None:
    config, running = cluster
    credentials = grpc.ssl_channel_credentials(root_certificates=_identity(config, "researcher").ca_pem)
    options = (("grpc.ssl_target_name_override", "conductor"),)
    with (
        grpc.secure_channel(running.endpoint, credentials, options=options) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        _get_roster(channel)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    _assert_still_serves(config)


def test_certificate_from_another_ca_cannot_call(cluster: tuple[ClusterConfig, RunningServer]) -> None:
    config, running = cluster
    # A forged "researcher": right name, wrong CA. It trusts the real CA, so the refusal is
    # the server's.
    cert, key = issue_cert(*make_ca("impostor"), "researcher")
    forged = TlsIdentity("researcher", cert, key, _identity(config, "researcher").ca_pem)
    with (
        open_channel(running.endpoint, identity=forged, server_name="conductor") as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        _get_roster(channel)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    with (
        ConductorClient(running.endpoint, "conductor", identity=forged) as client,
        pytest.raises(DispersError) as mapped,
    ):
        client.get_roster()
    assert mapped.value.code is ErrorCode.UNAVAILABLE
    _assert_still_serves(config)


def test_client_refuses_a_server_that_is_not_the_actor_it_meant(
    cluster: tuple[ClusterConfig, RunningServer],
) -> None:
    config, running = cluster
    # The conductor's endpoint, but the client expects the Concept Indexor's certificate.
    with (
        ConductorClient(running.endpoint, "ci", identity=_identity(config, "researcher")) as client,
        pytest.raises(DispersError) as info,
    ):
        client.get_roster()
    assert info.value.code is ErrorCode.UNAVAILABLE
    with pytest.raises(DispersError) as missing:
        open_channel(running.endpoint, identity=_identity(config, "researcher"))
    assert missing.value.code is ErrorCode.CONFIG


# --- caller_name --------------------------------------------------------------------------------


def _whoami_server(roster: Roster, credentials: grpc.ServerCredentials | None, *, insecure: bool) -> Any:
    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return b"name:" + caller_name(context, roster, insecure=insecure).encode()
        except DispersError as exc:
            return f"error:{exc.code.value}:{exc.message}".encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "dispers.test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    )
    server.add_generic_rpc_handlers((handler,))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


def _whoami(channel: grpc.Channel) -> bytes:
    return bytes(channel.unary_unary("/dispers.test.Identity/WhoAmI")(b"", timeout=10))


@pytest.mark.parametrize("as_name", ["researcher", "t", "da-2"])
def test_caller_name_is_the_certificate_name(tmp_path: Path, as_name: str) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory"))
    server, endpoint = _whoami_server(
        config.roster, server_credentials(_identity(config, "conductor")), insecure=False
    )
    try:
        # The client claims another name in metadata: over mTLS only the certificate counts.
        with open_channel(
            endpoint, identity=_identity(config, as_name), server_name="conductor", caller="conductor"
        ) as channel:
            call = channel.unary_unary("/dispers.test.Identity/WhoAmI")
            assert call(b"", timeout=10, metadata=((CALLER_METADATA_KEY, "conductor"),)) == (
                b"name:" + as_name.encode()
            )
    finally:
        server.stop(0)


def test_certificate_for_a_name_outside_the_roster_is_unauthorized(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory"))
    ca_key = (tmp_path / "keys" / "ca.tls.key").read_bytes()
    ca_pem = _identity(config, "conductor").ca_pem
    cert, key = issue_cert(ca_pem, ca_key, "mallory")  # signed by the real CA, not in the roster
    server, endpoint = _whoami_server(
        config.roster, server_credentials(_identity(config, "conductor")), insecure=False
    )
    try:
        mallory = TlsIdentity("mallory", cert, key, ca_pem)
        with open_channel(endpoint, identity=mallory, server_name="conductor") as channel:
            answer = _whoami(channel).decode()
        assert answer.startswith("error:UNAUTHORIZED:")
        assert "'mallory'" in answer
    finally:
        server.stop(0)


def test_insecure_caller_name_is_the_metadata_claim(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory", insecure=True))
    server, endpoint = _whoami_server(config.roster, None, insecure=True)
    try:
        with open_channel(endpoint, caller="researcher") as channel:
            assert _whoami(channel) == b"name:researcher"
        with open_channel(endpoint) as channel:
            assert _whoami(channel) == b"name:"
        peers = GrpcPeers.for_config(config, "t")
        try:
            assert _whoami(peers.channel(endpoint, "conductor")) == b"name:t"
        finally:
            peers.close()
    finally:
        server.stop(0)


class _FakeContext:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()


def test_caller_name_never_echoes_a_long_unknown_name(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory", insecure=True))
    long_name = "x" * 65 + "TAIL-CANARY"
    with pytest.raises(DispersError) as info:
        caller_name(_FakeContext({"x509_common_name": [long_name.encode()]}), config.roster, insecure=False)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.UNAUTHORIZED
    assert "TAIL-CANARY" not in info.value.message
    with pytest.raises(DispersError) as none:
        caller_name(_FakeContext({}), config.roster, insecure=False)  # type: ignore[arg-type]
    assert none.value.code is ErrorCode.UNAUTHORIZED
    ctx = _FakeContext({"x509_common_name": [b"tf"]})
    assert caller_name(ctx, config.roster, insecure=False) == "tf"  # type: ignore[arg-type]


# --- an insecure cluster still works, and says so -----------------------------------------------


def test_insecure_cluster_serves_plain_channels_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory", insecure=True))
    with caplog.at_level(logging.WARNING, logger="dispers.services.server"):
        running = start_server(config, "conductor")
    try:
        assert any("without TLS" in r.getMessage() for r in caplog.records)
        with client_for(config, "researcher", "conductor", ConductorClient) as client:
            assert client.get_roster() == config.roster
    finally:
        running.stop(0)


def test_secure_server_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory"))
    with caplog.at_level(logging.WARNING, logger="dispers.services.server"):
        running = start_server(config, "conductor")
    running.stop(0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_dispers_init_writes_tls_material_unless_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dispers.cli.main import main

    assert main(["init", str(tmp_path / "secure"), "--backend", "memory"]) == 0
    out = capsys.readouterr().out
    assert "mutual TLS" in out and "warning" not in out
    assert (tmp_path / "secure" / "tls" / "ca.crt").exists()
    assert (tmp_path / "secure" / "keys" / "conductor.tls.key").exists()
    assert main(["init", str(tmp_path / "plain"), "--backend", "memory", "--insecure"]) == 0
    out = capsys.readouterr().out
    assert "warning: insecure = true" in out
    assert not (tmp_path / "plain" / "tls").exists()
    assert "insecure = true" in (tmp_path / "plain" / "cluster.toml").read_text()


def test_dispers_subscribe_acts_as_the_host_over_mtls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dispers.cli.main import main
    from tests.integration.conftest import grpc_world
    from tests.integration.world import make_setup

    world = grpc_world(make_setup(tmp_path / "w", n=30))
    try:
        config = str(world.setup.config.path)
        assert main(["subscribe", "--config", config, "--host", "pc-1"]) == 0
        assert capsys.readouterr().out.startswith("subscribe: ")
        assert main(["subscribe", "--config", config, "--host", "pc-1", "--unsubscribe"]) == 0
        assert capsys.readouterr().out.startswith("unsubscribe: ")
    finally:
        world.close()
