"""Binary layouts of what gets sealed: fixed-size padding and the contribution record.

DESIGN.md "Lengths are public": the length of everything sealed depends only on public
parameters of the query or the cluster. Every payload goes through one of two layouts here,
and nothing else in dispers packs the bytes of a sealed payload by hand:

- `pad` / `unpad`: a variable payload (JSON of a concept list, an expression, a partial, a
  result ...) inside a fixed-size frame: version byte, 4-byte big-endian length, payload,
  zero bytes up to the frame size. A payload that does not fit is refused, never truncated.
- `ContributionLayout`: the record an instance seals to its DA, a contribution or a decline
  of the same length: version, kind, query id, group index, then `n_fields` float64 values.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dispers.core.errors import malformed
from dispers.core.ids import check_query_id

PAD_VERSION = 1
_PAD_HEADER = struct.Struct(">BI")  # version, payload length

RECORD_VERSION = 1
KIND_DECLINE = 0
KIND_CONTRIBUTION = 1
_RECORD_HEADER = struct.Struct(">BB16sI")  # version, kind, query id (raw), group
MAX_FIELDS = 4096
"""Upper bound on the fields of one contribution (model updates later put many values in it)."""


def padded_size(size: int) -> int:
    """The length of a frame that holds payloads of up to `size` bytes."""
    return _PAD_HEADER.size + size


def pad(payload: bytes, size: int, what: str) -> bytes:
    """Frame `payload` into exactly padded_size(size) bytes; MALFORMED if it does not fit."""
    if len(payload) > size:
        raise malformed(f"{what} does not fit in its fixed size of {size} bytes")
    return _PAD_HEADER.pack(PAD_VERSION, len(payload)) + payload + bytes(size - len(payload))


def unpad(frame: bytes, size: int, what: str) -> bytes:
    """Inverse of pad: checks the frame's length, version, declared length and zero padding."""
    if len(frame) != padded_size(size):
        raise malformed(f"{what} has the wrong length")
    version, n = _PAD_HEADER.unpack_from(frame)
    if version != PAD_VERSION:
        raise malformed(f"{what} has an unknown layout version")
    if n > size:
        raise malformed(f"{what} declares more bytes than its frame holds")
    start = _PAD_HEADER.size
    # Counted in C: a Python loop over 2 KB of padding cost 10 us a frame, 4 frames an instance.
    if frame.count(0, start + n) != len(frame) - start - n:
        raise malformed(f"{what} has non-zero padding")
    return bytes(frame[start : start + n])


@dataclass(frozen=True)
class Contribution:
    """One decoded record: a decline, or a group index and its field values."""

    declined: bool
    query_id: str
    group: int
    values: tuple[float, ...]


@dataclass(frozen=True)
class Records:
    """A batch of decoded records, column by column."""

    valid: npt.NDArray[np.bool_]  # known version and kind
    declined: npt.NDArray[np.bool_]
    query_ids: list[bytes]  # 16 raw bytes each
    groups: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]  # (n, n_fields)


@dataclass(frozen=True)
class ContributionLayout:
    """The fixed record of a query whose contributions carry `n_fields` values each."""

    n_fields: int

    def __post_init__(self) -> None:
        if not isinstance(self.n_fields, int) or not 1 <= self.n_fields <= MAX_FIELDS:
            raise malformed(f"a contribution carries 1 to {MAX_FIELDS} fields")

    @property
    def size(self) -> int:
        """Bytes of one record, contribution or decline alike."""
        return _RECORD_HEADER.size + 8 * self.n_fields

    def encode(self, query_id: str, group: int, values: npt.ArrayLike) -> bytes:
        """A contribution: its group index and exactly n_fields float64 values."""
        check_query_id(query_id)
        v = np.asarray(values, dtype=">f8").reshape(-1)
        if v.shape != (self.n_fields,):
            raise malformed(f"a contribution of this query carries exactly {self.n_fields} field(s)")
        if not 0 <= group < 2**32:
            raise malformed("a contribution's group index is out of range")
        return _RECORD_HEADER.pack(RECORD_VERSION, KIND_CONTRIBUTION, bytes.fromhex(query_id), group) + (
            v.tobytes()
        )

    def decline(self, query_id: str, reason: int = 0) -> bytes:
        """A decline: the same length as a contribution, all values zero. `reason` (in the group
        field, 0 by default) is set only where the cluster's policy releases exact counts."""
        check_query_id(query_id)
        if not 0 <= reason < 2**32:
            raise malformed("a decline's reason is out of range")
        return _RECORD_HEADER.pack(RECORD_VERSION, KIND_DECLINE, bytes.fromhex(query_id), reason) + bytes(
            8 * self.n_fields
        )

    def decode_many(self, records: list[bytes]) -> Records:
        """Parse records of this layout at once (numpy): the DA's hot path. Fields are returned
        as they are; `valid` says which have a known version and kind (checks are the caller's)."""
        if any(len(r) != self.size for r in records):
            raise malformed("contribution record has the wrong length")
        dtype = np.dtype([("version", "u1"), ("kind", "u1"), ("qid", "V16"), ("group", ">u4"),
                          ("values", ">f8", (self.n_fields,))])  # fmt: skip
        raw = np.frombuffer(b"".join(records), dtype=dtype) if records else np.zeros(0, dtype=dtype)
        return Records(
            valid=(raw["version"] == RECORD_VERSION)
            & np.isin(raw["kind"], (KIND_DECLINE, KIND_CONTRIBUTION)),
            declined=raw["kind"] == KIND_DECLINE,
            query_ids=[bytes(q) for q in raw["qid"]],
            groups=raw["group"].astype(np.int64),
            values=raw["values"].astype(np.float64).reshape(len(records), self.n_fields),
        )

    def decode(self, record: bytes) -> Contribution:
        """Parse one record; MALFORMED for a wrong length, version or kind (values unchecked)."""
        if len(record) != self.size:
            raise malformed("contribution record has the wrong length")
        version, kind, qid, group = _RECORD_HEADER.unpack_from(record)
        if version != RECORD_VERSION:
            raise malformed("contribution record has an unknown layout version")
        if kind not in (KIND_DECLINE, KIND_CONTRIBUTION):
            raise malformed("contribution record has an unknown kind")
        values = np.frombuffer(record, dtype=">f8", offset=_RECORD_HEADER.size)
        return Contribution(kind == KIND_DECLINE, qid.hex(), int(group), tuple(values.tolist()))
