"""Progress bars: drawn on a terminal, silent when the output is piped or redirected."""

from __future__ import annotations

import pytest

from dispers.cli import progress


def test_a_bar_is_drawn_on_a_terminal_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with progress.bar(4, desc="checking rows") as shown:
        shown.update(4)
    with progress.spinner("query: running") as spin:
        spin.describe("query: done")
    assert capsys.readouterr().err == ""  # pytest's capture is no terminal
    monkeypatch.setattr(progress, "on_terminal", lambda stream=None: True)
    with progress.bar(4, desc="checking rows") as shown:
        shown.update(4)
    with progress.spinner("query: running") as spin:
        spin.describe("query: done")
    err = capsys.readouterr().err
    assert "checking rows" in err and "/4" in err and "query: done" in err


def test_a_polled_bar_follows_a_count_another_process_advances(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dispers subscribe` on the host's machine: the bar's position is the host's count of
    subscribed instances, read while the call runs; unreadable moments are skipped."""
    import time

    readings = iter([None, 250, 500, None, 1000])
    seen: list[int | None] = []

    def read() -> int | None:
        value = next(readings, 1000)
        seen.append(value)
        return value

    monkeypatch.setattr(progress, "on_terminal", lambda stream=None: True)
    with progress.polled("subscribe: pc-1", 1000, read, every_s=0.01):
        time.sleep(0.2)
    err = capsys.readouterr().err
    assert "subscribe: pc-1" in err and "1000/1000" in err and "500/1000" in err
    monkeypatch.setattr(progress, "on_terminal", lambda stream=None: False)
    calls = len(seen)
    with progress.polled("subscribe: pc-1", 1000, read, every_s=0.01):
        time.sleep(0.05)
    assert capsys.readouterr().err == "" and len(seen) == calls  # piped: silent, nothing read
