"""Typed key pairs: X25519 for sealing, Ed25519 for signing, and a PRF secret."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import nacl.exceptions
import nacl.public
import nacl.signing

from dispers.core.errors import DispersError, ErrorCode, malformed

KEY_BYTES = 32
SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class SealingPublicKey:
    """An X25519 public key that boxes are sealed to."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_BYTES:
            raise malformed("a sealing public key must be 32 bytes")

    def hex(self) -> str:
        """Hex form, as written in the roster."""
        return self.raw.hex()

    @classmethod
    def from_hex(cls, value: str) -> SealingPublicKey:
        """Parse the roster's hex form."""
        try:
            return cls(bytes.fromhex(value))
        except (ValueError, TypeError):
            raise malformed("a sealing public key must be 64 hex digits") from None


@dataclass(frozen=True)
class VerifyKey:
    """An Ed25519 public key that checks signatures."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_BYTES:
            raise malformed("a verify key must be 32 bytes")

    def hex(self) -> str:
        """Hex form, as written in the roster."""
        return self.raw.hex()

    @classmethod
    def from_hex(cls, value: str) -> VerifyKey:
        """Parse the roster's hex form."""
        try:
            return cls(bytes.fromhex(value))
        except (ValueError, TypeError):
            raise malformed("a verify key must be 64 hex digits") from None

    def verify(self, message: bytes, signature: bytes, what: str) -> None:
        """Check an Ed25519 signature; raise BAD_SIGNATURE naming `what` when it fails."""
        if len(signature) != SIGNATURE_BYTES:
            raise DispersError(ErrorCode.BAD_SIGNATURE, f"{what}: signature must be 64 bytes")
        try:
            nacl.signing.VerifyKey(self.raw).verify(message, signature)
        except nacl.exceptions.BadSignatureError:
            raise DispersError(ErrorCode.BAD_SIGNATURE, f"{what}: signature does not verify") from None


class SealingKeyPair:
    """An X25519 key pair; the private half never leaves this object except to a key file."""

    __slots__ = ("_private",)

    def __init__(self, private: nacl.public.PrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> SealingKeyPair:
        """A fresh random key pair."""
        return cls(nacl.public.PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SealingKeyPair:
        """Load from the 32 private bytes of a key file."""
        if len(raw) != KEY_BYTES:
            raise malformed("a sealing private key must be 32 bytes")
        return cls(nacl.public.PrivateKey(raw))

    @property
    def public(self) -> SealingPublicKey:
        """The public half."""
        return SealingPublicKey(bytes(self._private.public_key))

    def private_bytes(self) -> bytes:
        """The private half, for writing a key file only."""
        return bytes(self._private)

    def unseal_box(self) -> nacl.public.SealedBox[nacl.public.PrivateKey]:
        """The sealed box that opens messages sealed to this pair (used by crypto.box only)."""
        return nacl.public.SealedBox(self._private)

    def __repr__(self) -> str:
        return f"SealingKeyPair(public={self.public.hex()[:12]}...)"


class SigningKeyPair:
    """An Ed25519 key pair."""

    __slots__ = ("_signing",)

    def __init__(self, signing: nacl.signing.SigningKey) -> None:
        self._signing = signing

    @classmethod
    def generate(cls) -> SigningKeyPair:
        """A fresh random key pair."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, raw: bytes) -> SigningKeyPair:
        """Load from the 32-byte seed of a key file."""
        if len(raw) != KEY_BYTES:
            raise malformed("a signing seed must be 32 bytes")
        return cls(nacl.signing.SigningKey(raw))

    @property
    def verify_key(self) -> VerifyKey:
        """The public half."""
        return VerifyKey(bytes(self._signing.verify_key))

    def seed(self) -> bytes:
        """The private seed, for writing a key file only."""
        return bytes(self._signing)

    def sign(self, message: bytes) -> bytes:
        """A detached 64-byte signature."""
        return bytes(self._signing.sign(message).signature)

    def __repr__(self) -> str:
        return f"SigningKeyPair(verify_key={self.verify_key.hex()[:12]}...)"


@dataclass(frozen=True)
class ActorKeys:
    """Everything secret an actor holds: its two key pairs and a PRF secret."""

    name: str
    sealing: SealingKeyPair
    signing: SigningKeyPair
    secret: bytes

    @classmethod
    def generate(cls, name: str) -> ActorKeys:
        """Fresh keys for an actor."""
        return cls(name, SealingKeyPair.generate(), SigningKeyPair.generate(), secrets.token_bytes(32))

    def __repr__(self) -> str:
        return f"ActorKeys(name={self.name!r}, sealing={self.sealing!r}, signing={self.signing!r})"


def keyed_hash(secret: bytes, message: bytes, person: bytes) -> bytes:
    """Keyed BLAKE2b-256: the PRF behind concept tokens and pseudonyms."""
    return hashlib.blake2b(message, key=secret, digest_size=32, person=person).digest()
