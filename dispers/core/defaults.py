"""Which cluster a command or `dispers.connect()` acts on without `--config`, and where it is kept.

In order: `--config`; the `DISPERS_CONFIG` environment variable; `./cluster.toml`; the cluster
the last `dispers up` started (remembered in the user's state directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from dispers.core.errors import DispersError, ErrorCode

CONFIG_ENV = "DISPERS_CONFIG"
CONFIG_NAME = "cluster.toml"


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dispers"


def remembered_file() -> Path:
    """The file holding the path of the cluster `dispers up` last started."""
    return _state_dir() / "current-cluster"


def remember(config_path: Path) -> None:
    """Make `config_path` the default cluster of later commands (best effort: a read-only home
    only loses the convenience)."""
    target = remembered_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(str(config_path.resolve()) + "\n")
        tmp.replace(target)
    except OSError:
        pass


def _remembered() -> Path | None:
    try:
        text = remembered_file().read_text().strip()
    except OSError:
        return None
    path = Path(text) if text else None
    return path if path is not None and path.is_file() else None


def as_config_path(path: str | Path) -> Path:
    """A cluster directory or its cluster.toml, as the path of the cluster.toml."""
    p = Path(path)
    return p / CONFIG_NAME if p.is_dir() else p


def resolve_config(explicit: str | Path | None) -> Path:
    """The cluster.toml a command uses (see the module docstring); CONFIG error if there is none."""
    if explicit:
        path = as_config_path(explicit)
        where = "--config"
    elif os.environ.get(CONFIG_ENV):
        path = as_config_path(os.environ[CONFIG_ENV])
        where = CONFIG_ENV
    elif Path(CONFIG_NAME).is_file():
        return Path(CONFIG_NAME)
    else:
        remembered = _remembered()
        if remembered is None:
            raise DispersError(
                ErrorCode.CONFIG,
                "no cluster: pass --config PATH, set DISPERS_CONFIG, run where cluster.toml is, "
                "or start one with `dispers up DIR`",
            )
        return remembered
    if not path.is_file():
        raise DispersError(ErrorCode.CONFIG, f"{where}: no cluster config at {path}")
    return path
