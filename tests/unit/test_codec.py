"""The canonical JSON of sealed payloads: orjson's speed, the standard library's rules."""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispers.core.codec import dumps, loads_list, loads_object
from dispers.core.errors import DispersError, ErrorCode


def stdlib(obj: Any) -> bytes:
    """The canonical form as the standard library writes it (the reference)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.text(max_size=20),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@given(documents)
def test_the_bytes_are_the_standard_librarys(obj: Any) -> None:
    # Without floats, every byte is the canonical form's: sorted keys, no spaces, ASCII escapes.
    assert dumps(obj) == stdlib(obj)
    assert loads_list(b"[" + dumps(obj) + b"]", "x") == [json.loads(stdlib(obj))]


@given(st.lists(st.text(alphabet="0123456789abcdef:,[.e", max_size=40), max_size=6))
def test_strings_that_look_like_numbers_are_written_and_read_alike(obj: list[str]) -> None:
    assert dumps({"k": obj}) == stdlib({"k": obj})
    assert loads_object(dumps({"k": obj}), "x") == {"k": obj}


@given(st.dictionaries(st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False), max_size=6))
def test_floats_round_trip_exactly(obj: dict[str, float]) -> None:
    data = dumps(obj)
    assert loads_object(data, "x") == obj
    assert list(loads_object(data, "x")) == sorted(obj)  # keys sorted
    # The spelling may differ (0.00001 for 1e-05), never beyond the canonical form's 24 bytes.
    assert all(len(dumps(v)) <= 24 for v in obj.values())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_refused_as_before(bad: float) -> None:
    with pytest.raises(ValueError):
        dumps({"a": [1, bad]})
    with pytest.raises(ValueError):
        stdlib({"a": [1, bad]})


def test_what_the_standard_library_refuses_stays_refused() -> None:
    @dataclass
    class Point:
        x: int

    for obj in ({"d": datetime.date(2026, 1, 1)}, {"p": Point(1)}, {"s": {1, 2}}):
        with pytest.raises(TypeError):
            dumps(obj)


def test_big_integers_and_integer_keys_are_written_as_the_standard_library_does() -> None:
    assert dumps({"n": 2**70}) == b'{"n":1180591620717411303424}'
    assert dumps({1: "a"}) == stdlib({1: "a"})


def test_decoding_names_what_failed_never_the_content() -> None:
    with pytest.raises(DispersError) as err:
        loads_object(b'{"secret": 12', "subscription 3 concepts")
    assert err.value.code is ErrorCode.MALFORMED
    assert "subscription 3 concepts is not valid JSON" in str(err.value)
    assert "secret" not in str(err.value)
    with pytest.raises(DispersError, match="not a JSON object"):
        loads_object(b"[1, 2]", "x")
    with pytest.raises(DispersError, match="not a JSON array"):
        loads_list(b'{"a": 1}', "x")
    with pytest.raises(DispersError, match="not valid JSON"):
        loads_object(b'{"a": "\xff"}', "x")  # not UTF-8


def test_texts_the_standard_library_accepted_are_still_accepted() -> None:
    # orjson refuses these; the standard library decides, as it did before.
    assert math.isnan(loads_object(b'{"a": NaN}', "x")["a"])
    assert loads_object(b'{"n": 123456789012345678901234567890}', "x")["n"] == 123456789012345678901234567890
    assert loads_object(b' {"a" : 1} ', "x") == {"a": 1}
    assert loads_list(b"[9223372036854775808, -9223372036854775809]", "x") == [2**63, -(2**63) - 1]


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1,"a":2}',  # duplicate keys: the last wins in both
        b'{"x":1E400}',  # orjson refuses, the standard library reads inf
        b'{"x":"\\ud800"}',  # a lone surrogate
        b'\xef\xbb\xbf{"x":1}',  # a byte-order mark
        b'{"x":18446744073709551616}',  # beyond 64 bits: orjson would read a float
        b'{"x":-9223372036854775809}',
        b'{"x":[1e-400, -0, 0.1e1, "\\u0000"]}',
    ],
)
def test_decoding_gives_the_standard_librarys_values(text: bytes) -> None:
    assert repr(loads_object(text, "x")) == repr(json.loads(text))
