"""What every servicer shares: how it learns who calls (from the TLS certificate, or the
insecure cluster's claimed name), resolved by the server factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CallerOf = Callable[[Any], str]
"""grpc.ServicerContext -> the caller's roster name."""
