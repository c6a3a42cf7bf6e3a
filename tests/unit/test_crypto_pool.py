"""Batches of boxes sealed and opened by worker processes: the same boxes as in place, observed
in the actor's own process, and a box that does not open fails as it would alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.box import Opener, seal, seal_many
from dispers.crypto.keys import SealingKeyPair
from dispers.crypto.observe import recording
from dispers.crypto.pool import MIN_ITEMS, CryptoPool, use_pool
from dispers.protocol.common import open_padded_strings_many, seal_padded_strings_many


@pytest.fixture(scope="module")
def pool() -> Iterator[CryptoPool]:
    p = CryptoPool(2)
    try:
        yield p
    finally:
        p.close()


def test_a_pool_opens_what_seal_sealed_and_marks_what_does_not_open(pool: CryptoPool) -> None:
    me, other = SealingKeyPair.generate(), SealingKeyPair.generate()
    plaintexts = [f"item {i}".encode() * 3 for i in range(3 * MIN_ITEMS)]
    boxes = [seal(me.public, p) for p in plaintexts]
    boxes[5] = seal(other.public, plaintexts[5])  # sealed to another actor
    boxes[9] = boxes[9][:-1] + bytes([boxes[9][-1] ^ 1])  # tampered
    opener = Opener("ci", me)
    with use_pool(pool), recording() as seen:
        opened = opener.open_many(boxes, "subscription concepts")
    expected: list[bytes | None] = list(plaintexts)
    expected[5] = expected[9] = None
    assert opened == expected
    # Observed here, as the actor's own opens: one per box that opened, none for the others.
    assert len(seen) == len(boxes) - 2
    assert {(s.actor, s.what) for s in seen} == {("ci", "subscription concepts")}


def test_seal_many_through_a_pool_opens_in_place(pool: CryptoPool) -> None:
    me = SealingKeyPair.generate()
    plaintexts = [bytes([i % 256]) * 40 for i in range(2 * MIN_ITEMS + 1)]
    with use_pool(pool):
        boxes = seal_many(me.public, plaintexts)
    assert len(set(boxes)) == len(boxes)  # fresh ephemeral keys: no two alike
    opener = Opener("t", me)
    assert [opener.open(b, "x") for b in boxes] == plaintexts


@pytest.mark.parametrize("with_pool", [False, True])
def test_a_batch_with_a_box_that_does_not_open_fails_naming_the_item(
    pool: CryptoPool, with_pool: bool
) -> None:
    me, other = SealingKeyPair.generate(), SealingKeyPair.generate()
    bodies = [{"nonce": f"{i:04x}", "concepts": ["age:30-39"]} for i in range(MIN_ITEMS + 10)]
    with use_pool(pool if with_pool else None):
        boxes = seal_padded_strings_many(me.public, bodies, 256, "concepts")
        boxes[70] = seal_padded_strings_many(other.public, bodies[70:71], 256, "concepts")[0]
        with pytest.raises(DispersError) as info:
            open_padded_strings_many(Opener("ci", me), boxes, 256, "subscription {i} concepts")
        assert (
            open_padded_strings_many(Opener("ci", me), boxes[:70], 256, "subscription {i} concepts")
            == bodies[:70]
        )
    assert info.value.code is ErrorCode.BAD_CIPHERTEXT
    assert info.value.message.startswith("subscription 70 concepts: ciphertext does not open with ci's key")


def test_a_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        CryptoPool(0)
