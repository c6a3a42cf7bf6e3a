"""Canonical JSON encoding of the plaintexts that go inside sealed boxes and signatures."""

from __future__ import annotations

import json
from typing import Any

from dispers.core.errors import malformed


def dumps(obj: Any) -> bytes:
    """Encode to canonical JSON bytes: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def loads_object(data: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object, naming `what` in the error when it does not decode."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise malformed(f"{what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise malformed(f"{what} is not a JSON object")
    return obj


def loads_list(data: bytes, what: str) -> list[Any]:
    """Decode a JSON array, naming `what` in the error when it does not decode."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise malformed(f"{what} is not valid JSON") from None
    if not isinstance(obj, list):
        raise malformed(f"{what} is not a JSON array")
    return obj


def field(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    """Return obj[key] checked against typ; the error names the field, never its value."""
    if key not in obj:
        raise malformed(f"{what}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise malformed(f"{what}: field {key!r} has the wrong type")
    if not isinstance(value, typ):
        raise malformed(f"{what}: field {key!r} has the wrong type")
    return value


def hex_bytes(value: object, what: str, length: int | None = None) -> bytes:
    """Decode a hex string, checking its length in bytes."""
    if not isinstance(value, str):
        raise malformed(f"{what} is not a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise malformed(f"{what} is not a hex string") from None
    if length is not None and len(raw) != length:
        raise malformed(f"{what} must be {length} bytes")
    return raw
