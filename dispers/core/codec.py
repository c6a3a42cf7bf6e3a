"""Canonical JSON encoding of the plaintexts that go inside sealed boxes and signatures.

orjson does the work (every subscription passes through about ten encodings and decodings on
the central actors; the standard library's took 5-9 us each, orjson's under 1 us). Where orjson
would not behave as the standard library's canonical form does, the standard library decides:
an encoding holding `null` (orjson writes NaN and infinities as null, where the canonical form
refuses them), text beyond printable ASCII (which the canonical form escapes), integers beyond
64 bits, non-string keys, dataclasses and dates; and any text orjson refuses to decode
(so the same texts are accepted as before), and any text holding a run of 19 digits (orjson
reads integers beyond 64 bits as floats). Decoding thus gives the standard library's values,
and encoding its bytes except in the spelling of some floats: both write the shortest digits
that read back exactly, orjson without an exponent between 1e-5 and 1e-4 (`0.00001` for
`1e-05`); neither spelling is longer than 24 bytes, and no actor checks a signature over a
re-encoding made by other code.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from dispers.core.errors import malformed

# Dataclasses, dates and subclasses of the built-in types go to the standard library, which
# decides as before (it refuses the first two).
_SORTED = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _stdlib_dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def dumps(obj: Any) -> bytes:
    """Encode to canonical JSON bytes: sorted keys, no spaces, no NaN."""
    try:
        data = orjson.dumps(obj, option=_SORTED)
    except TypeError:  # an integer beyond 64 bits, a non-string key, an unknown type
        return _stdlib_dumps(obj)
    # A None, or a NaN / infinity orjson wrote as null; text beyond printable ASCII (the
    # canonical form escapes it, orjson writes UTF-8): the standard library decides.
    if b"null" in data or not data.isascii() or b"\x7f" in data:
        return _stdlib_dumps(obj)
    return data


# Every digit to "0", everything else to a space: a run of 19 zeros is a number orjson might
# read as a float (it does so beyond 64 bits). Translating is C-speed; a regular expression
# scanning for the run cost 8 us a payload, more than the decoding.
_DIGITS = bytes(48 if chr(b).isdigit() and b < 128 else 32 for b in range(256))
_LONG_RUN = b"0" * 19


def _loads(data: bytes) -> Any:
    if _LONG_RUN in data.translate(_DIGITS):
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # the standard library accepts a few more texts; it decides


def loads_object(data: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object, naming `what` in the error when it does not decode."""
    try:
        obj = _loads(data)
    except (UnicodeDecodeError, ValueError):
        raise malformed(f"{what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise malformed(f"{what} is not a JSON object")
    return obj


def loads_list(data: bytes, what: str) -> list[Any]:
    """Decode a JSON array, naming `what` in the error when it does not decode."""
    try:
        obj = _loads(data)
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
