"""The only package that imports nacl: keys, sealing, signing, key files."""

from dispers.crypto.box import Opener, seal
from dispers.crypto.keys import (
    ActorKeys,
    SealingKeyPair,
    SealingPublicKey,
    SigningKeyPair,
    VerifyKey,
    keyed_hash,
)

__all__ = [
    "ActorKeys",
    "Opener",
    "SealingKeyPair",
    "SealingPublicKey",
    "SigningKeyPair",
    "VerifyKey",
    "keyed_hash",
    "seal",
]
