"""Canonical JSON encoding of the plaintexts that go inside sealed boxes and signatures.

Two codecs, chosen by the payload's kind at the call site, never by its content (how long an
encoding takes must not depend on what it holds: an actor timed by another would tell it):

- `dumps` / `loads_object` / `loads_list`: the standard library's canonical form (sorted keys,
  no spaces, no NaN) for every payload that may hold numbers, null or nested objects — queries,
  specs, partials, results, signed envelopes. Its bytes are what signatures and digests are
  made over, re-encoded by verifiers, so they stay those of the standard library.
- `dumps_strings` / `loads_strings`: orjson, for the subscription payloads, whose values are
  only text and lists of text (concepts, tokens, an address, a pseudonym, a nonce) and which
  nobody re-encodes: each subscription passes through eight of them on the central actors,
  where the standard library took 5-10 us each and orjson under 1 us. Also for the wrapper
  `sign_payload` puts around a canonical body (the body as text, the signer's name, the hex
  signature: all ASCII, so the same bytes either way), which nobody signs: on a model-sized
  body the standard library took about 70 us to write it. For text the two read the
  same values; orjson writes non-ASCII as UTF-8 where the standard library escapes it, always
  so, whatever else the payload holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from dispers.core.errors import malformed


def dumps(obj: Any) -> bytes:
    """Encode to canonical JSON bytes: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):  # nesting too deep is malformed too
        raise malformed(f"{what} is not valid JSON") from None


def loads_object(data: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object, naming `what` in the error when it does not decode."""
    obj = _loads(data, what)
    if not isinstance(obj, dict):
        raise malformed(f"{what} is not a JSON object")
    return obj


def loads_list(data: bytes, what: str) -> list[Any]:
    """Decode a JSON array, naming `what` in the error when it does not decode."""
    obj = _loads(data, what)
    if not isinstance(obj, list):
        raise malformed(f"{what} is not a JSON array")
    return obj


def dumps_strings(obj: Mapping[str, str | Sequence[str]]) -> bytes:
    """Encode a payload of text and lists of text (a subscription's) with orjson, sorted keys."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def loads_strings(data: bytes, what: str) -> dict[str, Any]:
    """Decode a payload made with `dumps_strings` (the caller checks each field's type)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:  # invalid JSON or UTF-8, nesting beyond 1024, NaN literals
        raise malformed(f"{what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise malformed(f"{what} is not a JSON object")
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
