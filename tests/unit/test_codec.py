"""The JSON inside sealed boxes: the standard library's canonical form for anything that may
hold numbers, orjson for the subscriptions' text-only payloads, each chosen by the payload's
kind and never by its content."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispers.core.codec import dumps, dumps_strings, loads_list, loads_object, loads_strings
from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.box import Opener
from dispers.crypto.keys import SealingKeyPair
from dispers.protocol.common import open_padded, open_padded_strings, seal_padded, seal_padded_strings

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
text_values = st.one_of(st.text(max_size=30), st.lists(st.text(max_size=30), max_size=8))
text_payloads = st.dictionaries(st.text(max_size=10), text_values, max_size=4)


@given(documents)
def test_the_canonical_form_is_the_standard_librarys(obj: Any) -> None:
    # Verifiers re-encode what they check (an envelope's signing bytes, a spec's digest): the
    # bytes must not depend on an outside library's version.
    assert dumps(obj) == json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    assert loads_list(b"[" + dumps(obj) + b"]", "x") == [obj]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_refused(bad: float) -> None:
    with pytest.raises(ValueError):
        dumps({"a": [1, bad]})


@given(text_payloads)
def test_text_payloads_read_back_as_written_and_as_standard_json(obj: dict[str, Any]) -> None:
    data = dumps_strings(obj)
    assert loads_strings(data, "x") == obj
    assert json.loads(data) == obj  # standard JSON, readable by anything
    assert list(json.loads(data)) == sorted(obj)  # sorted keys


@given(text_payloads)
def test_text_payloads_are_read_alike_by_both_decoders(obj: dict[str, Any]) -> None:
    canonical = dumps(obj)  # the standard library's encoding (ASCII escapes)
    assert loads_strings(canonical, "x") == loads_object(canonical, "x") == obj


def test_a_subscription_payload_seals_to_the_same_fixed_length_whatever_it_holds() -> None:
    keys = SealingKeyPair.generate()
    opener = Opener("ci", keys)
    short = {"concepts": ["sex:f"], "nonce": "00" * 16}
    long = {"concepts": ["age:25-50", "sex:m", "has:heart_rate", "has:steps"], "nonce": "ff" * 16}
    boxes = [seal_padded_strings(keys.public, body, 2048, "concepts") for body in (short, long)]
    assert len({len(b) for b in boxes}) == 1
    assert [open_padded_strings(opener, b, 2048, "concepts") for b in boxes] == [short, long]
    # Either codec's frame opens with the other's reader (both are standard JSON).
    assert open_padded(opener, boxes[1], 2048, "concepts") == long
    assert open_padded_strings(opener, seal_padded(keys.public, long, 2048, "x"), 2048, "x") == long


@pytest.mark.parametrize("reader", [loads_object, loads_strings])
def test_decoding_errors_name_what_failed_never_the_content(reader: Any) -> None:
    cases = [
        b'{"secret": 12',  # truncated
        b'{"a": "\xff"}',  # not UTF-8
        b"[" * 5000 + b"]" * 5000,  # nested beyond any limit: MALFORMED, not a RecursionError
        b"[1, 2]",  # not an object
    ]
    for text in cases:
        with pytest.raises(DispersError) as err:
            reader(text, "subscription 3 concepts")
        assert err.value.code is ErrorCode.MALFORMED
        assert "subscription 3 concepts" in str(err.value)
        assert "secret" not in str(err.value)
    with pytest.raises(DispersError, match="not a JSON array"):
        loads_list(b'{"a": 1}', "x")
    with pytest.raises(DispersError, match="not valid JSON"):
        loads_list(b"[" * 5000, "x")


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20), max_size=6),
    st.text(min_size=1, max_size=12, alphabet="abcdefghij-0123456789"),
)
def test_the_signed_wrapper_is_the_standard_librarys_bytes(body: dict[str, Any], signer: str) -> None:
    """sign_payload writes its wrapper with orjson: the bytes the standard library would write
    (the body is canonical ASCII JSON), so a verifier of either kind reads it alike."""
    import json

    from dispers.core.codec import dumps
    from dispers.crypto.keys import SigningKeyPair
    from dispers.protocol.common import open_signed, sign_payload

    key = SigningKeyPair.generate()
    wrapped = sign_payload(key, signer, body)
    outer = json.loads(wrapped)
    assert wrapped == json.dumps(outer, sort_keys=True, separators=(",", ":")).encode()
    assert outer["body"].encode() == dumps(body)
    assert open_signed(wrapped, signer, key.verify_key, "x") == json.loads(dumps(body))
