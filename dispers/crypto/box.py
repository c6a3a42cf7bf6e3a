"""Sealing to one actor and opening as that actor; every opened plaintext is observed.

A simulation may turn the sealed boxes off in its own processes (:func:`set_crypto`): a box
is then the recipient's public key, 16 random bytes (so two boxes of one plaintext differ, as
real ones do) and the plaintext in clear, of exactly the sealed length, and opening checks it
was addressed to the opener. Everything else (padding,
signatures, the observer hook) stays as it is. Nothing but ``dispers simulate --crypto off``
turns it off, and its reports say so.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import nacl.exceptions
import nacl.public

from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.keys import SealingKeyPair, SealingPublicKey
from dispers.crypto.observe import notify
from dispers.crypto.pool import MIN_ITEMS, active_pool

SEAL_OVERHEAD = 48  # ephemeral public key (32) + Poly1305 tag (16)


def sealed_size(plaintext_size: int) -> int:
    """The length of the box that seals `plaintext_size` bytes."""
    return plaintext_size + SEAL_OVERHEAD


_CLEAR_NONCE = SEAL_OVERHEAD - 32
_real_everywhere = True  # False once a simulation turned the boxes off in this process


def set_crypto(real: bool) -> None:
    """Seal and open for real (the default) or, in a simulation process only, in clear."""
    global _real_everywhere
    _real_everywhere = real


def crypto_is_real() -> bool:
    """Whether this process seals and opens for real."""
    return _real_everywhere


def seal(recipient: SealingPublicKey, plaintext: bytes) -> bytes:
    """Seal plaintext so that only the holder of recipient's private key can open it."""
    if not _real_everywhere:
        # Not a secret, only so two clear boxes differ: the fast generator will do.
        return recipient.raw + random.randbytes(_CLEAR_NONCE) + plaintext
    box = nacl.public.SealedBox(nacl.public.PublicKey(recipient.raw))
    return bytes(box.encrypt(plaintext))


def seal_many(recipient: SealingPublicKey, plaintexts: Sequence[bytes]) -> list[bytes]:
    """`seal` of each plaintext, in order: across the process's crypto pool for a large batch
    (dispers.crypto.pool), else in place."""
    pool = active_pool()
    if pool is None or not _real_everywhere or len(plaintexts) < MIN_ITEMS:
        return [seal(recipient, p) for p in plaintexts]
    return pool.seal_many(recipient.raw, plaintexts)


class Opener:
    """Opens boxes sealed to one actor; the only way an actor reads a sealed payload."""

    __slots__ = ("actor", "_box", "_keypair", "_public")

    def __init__(self, actor: str, keypair: SealingKeyPair) -> None:
        self.actor = actor
        self._box = keypair.unseal_box()
        self._keypair = keypair  # its private half goes to a crypto pool's worker only
        self._public = keypair.public.raw

    def open(self, ciphertext: bytes, what: str) -> bytes:
        """Open one box; BAD_CIPHERTEXT names `what` and the actor, never the content."""
        if not isinstance(ciphertext, bytes | bytearray) or len(ciphertext) < SEAL_OVERHEAD:
            raise DispersError(
                ErrorCode.BAD_CIPHERTEXT,
                f"{what}: ciphertext is truncated (shorter than a sealed box)",
            )
        try:
            if _real_everywhere:
                plaintext = bytes(self._box.decrypt(bytes(ciphertext)))
            elif bytes(ciphertext[:32]) == self._public:
                plaintext = bytes(ciphertext[SEAL_OVERHEAD:])
            else:
                raise nacl.exceptions.CryptoError
        except nacl.exceptions.CryptoError:
            raise DispersError(
                ErrorCode.BAD_CIPHERTEXT,
                f"{what}: ciphertext does not open with {self.actor}'s key "
                "(tampered, truncated or sealed to another actor)",
            ) from None
        notify(self.actor, what, plaintext)
        return plaintext

    def open_many(self, ciphertexts: Sequence[bytes], what: str) -> list[bytes | None]:
        """`try_open` of each box, in order (None where one does not open): across the process's
        crypto pool for a large batch, else in place. The plaintexts are observed here either way,
        as opened by this actor (`what` names them all)."""
        pool = active_pool()
        if (
            pool is None
            or not _real_everywhere
            or len(ciphertexts) < MIN_ITEMS
            or not all(isinstance(c, bytes) and len(c) >= SEAL_OVERHEAD for c in ciphertexts)
        ):
            return [self.try_open(c, what) for c in ciphertexts]
        opened = pool.open_many(self._keypair.private_bytes(), ciphertexts)
        for plaintext in opened:
            if plaintext is not None:
                notify(self.actor, what, plaintext)
        return opened

    def try_open(self, ciphertext: bytes, what: str) -> bytes | None:
        """Open one box or return None (used where bad items are dropped and counted)."""
        try:
            return self.open(ciphertext, what)
        except DispersError:
            return None
