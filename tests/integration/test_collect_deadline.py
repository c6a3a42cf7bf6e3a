"""T never releases a result on part of its targets: a host past its deadline, or one that
finds the request expired mid-collect, fails the query (EXPIRED), and every DA forgets it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.protocol.querier import run_query
from tests.integration.conftest import World, local_world
from tests.integration.world import heart_rate_spec, make_setup


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = local_world(make_setup(tmp_path, n=300))
    try:
        assert w.subscribe() == 300
        yield w
    finally:
        w.close()


def _second_batch(world: World, fail: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    """The host's contribute, except that its second answer goes wrong as `fail` says."""
    host = world.actors["pc-1"]
    real = host.contribute
    calls = [0]

    def contribute(caller: str, request: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            return fail(real, (caller, request))
        return real(caller, request)

    return contribute


def _check_failed_loudly(world: World) -> None:
    outcome = run_query(world.querier, heart_rate_spec(), timeout_s=60)
    assert outcome.record.state == "failed" and outcome.result is None
    record = world.actors["conductor"].record(outcome.record.query_id)
    assert record.error_code == ErrorCode.EXPIRED.value
    assert all(da.active_queries == 0 for da in world.das.values())


def test_a_request_expired_mid_collect_fails_the_query(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def expired(real: Any, args: Any) -> Any:
        raise DispersError(ErrorCode.EXPIRED, "the data request is stale or dated in the future")

    monkeypatch.setattr(world.actors["pc-1"], "contribute", _second_batch(world, expired))
    _check_failed_loudly(world)


def test_an_answer_past_its_deadline_fails_the_query(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    t = world.actors["t"]
    monkeypatch.setattr(
        t, "_settings", dataclasses.replace(t._settings, host_deadline_s=0.2, host_deadline_per_item_s=0.0)
    )

    def slow(real: Any, args: Any) -> Any:
        time.sleep(0.6)
        return real(*args)

    monkeypatch.setattr(world.actors["pc-1"], "contribute", _second_batch(world, slow))
    _check_failed_loudly(world)


def test_a_host_that_cannot_be_reached_still_costs_only_its_own_items(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(real: Any, args: Any) -> Any:
        raise DispersError(ErrorCode.UNAVAILABLE, "host down")

    monkeypatch.setattr(world.actors["pc-1"], "contribute", _second_batch(world, down))
    outcome = run_query(world.querier, heart_rate_spec(), timeout_s=60)
    assert outcome.record.state == "done"
    counts = world.actors["conductor"].record(outcome.record.query_id).counts
    assert counts["unreachable"] > 0 and counts["forwarded"] + counts["unreachable"] == counts["targets"]
