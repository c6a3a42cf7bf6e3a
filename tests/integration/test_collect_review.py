"""Attacks on T's streaming collect from the review of the simulation work, each failing now:
a lone late host's item reaching its DA alone, a slow host that then errs leaving a result on
the quick ones, a host's own words reaching the querier."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.protocol.querier import run_query
from dispers.protocol.target import MIN_WINDOW, _Forwarder
from tests.integration.conftest import World, local_world
from tests.integration.test_collect_deadline import _second_batch
from tests.integration.world import heart_rate_spec, make_setup


class _RecordingDA:
    def __init__(self) -> None:
        self.ingests: list[list[bytes]] = []
        self.closed: int | None = None

    def ingest(self, query_id: str, chunk: list[bytes]) -> int:
        self.ingests.append(list(chunk))
        return len(chunk)

    def end_ingest(self, query_id: str, n: int) -> None:
        self.closed = n


class _Peers:
    def __init__(self, da: _RecordingDA) -> None:
        self.da = da

    def data_aggregator(self, name: str) -> Any:
        return self.da


@pytest.mark.parametrize("first", [1024, 2047, 5000])
def test_a_lone_late_hosts_item_never_reaches_its_da_in_a_small_window(first: int) -> None:
    """Host A answers `first` items, then host B one. Before, B's item reached the DA alone in
    its own ingest call. Now, over repeated runs, where it lands in the DA's stream spreads
    over at least a window's worth of positions (it is shuffled among at least MIN_WINDOW
    items), and every item arrives exactly once."""
    positions = []
    for _ in range(150):
        da = _RecordingDA()
        forwarder = _Forwarder(_Peers(da), "q", ["da-1"], batch=128, window=8 * 128)  # type: ignore[arg-type]
        forwarder.add([("da-1", b"A%05d" % i) for i in range(first)])
        forwarder.add([("da-1", b"B-only")])
        forwarder.close()
        sent = [x for chunk in da.ingests for x in chunk]
        assert len(sent) == first + 1 and len(set(sent)) == first + 1 and da.closed == first + 1
        assert all(len(chunk) <= 128 for chunk in da.ingests)
        positions.append(sent.index(b"B-only"))
    spread = max(positions) - min(positions)
    assert spread >= 0.8 * min(MIN_WINDOW, first + 1), (spread, first)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = local_world(make_setup(tmp_path, n=300))
    try:
        assert w.subscribe() == 300
        yield w
    finally:
        w.close()


def test_a_slow_host_that_then_fails_fails_the_query(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its deadline a host's call fails (gRPC's DEADLINE_EXCEEDED arrives as UNAVAILABLE):
    the query fails, never released on the other hosts' items."""
    t = world.actors["t"]
    monkeypatch.setattr(
        t, "_settings", dataclasses.replace(t._settings, host_deadline_s=0.2, host_deadline_per_item_s=0.0)
    )

    def slow_then_down(real: Any, args: Any) -> Any:
        time.sleep(0.45)
        raise DispersError(ErrorCode.UNAVAILABLE, "pc-1 did not answer before the deadline (Contribute)")

    monkeypatch.setattr(world.actors["pc-1"], "contribute", _second_batch(world, slow_then_down))
    outcome = run_query(world.querier, heart_rate_spec(), timeout_s=60)
    assert outcome.record.state == "failed" and outcome.record.error_code == "EXPIRED", outcome.record
    assert outcome.result is None


def test_a_hosts_own_words_never_reach_the_querier(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def expired(real: Any, args: Any) -> Any:
        raise DispersError(ErrorCode.EXPIRED, "pc-1 (hospital-x) was slow; 17 of its users declined")

    monkeypatch.setattr(world.actors["pc-1"], "contribute", _second_batch(world, expired))
    outcome = run_query(world.querier, heart_rate_spec(), timeout_s=60)
    assert outcome.record.state == "failed" and outcome.record.error_code == "EXPIRED"
    assert "hospital-x" not in (outcome.record.error_message or "")
    assert "17" not in (outcome.record.error_message or "")


def test_simulations_in_one_process_never_leave_it_sealing_in_clear() -> None:
    """Two simulations overlapping in one process (crypto off, then real started while the
    first runs) used to leave the process sealing in clear; they now run one at a time, the
    switch always ends real, and no service starts in a process sealing in clear."""
    import threading

    from dispers.crypto.box import crypto_is_real, seal
    from dispers.crypto.keys import SealingKeyPair
    from dispers.simulation.driver import _crypto

    order: list[str] = []

    def sim(real: bool, name: str) -> None:
        with _crypto(real):
            order.append(f"{name} in")
            time.sleep(0.05)
            order.append(f"{name} out")

    threads = [
        threading.Thread(target=sim, args=(False, "a")),
        threading.Thread(target=sim, args=(True, "b")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
    assert crypto_is_real()
    assert not seal(SealingKeyPair.generate().public, b"ADDRESS pc-1/alice").endswith(b"alice")


def test_no_service_starts_in_a_process_sealing_in_clear(tmp_path: Path) -> None:
    from dispers.services.server import start_server
    from dispers.simulation.driver import _crypto

    setup = make_setup(tmp_path, n=5)
    with _crypto(False), pytest.raises(DispersError) as info:
        start_server(setup.config, "t")
    assert info.value.code is ErrorCode.CONFIG and "clear" in info.value.message
