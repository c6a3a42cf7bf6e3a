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
