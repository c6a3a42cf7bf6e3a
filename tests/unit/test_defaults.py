"""Which cluster a command uses without --config: --config, DISPERS_CONFIG, ./cluster.toml, the
cluster `dispers up` started; and a clear error when there is none."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispers.core.defaults import remember, resolve_config
from dispers.core.errors import DispersError, ErrorCode


def test_the_default_cluster_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("DISPERS_CONFIG", raising=False)
    clusters = {}
    for name in ("explicit", "env", "cwd", "up"):
        (tmp_path / name).mkdir()
        clusters[name] = tmp_path / name / "cluster.toml"
        clusters[name].write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DispersError) as info:
        resolve_config(None)
    assert info.value.code is ErrorCode.CONFIG and "dispers up DIR" in info.value.message
    remember(clusters["up"])
    assert resolve_config(None) == clusters["up"].resolve()
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve_config(None) == Path("cluster.toml")
    monkeypatch.setenv("DISPERS_CONFIG", str(tmp_path / "env"))  # a directory is enough
    assert resolve_config(None) == clusters["env"]
    assert resolve_config(tmp_path / "explicit") == clusters["explicit"]
    assert resolve_config(str(clusters["explicit"])) == clusters["explicit"]
    with pytest.raises(DispersError, match="--config: no cluster config at"):
        resolve_config(tmp_path / "nowhere")
    monkeypatch.setenv("DISPERS_CONFIG", str(tmp_path / "gone"))
    with pytest.raises(DispersError, match="DISPERS_CONFIG: no cluster config at"):
        resolve_config(None)
