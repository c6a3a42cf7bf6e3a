"""Tests of sealing, opening, observing, signing and key files (dispers.crypto)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.box import SEAL_OVERHEAD, Opener, seal
from dispers.crypto.keyfiles import read_key_file, write_key_file
from dispers.crypto.keys import (
    ActorKeys,
    SealingKeyPair,
    SealingPublicKey,
    SigningKeyPair,
    VerifyKey,
    keyed_hash,
)
from dispers.crypto.observe import Seen, recording

# Key pairs are made once: generating them per example would only slow hypothesis down.
ALICE = SealingKeyPair.generate()
BOB = SealingKeyPair.generate()
SIGNER = SigningKeyPair.generate()
OTHER_SIGNER = SigningKeyPair.generate()

CANARY = b"CANARY-7f3a9c-"  # a prefix that no error message or log text could contain by chance


def _open_error(opener: Opener, ciphertext: bytes, what: str = "payload") -> DispersError:
    with pytest.raises(DispersError) as info:
        opener.open(ciphertext, what)
    return info.value


def _assert_no_plaintext(err: DispersError, plaintext: bytes) -> None:
    text = str(err)
    assert plaintext.decode("latin-1") not in text
    assert plaintext.hex() not in text
    assert repr(plaintext) not in text


# --- seal / open ------------------------------------------------------------------------------


@given(st.binary(max_size=2048))
def test_seal_then_open_returns_the_plaintext(plaintext: bytes) -> None:
    sealed = seal(ALICE.public, plaintext)
    assert len(sealed) == len(plaintext) + SEAL_OVERHEAD
    assert Opener("alice", ALICE).open(sealed, "payload") == plaintext


def test_sealing_is_randomised() -> None:
    # Two seals of the same message differ (fresh ephemeral key), so equal plaintexts cannot be
    # paired by a relay; both still open to the same message.
    a, b = seal(ALICE.public, b"same"), seal(ALICE.public, b"same")
    assert a != b
    opener = Opener("alice", ALICE)
    assert opener.open(a, "x") == opener.open(b, "x") == b"same"


def test_open_accepts_a_bytearray() -> None:
    sealed = bytearray(seal(ALICE.public, b"hello"))
    assert Opener("alice", ALICE).open(sealed, "payload") == b"hello"


@settings(max_examples=150)
@given(st.binary(max_size=256), st.data())
def test_tampering_any_single_byte_is_bad_ciphertext(plaintext: bytes, data: st.DataObject) -> None:
    sealed = bytearray(seal(ALICE.public, CANARY + plaintext))
    index = data.draw(st.integers(0, len(sealed) - 1), label="index")
    flip = data.draw(st.integers(1, 255), label="xor")
    sealed[index] ^= flip
    with recording() as seen:
        err = _open_error(Opener("alice", ALICE), bytes(sealed))
    assert err.code is ErrorCode.BAD_CIPHERTEXT
    assert seen == []
    _assert_no_plaintext(err, CANARY + plaintext)


@given(st.binary(max_size=256), st.data())
def test_truncation_is_bad_ciphertext(plaintext: bytes, data: st.DataObject) -> None:
    sealed = seal(ALICE.public, plaintext)
    keep = data.draw(st.integers(0, len(sealed) - 1), label="keep")
    err = _open_error(Opener("alice", ALICE), sealed[:keep])
    assert err.code is ErrorCode.BAD_CIPHERTEXT


@given(st.binary(max_size=256), st.binary(min_size=1, max_size=16))
def test_appended_bytes_are_bad_ciphertext(plaintext: bytes, extra: bytes) -> None:
    err = _open_error(Opener("alice", ALICE), seal(ALICE.public, plaintext) + extra)
    assert err.code is ErrorCode.BAD_CIPHERTEXT


@pytest.mark.parametrize("bogus", [b"", b"\x00" * 47, b"\x00" * 48, b"\x00" * 200, "text"])
def test_garbage_is_bad_ciphertext(bogus: object) -> None:
    err = _open_error(Opener("alice", ALICE), bogus)  # type: ignore[arg-type]
    assert err.code is ErrorCode.BAD_CIPHERTEXT


@given(st.binary(max_size=512))
def test_box_sealed_to_another_key_is_refused_naming_the_actor(secret_part: bytes) -> None:
    plaintext = CANARY + secret_part
    sealed = seal(ALICE.public, plaintext)
    with recording() as seen:
        err = _open_error(Opener("da-bob", BOB), sealed, what="contribution")
    assert err.code is ErrorCode.BAD_CIPHERTEXT
    assert "da-bob" in err.message
    assert "contribution" in err.message
    _assert_no_plaintext(err, plaintext)
    assert seen == []


def test_try_open_returns_none_on_failure_and_the_plaintext_on_success() -> None:
    opener = Opener("bob", BOB)
    with recording() as seen:
        assert opener.try_open(seal(ALICE.public, b"not for bob"), "x") is None
        assert opener.try_open(b"short", "x") is None
        assert opener.try_open(seal(BOB.public, b"for bob"), "y") == b"for bob"
    assert seen == [Seen("bob", "y", b"for bob")]


# --- observers --------------------------------------------------------------------------------


@settings(max_examples=40)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alice", "bob"]), st.binary(max_size=64), st.booleans()),
        max_size=12,
    )
)
def test_observers_see_exactly_the_opened_plaintexts(
    plan: list[tuple[str, bytes, bool]],
) -> None:
    pairs = {"alice": ALICE, "bob": BOB}
    openers = {name: Opener(name, kp) for name, kp in pairs.items()}
    expected: list[Seen] = []
    with recording() as seen:
        for i, (actor, plaintext, misaddressed) in enumerate(plan):
            what = f"item-{i}"
            other = "bob" if actor == "alice" else "alice"
            recipient = pairs[other if misaddressed else actor]
            sealed = seal(recipient.public, plaintext)
            if misaddressed:
                assert openers[actor].try_open(sealed, what) is None
            else:
                assert openers[actor].open(sealed, what) == plaintext
                expected.append(Seen(actor, what, plaintext))
    assert seen == expected


def test_recording_stops_at_the_end_of_the_block_and_nests() -> None:
    opener = Opener("alice", ALICE)
    with recording() as outer:
        opener.open(seal(ALICE.public, b"one"), "a")
        with recording() as inner:
            opener.open(seal(ALICE.public, b"two"), "b")
        opener.open(seal(ALICE.public, b"three"), "c")
    opener.open(seal(ALICE.public, b"after"), "d")
    assert [s.plaintext for s in outer] == [b"one", b"two", b"three"]
    assert inner == [Seen("alice", "b", b"two")]


# --- signatures -------------------------------------------------------------------------------


@given(st.binary(max_size=1024))
def test_signatures_verify(message: bytes) -> None:
    signature = SIGNER.sign(message)
    assert len(signature) == 64
    SIGNER.verify_key.verify(message, signature, "query")  # no exception
    # the verify key survives its roster (hex) form
    VerifyKey.from_hex(SIGNER.verify_key.hex()).verify(message, signature, "query")


def _bad_signature(message: bytes, signature: bytes, key: VerifyKey | None = None) -> DispersError:
    with pytest.raises(DispersError) as info:
        (key or SIGNER.verify_key).verify(message, signature, "the query")
    assert info.value.code is ErrorCode.BAD_SIGNATURE
    assert "the query" in info.value.message
    return info.value


@settings(max_examples=150)
@given(st.binary(max_size=256), st.data())
def test_any_altered_message_fails(message: bytes, data: st.DataObject) -> None:
    signature = SIGNER.sign(message)
    how = data.draw(st.sampled_from(["flip", "append", "truncate"]), label="how")
    if how == "flip" and message:
        altered = bytearray(message)
        altered[data.draw(st.integers(0, len(message) - 1))] ^= data.draw(st.integers(1, 255))
        changed = bytes(altered)
    elif how == "truncate" and message:
        changed = message[: data.draw(st.integers(0, len(message) - 1))]
    else:
        changed = message + data.draw(st.binary(min_size=1, max_size=8))
    assert changed != message
    _bad_signature(changed, signature)


@settings(max_examples=150)
@given(st.binary(max_size=256), st.integers(0, 63), st.integers(1, 255))
def test_any_altered_signature_byte_fails(message: bytes, index: int, flip: int) -> None:
    signature = bytearray(SIGNER.sign(message))
    signature[index] ^= flip
    _bad_signature(message, bytes(signature))


@pytest.mark.parametrize("length", [0, 1, 63, 65, 128])
def test_signature_of_wrong_length_fails(length: int) -> None:
    err = _bad_signature(b"msg", SIGNER.sign(b"msg")[:length].ljust(length, b"\x00"))
    assert "64" in err.message


def test_signature_by_another_key_fails() -> None:
    _bad_signature(b"msg", OTHER_SIGNER.sign(b"msg"))
    _bad_signature(b"msg", SIGNER.sign(b"msg"), key=OTHER_SIGNER.verify_key)


# --- public keys and keyed hash ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "zz" * 32, "00" * 31, "00" * 33, "0" * 63])
def test_public_keys_from_bad_hex_are_malformed(value: str) -> None:
    for cls in (SealingPublicKey, VerifyKey):
        with pytest.raises(DispersError) as info:
            cls.from_hex(value)
        assert info.value.code is ErrorCode.MALFORMED


def test_public_key_hex_round_trip() -> None:
    assert SealingPublicKey.from_hex(ALICE.public.hex()) == ALICE.public
    assert VerifyKey.from_hex(SIGNER.verify_key.hex()) == SIGNER.verify_key


def test_keyed_hash_is_keyed_blake2b() -> None:
    secret, other = b"\x01" * 32, b"\x02" * 32
    expected = hashlib.blake2b(b"age:12-25", key=secret, digest_size=32, person=b"concept").digest()
    assert keyed_hash(secret, b"age:12-25", b"concept") == expected
    assert keyed_hash(other, b"age:12-25", b"concept") != expected
    assert keyed_hash(secret, b"age:12-25", b"pseudonym") != expected


# --- key files --------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_is_written_0600_and_reads_back_the_same_keys(tmp_path: Path) -> None:
    keys = ActorKeys.generate("da-1")
    path = tmp_path / "keys" / "da-1.key"
    old_umask = os.umask(0)  # even a permissive umask must not widen the file's mode
    try:
        write_key_file(path, keys)
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["da-1.key"]  # no temp file left
    back = read_key_file(path)
    assert back.name == "da-1"
    assert back.sealing.public == keys.sealing.public
    assert back.signing.verify_key == keys.signing.verify_key
    assert back.secret == keys.secret
    # the keys read back actually work with the original public halves
    assert Opener("da-1", back.sealing).open(seal(keys.sealing.public, b"hi"), "x") == b"hi"
    keys.signing.verify_key.verify(b"m", back.signing.sign(b"m"), "m")


def test_key_file_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "a.key"
    first, second = ActorKeys.generate("a"), ActorKeys.generate("a")
    write_key_file(path, first)
    with pytest.raises(DispersError) as info:
        write_key_file(path, second)
    assert info.value.code is ErrorCode.CONFIG
    assert read_key_file(path).sealing.public == first.sealing.public
    write_key_file(path, second, overwrite=True)
    assert read_key_file(path).sealing.public == second.sealing.public
    assert _mode(path) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601, 0o610, 0o666])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "t.key"
    write_key_file(path, ActorKeys.generate("t"))
    path.chmod(mode)
    with pytest.raises(DispersError) as info:
        read_key_file(path)
    assert info.value.code is ErrorCode.CONFIG
    assert str(path) in info.value.message


def test_missing_key_file_is_config(tmp_path: Path) -> None:
    with pytest.raises(DispersError) as info:
        read_key_file(tmp_path / "nope.key")
    assert info.value.code is ErrorCode.CONFIG


def _valid_fields(keys: ActorKeys) -> dict[str, str]:
    return {
        "name": keys.name,
        "sealing_private_key": keys.sealing.private_bytes().hex(),
        "signing_seed": keys.signing.seed().hex(),
        "secret": keys.secret.hex(),
        "sealing_public_key": keys.sealing.public.hex(),
        "verify_key": keys.signing.verify_key.hex(),
    }


def _write_raw(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def _toml(fields: dict[str, str]) -> str:
    return "".join(f'{k} = "{v}"\n' for k, v in fields.items())


@pytest.mark.parametrize(
    "change",
    [
        "not toml",
        "drop:sealing_private_key",
        "drop:signing_seed",
        "drop:secret",
        "drop:name",
        "drop:sealing_public_key",
        "drop:verify_key",
        "odd-hex:sealing_private_key",
        "non-hex:signing_seed",
        "short:sealing_private_key",
        "short:signing_seed",
        "short:secret",
        "long:secret",
    ],
)
def test_malformed_key_file_is_config(tmp_path: Path, change: str) -> None:
    keys = ActorKeys.generate("ci")
    fields = _valid_fields(keys)
    path = tmp_path / "ci.key"
    if change == "not toml":
        text = "this is = = not toml ["
    else:
        how, key = change.split(":")
        if how == "drop":
            del fields[key]
        elif how == "odd-hex":
            fields[key] = fields[key][:-1]
        elif how == "non-hex":
            fields[key] = "zz" + fields[key][2:]
        elif how == "short":
            fields[key] = fields[key][:-2]
        else:
            fields[key] = fields[key] + "00"
        text = _toml(fields)
    _write_raw(path, text)
    with pytest.raises(DispersError) as info:
        read_key_file(path)
    assert info.value.code is ErrorCode.CONFIG
    message = str(info.value)
    secrets = (keys.sealing.private_bytes(), keys.signing.seed(), keys.secret)
    for secret in secrets:
        assert secret.hex()[:16] not in message


@pytest.mark.parametrize("which", ["sealing_public_key", "verify_key"])
def test_key_file_with_mismatched_public_keys_is_config(tmp_path: Path, which: str) -> None:
    keys, other = ActorKeys.generate("t"), ActorKeys.generate("t")
    fields = _valid_fields(keys)
    fields[which] = _valid_fields(other)[which]
    path = tmp_path / "t.key"
    _write_raw(path, _toml(fields))
    with pytest.raises(DispersError) as info:
        read_key_file(path)
    assert info.value.code is ErrorCode.CONFIG
    assert str(path) in info.value.message


# --- no key material in reprs -----------------------------------------------------------------


def _private_texts(keys: ActorKeys) -> list[str]:
    out = []
    for raw in (keys.sealing.private_bytes(), keys.signing.seed(), keys.secret):
        out += [raw.hex(), raw.hex().upper(), repr(raw), raw.hex()[:16]]
    return out


def test_reprs_never_contain_private_bytes() -> None:
    for _ in range(5):
        keys = ActorKeys.generate("conductor")
        shown = " ".join(
            [repr(keys), str(keys), repr(keys.sealing), str(keys.sealing)]
            + [repr(keys.signing), str(keys.signing), f"{keys}", f"{keys!r}"]
        )
        for text in _private_texts(keys):
            assert text not in shown
        # the repr still says which actor and which public key it is
        assert "conductor" in repr(keys)
        assert keys.sealing.public.hex()[:12] in repr(keys.sealing)
        assert keys.signing.verify_key.hex()[:12] in repr(keys.signing)
