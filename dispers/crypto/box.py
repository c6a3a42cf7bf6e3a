"""Sealing to one actor and opening as that actor; every opened plaintext is observed."""

from __future__ import annotations

import nacl.exceptions
import nacl.public

from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.keys import SealingKeyPair, SealingPublicKey
from dispers.crypto.observe import notify

SEAL_OVERHEAD = 48  # ephemeral public key (32) + Poly1305 tag (16)


def sealed_size(plaintext_size: int) -> int:
    """The length of the box that seals `plaintext_size` bytes."""
    return plaintext_size + SEAL_OVERHEAD


def seal(recipient: SealingPublicKey, plaintext: bytes) -> bytes:
    """Seal plaintext so that only the holder of recipient's private key can open it."""
    box = nacl.public.SealedBox(nacl.public.PublicKey(recipient.raw))
    return bytes(box.encrypt(plaintext))


class Opener:
    """Opens boxes sealed to one actor; the only way an actor reads a sealed payload."""

    __slots__ = ("actor", "_box")

    def __init__(self, actor: str, keypair: SealingKeyPair) -> None:
        self.actor = actor
        self._box = keypair.unseal_box()

    def open(self, ciphertext: bytes, what: str) -> bytes:
        """Open one box; BAD_CIPHERTEXT names `what` and the actor, never the content."""
        if not isinstance(ciphertext, bytes | bytearray) or len(ciphertext) < SEAL_OVERHEAD:
            raise DispersError(
                ErrorCode.BAD_CIPHERTEXT,
                f"{what}: ciphertext is truncated (shorter than a sealed box)",
            )
        try:
            plaintext = bytes(self._box.decrypt(bytes(ciphertext)))
        except nacl.exceptions.CryptoError:
            raise DispersError(
                ErrorCode.BAD_CIPHERTEXT,
                f"{what}: ciphertext does not open with {self.actor}'s key "
                "(tampered, truncated or sealed to another actor)",
            ) from None
        notify(self.actor, what, plaintext)
        return plaintext

    def try_open(self, ciphertext: bytes, what: str) -> bytes | None:
        """Open one box or return None (used where bad items are dropped and counted)."""
        try:
            return self.open(ciphertext, what)
        except DispersError:
            return None
