"""dispers: privacy-preserving distributed queries over personal clouds.

The researcher's API (imported on first use, so `import dispers.core...` stays light)::

    import dispers
    with dispers.connect("mycluster") as client:
        result = client.query("study.toml")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispers.client import Client, connect, run_query
    from dispers.core.errors import DispersError, QueryFailed
    from dispers.results import Result

__all__ = ["Client", "DispersError", "QueryFailed", "Result", "__version__", "connect", "run_query"]

_LAZY = {
    "Client": "dispers.client",
    "connect": "dispers.client",
    "run_query": "dispers.client",
    "DispersError": "dispers.core.errors",
    "QueryFailed": "dispers.core.errors",
    "Result": "dispers.results",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib import metadata

        try:
            return metadata.version("dispers")
        except metadata.PackageNotFoundError:
            return "unknown"
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dispers' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
