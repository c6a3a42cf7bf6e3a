"""Properties of the binary layouts of everything sealed (dispers.core.wire).

DESIGN.md "Lengths are public, so they carry nothing": a padded frame's length depends only on
its declared size, a contribution and a decline of one query have the same length, and a
payload that does not fit is refused, never truncated. Every tampering of a frame or record
is refused with MALFORMED.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.wire import (
    KIND_CONTRIBUTION,
    KIND_DECLINE,
    MAX_FIELDS,
    PAD_VERSION,
    RECORD_VERSION,
    ContributionLayout,
    pad,
    padded_size,
    unpad,
)

HEADER = 5  # version byte + 4-byte big-endian payload length
RECORD_HEADER = 1 + 1 + 16 + 4  # version, kind, query id, group

sizes = st.integers(min_value=0, max_value=2048)
query_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
n_fields = st.integers(min_value=1, max_value=64)
groups = st.integers(min_value=0, max_value=2**32 - 1)
# Every float64 bit pattern: infinities, NaNs with any sign and payload, subnormals, -0.0.
any_float64 = st.integers(min_value=0, max_value=2**64 - 1).map(
    lambda bits: struct.unpack(">d", bits.to_bytes(8, "big"))[0]
)
float64s = st.one_of(st.floats(allow_nan=True, allow_infinity=True), any_float64)


def _malformed(fn, *args) -> DispersError:  # type: ignore[no-untyped-def]
    with pytest.raises(DispersError) as info:
        fn(*args)
    assert info.value.code is ErrorCode.MALFORMED, info.value
    return info.value


@st.composite
def fitting(draw: st.DrawFn) -> tuple[int, bytes]:
    """A frame size and a payload of at most that size."""
    size = draw(sizes)
    return size, draw(st.binary(max_size=size))


# --- pad / unpad ------------------------------------------------------------------------------


def test_padded_size_is_the_header_plus_the_size() -> None:
    for size in (0, 1, 64, 1024, 65536):
        assert padded_size(size) == size + HEADER


@given(fitting())
def test_pad_then_unpad_returns_the_payload(case: tuple[int, bytes]) -> None:
    size, payload = case
    assert unpad(pad(payload, size, "payload"), size, "payload") == payload


@given(sizes, st.data())
def test_frame_length_depends_only_on_the_size(size: int, data: st.DataObject) -> None:
    a = data.draw(st.binary(max_size=size))
    b = data.draw(st.binary(max_size=size))
    fa, fb = pad(a, size, "payload"), pad(b, size, "payload")
    assert len(fa) == len(fb) == padded_size(size)


@given(sizes, st.integers(min_value=1, max_value=64), st.data())
def test_a_payload_over_its_size_is_refused_not_truncated(size: int, extra: int, data: st.DataObject) -> None:
    payload = data.draw(st.binary(min_size=size + extra, max_size=size + extra))
    err = _malformed(pad, payload, size, "the widget")
    assert "the widget" in err.message and "does not fit" in err.message


@given(fitting(), st.integers(min_value=1, max_value=64), st.booleans())
def test_unpad_refuses_a_frame_of_the_wrong_length(case: tuple[int, bytes], by: int, longer: bool) -> None:
    size, payload = case
    frame = pad(payload, size, "payload")
    bad = frame + bytes(by) if longer else frame[: max(0, len(frame) - by)]
    err = _malformed(unpad, bad, size, "payload")
    assert "wrong length" in err.message
    # Nor is a well-formed frame of another size accepted as this one.
    if size > 0:
        _malformed(unpad, pad(payload[: size - 1], size - 1, "payload"), size, "payload")


@given(fitting(), st.integers(min_value=0, max_value=255))
def test_unpad_refuses_an_unknown_version(case: tuple[int, bytes], version: int) -> None:
    assume(version != PAD_VERSION)
    size, payload = case
    frame = bytearray(pad(payload, size, "payload"))
    frame[0] = version
    assert "unknown layout version" in _malformed(unpad, bytes(frame), size, "payload").message


@given(fitting(), st.data())
def test_unpad_refuses_a_declared_length_over_the_frame(case: tuple[int, bytes], data: st.DataObject) -> None:
    size, payload = case
    declared = data.draw(st.integers(min_value=size + 1, max_value=2**32 - 1))
    frame = bytearray(pad(payload, size, "payload"))
    frame[1:5] = declared.to_bytes(4, "big")
    assert "declares more bytes" in _malformed(unpad, bytes(frame), size, "payload").message


@given(fitting(), st.data())
def test_unpad_refuses_non_zero_padding(case: tuple[int, bytes], data: st.DataObject) -> None:
    size, payload = case
    assume(len(payload) < size)
    at = data.draw(st.integers(min_value=HEADER + len(payload), max_value=HEADER + size - 1))
    frame = bytearray(pad(payload, size, "payload"))
    frame[at] = data.draw(st.integers(min_value=1, max_value=255))
    assert "non-zero padding" in _malformed(unpad, bytes(frame), size, "payload").message


@given(fitting(), st.data())
def test_unpad_refuses_a_shortened_declared_length(case: tuple[int, bytes], data: st.DataObject) -> None:
    """Declaring fewer bytes than the payload holds leaves its tail in the padding: refused."""
    size, payload = case
    assume(payload and payload[-1] != 0)
    declared = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    frame = bytearray(pad(payload, size, "payload"))
    frame[1:5] = declared.to_bytes(4, "big")
    _malformed(unpad, bytes(frame), size, "payload")


# --- ContributionLayout -----------------------------------------------------------------------


def _bits(values: tuple[float, ...] | list[float]) -> list[bytes]:
    return [struct.pack(">d", v) for v in values]


@given(st.data(), n_fields, query_ids, groups)
def test_contribution_round_trips_bit_exact(data: st.DataObject, n: int, qid: str, group: int) -> None:
    values = data.draw(st.lists(float64s, min_size=n, max_size=n))
    layout = ContributionLayout(n)
    record = layout.encode(qid, group, values)
    got = layout.decode(record)
    assert not got.declined
    assert got.query_id == qid and got.group == group
    assert len(got.values) == n
    assert _bits(got.values) == _bits(values)  # inf, nan (any payload), -0.0 alike


@given(n_fields, query_ids)
def test_decline_decodes_as_declined(n: int, qid: str) -> None:
    layout = ContributionLayout(n)
    got = layout.decode(layout.decline(qid))
    assert got.declined
    assert got.query_id == qid and got.group == 0
    assert _bits(got.values) == _bits([0.0] * n)


@pytest.mark.parametrize("n", range(1, 65))
def test_contribution_and_decline_have_the_same_length(n: int) -> None:
    layout = ContributionLayout(n)
    qid = "ab" * 16
    assert layout.size == RECORD_HEADER + 8 * n
    lengths = {
        len(layout.decline(qid)),
        len(layout.encode(qid, 0, [0.0] * n)),
        len(layout.encode(qid, 2**32 - 1, [float("nan")] * n)),
        len(layout.encode(qid, 7, [-1e308] * n)),
        len(layout.encode(qid, 3, np.linspace(30, 220, n))),
    }
    assert lengths == {layout.size}


@given(st.data(), n_fields, query_ids, groups, st.booleans())
def test_record_length_never_depends_on_what_it_carries(
    data: st.DataObject, n: int, qid: str, group: int, declined: bool
) -> None:
    layout = ContributionLayout(n)
    values = data.draw(st.lists(float64s, min_size=n, max_size=n))
    record = layout.decline(qid) if declined else layout.encode(qid, group, values)
    assert len(record) == layout.size


@given(n_fields, query_ids, groups, st.integers(min_value=1, max_value=64), st.booleans())
def test_decode_refuses_the_wrong_length(n: int, qid: str, group: int, by: int, longer: bool) -> None:
    layout = ContributionLayout(n)
    record = layout.encode(qid, group, [1.0] * n)
    bad = record + bytes(by) if longer else record[: max(0, len(record) - by)]
    assert "wrong length" in _malformed(layout.decode, bad).message
    # A record of another query's layout is refused as well.
    assert "wrong length" in _malformed(ContributionLayout(n + 1).decode, record).message


@given(n_fields, query_ids, st.integers(min_value=0, max_value=255), st.booleans())
def test_decode_refuses_an_unknown_version(n: int, qid: str, version: int, declined: bool) -> None:
    assume(version != RECORD_VERSION)
    layout = ContributionLayout(n)
    record = bytearray(layout.decline(qid) if declined else layout.encode(qid, 1, [2.0] * n))
    record[0] = version
    assert "unknown layout version" in _malformed(layout.decode, bytes(record)).message


@given(n_fields, query_ids, st.integers(min_value=0, max_value=255))
def test_decode_refuses_an_unknown_kind(n: int, qid: str, kind: int) -> None:
    assume(kind not in (KIND_DECLINE, KIND_CONTRIBUTION))
    layout = ContributionLayout(n)
    record = bytearray(layout.encode(qid, 1, [2.0] * n))
    record[1] = kind
    assert "unknown kind" in _malformed(layout.decode, bytes(record)).message


@given(n_fields, st.integers(min_value=0, max_value=130), query_ids)
def test_encode_refuses_the_wrong_number_of_values(n: int, count: int, qid: str) -> None:
    assume(count != n)
    layout = ContributionLayout(n)
    assert "exactly" in _malformed(layout.encode, qid, 0, [1.0] * count).message


@given(n_fields, query_ids, st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)))
def test_encode_refuses_a_group_out_of_range(n: int, qid: str, group: int) -> None:
    _malformed(ContributionLayout(n).encode, qid, group, [1.0] * n)


@pytest.mark.parametrize("n", [0, -1, MAX_FIELDS + 1, 1.0])
def test_a_layout_of_no_or_too_many_fields_is_refused(n: object) -> None:
    _malformed(ContributionLayout, n)


def test_the_largest_layout_still_round_trips() -> None:
    layout = ContributionLayout(MAX_FIELDS)
    values = np.arange(MAX_FIELDS, dtype=np.float64)
    got = layout.decode(layout.encode("00" * 16, 5, values))
    assert got.values == tuple(values.tolist())
    assert len(layout.decline("00" * 16)) == layout.size == RECORD_HEADER + 8 * MAX_FIELDS


@settings(deadline=None, max_examples=100)
@given(
    st.integers(1, 4),
    st.lists(
        st.tuples(
            st.integers(0, 2),
            st.integers(0, 3),
            st.integers(0, 2**32 - 1),
            st.binary(min_size=16, max_size=16),
        ),
        max_size=30,
    ),
    st.data(),
)
def test_decoding_a_batch_at_once_agrees_with_one_by_one(
    n_fields: int, heads: list[tuple[int, int, int, bytes]], data: st.DataObject
) -> None:
    """The DA's vectorised decode gives, column by column, what decode gives record by record
    (and flags as invalid exactly what decode refuses)."""
    import struct

    layout = ContributionLayout(n_fields)
    records = []
    for version, kind, group, qid in heads:
        values = data.draw(
            st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n_fields, max_size=n_fields)
        )
        records.append(
            struct.pack(">BB16sI", version, kind, qid, group) + struct.pack(f">{n_fields}d", *values)
        )
    batch = layout.decode_many(records)
    for i, record in enumerate(records):
        try:
            one = layout.decode(record)
        except DispersError:
            assert not batch.valid[i]
            continue
        assert batch.valid[i] and bool(batch.declined[i]) == one.declined
        assert batch.query_ids[i].hex() == one.query_id and int(batch.groups[i]) == one.group
        assert struct.pack(f">{n_fields}d", *batch.values[i]) == struct.pack(f">{n_fields}d", *one.values)
    with pytest.raises(DispersError, match="wrong length"):
        layout.decode_many([b"short"])
