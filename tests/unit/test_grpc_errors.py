"""Every ErrorCode crosses gRPC as one status and comes back as the same code and message."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from dispers.core.cluster_files import ClusterLayout, free_port, write_cluster
from dispers.core.errors import DispersError, ErrorCode
from dispers.proto import conductor_pb2, conductor_pb2_grpc
from dispers.services.server import start_server
from dispers.transport.grpc_client import ConductorClient, open_channel
from dispers.transport.grpc_errors import (
    CODE_KEY,
    INTERNAL_MESSAGE,
    STATUS_BY_CODE,
    error_from_rpc,
    rpc,
    status_for,
)

CANARY = "canary-plaintext-7f3a"
EXPECTED = {
    ErrorCode.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.BAD_CIPHERTEXT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.BAD_SIGNATURE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNKNOWN_CONCEPT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.INVALID_EXPRESSION: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNAUTHORIZED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.TOO_FEW_TARGETS: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.BUDGET_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.REPLAY: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.CONFIG: grpc.StatusCode.INTERNAL,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


class _Raiser:
    """A servicer whose one method raises what the request names."""

    @rpc
    def Raise(self, request: bytes, context: Any) -> bytes:
        text = request.decode()
        if text == "crash":
            raise ValueError(f"something broke near {CANARY}")
        if text == "ok":
            return b"fine"
        raise DispersError(ErrorCode(text), f"refused because of {text.lower()}")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    raiser = _Raiser()
    handler = grpc.method_handlers_generic_handler(
        "dispers.test.Errors",
        {"Raise": grpc.unary_unary_rpc_method_handler(lambda req, ctx: raiser.Raise(req, ctx))},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def call(endpoint: str) -> Iterator[Any]:
    channel = open_channel(endpoint)
    yield channel.unary_unary("/dispers.test.Errors/Raise")
    channel.close()


class _FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, status: grpc.StatusCode, details: str, metadata: tuple[Any, ...]) -> None:
        self._status, self._details, self._metadata = status, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self._metadata


def test_every_code_has_the_documented_status() -> None:
    assert set(STATUS_BY_CODE) == set(ErrorCode)
    for code in ErrorCode:
        assert status_for(code) is EXPECTED[code]


@pytest.mark.parametrize("code", list(ErrorCode))
def test_code_survives_the_status_mapping(code: ErrorCode) -> None:
    error = _FakeRpcError(status_for(code), f"{code.value}: a message", ((CODE_KEY, code.value),))
    back = error_from_rpc(error, "tf", "FindTargets")
    assert back.code is code
    assert back.message == "a message"


def test_every_code_round_trips_over_a_real_server(call: Any) -> None:
    for code in ErrorCode:
        with pytest.raises(grpc.RpcError) as info:
            call(code.value.encode(), timeout=10)
        assert info.value.code() is EXPECTED[code]
        assert info.value.details() == f"{code.value}: refused because of {code.value.lower()}"
        assert (CODE_KEY, code.value) in tuple(info.value.trailing_metadata())
        back = error_from_rpc(info.value, "peer", "Raise")
        assert (back.code, back.message) == (code, f"refused because of {code.value.lower()}")
    assert call(b"ok", timeout=10) == b"fine"  # the server survives every refusal


def test_unexpected_exception_is_internal_without_its_text(
    call: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="dispers.transport.grpc_errors"),
        pytest.raises(grpc.RpcError) as info,
    ):
        call(b"crash", timeout=10)
    assert info.value.code() is grpc.StatusCode.INTERNAL
    assert CANARY not in info.value.details()
    back = error_from_rpc(info.value, "peer", "Raise")
    assert (back.code, back.message) == (ErrorCode.INTERNAL, INTERNAL_MESSAGE)
    assert any(r.exc_info for r in caplog.records)  # the traceback stays server-side


def test_unreachable_peer_is_unavailable_naming_the_peer() -> None:
    with (
        ConductorClient(f"127.0.0.1:{free_port()}", peer="conductor") as client,
        pytest.raises(DispersError) as info,
    ):
        client.get_roster()
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "conductor" in info.value.message


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, ErrorCode.UNAVAILABLE),
        (grpc.StatusCode.UNAVAILABLE, ErrorCode.UNAVAILABLE),
        (grpc.StatusCode.UNIMPLEMENTED, ErrorCode.CONFIG),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorCode.INTERNAL),
        (grpc.StatusCode.INVALID_ARGUMENT, ErrorCode.MALFORMED),
    ],
)
def test_status_without_a_code_gets_the_nearest_code(status: grpc.StatusCode, code: ErrorCode) -> None:
    error = _FakeRpcError(status, f"raw transport text {CANARY}", ())
    back = error_from_rpc(error, "da-1", "Ingest")
    assert back.code is code
    assert "da-1" in back.message
    assert CANARY not in back.message


def test_servicer_maps_protocol_errors_and_keeps_serving(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory"))
    running = start_server(config, "conductor", port_override=0)
    try:
        identity = config.tls_identity("researcher")
        with ConductorClient(running.endpoint, peer="conductor", identity=identity) as client:
            assert client.get_roster() == config.roster
            with pytest.raises(DispersError) as info:
                client.status("ab" * 16)
            assert info.value.code is ErrorCode.NOT_FOUND
            with (
                open_channel(running.endpoint, identity=identity, server_name="conductor") as channel,
                pytest.raises(grpc.RpcError) as raw,
            ):
                stub = conductor_pb2_grpc.ConductorStub(channel)
                stub.Submit(conductor_pb2.ConductorSubmitRequest(), timeout=10)  # no envelope
            assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert (CODE_KEY, ErrorCode.MALFORMED.value) in tuple(raw.value.trailing_metadata())
            assert client.get_roster() == config.roster  # still serving
        with pytest.raises(DispersError) as taken:  # the port is not silently shared
            start_server(config, "conductor", port_override=running.port)
        assert taken.value.code is ErrorCode.CONFIG
    finally:
        running.stop(0)
