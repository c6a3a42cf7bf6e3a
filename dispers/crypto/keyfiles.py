"""Key files: one TOML file per actor, readable only by its owner."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.keys import ActorKeys, SealingKeyPair, SigningKeyPair


def write_key_file(path: Path, keys: ActorKeys, *, overwrite: bool = False) -> None:
    """Write an actor's keys to `path` with mode 0600, atomically (temp file then rename)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DispersError(ErrorCode.CONFIG, f"key file {path} exists (use overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f'name = "{keys.name}"\n'
        f'sealing_private_key = "{keys.sealing.private_bytes().hex()}"\n'
        f'signing_seed = "{keys.signing.seed().hex()}"\n'
        f'secret = "{keys.secret.hex()}"\n'
        f'sealing_public_key = "{keys.sealing.public.hex()}"\n'
        f'verify_key = "{keys.signing.verify_key.hex()}"\n'
    )
    write_owner_only(path, text.encode())


def write_owner_only(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600, atomically (temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_key_file(path: Path) -> ActorKeys:
    """Read a key file, refusing one that others can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DispersError(ErrorCode.CONFIG, f"key file {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DispersError(ErrorCode.CONFIG, f"key file {path} is readable by others (chmod 600 it)")
    try:
        data = tomllib.loads(path.read_text())
        keys = ActorKeys(
            name=str(data["name"]),
            sealing=SealingKeyPair.from_private_bytes(bytes.fromhex(data["sealing_private_key"])),
            signing=SigningKeyPair.from_seed(bytes.fromhex(data["signing_seed"])),
            secret=bytes.fromhex(data["secret"]),
        )
    except (KeyError, ValueError, TypeError, tomllib.TOMLDecodeError, DispersError) as exc:
        missing = f" (missing {exc})" if isinstance(exc, KeyError) else ""
        raise DispersError(ErrorCode.CONFIG, f"key file {path} is malformed{missing}") from None
    if (
        data.get("sealing_public_key") != keys.sealing.public.hex()
        or data.get("verify_key") != keys.signing.verify_key.hex()
    ):
        raise DispersError(
            ErrorCode.CONFIG, f"key file {path}: its public keys do not match its private keys"
        )
    if len(keys.secret) != 32:
        raise DispersError(ErrorCode.CONFIG, f"key file {path}: secret must be 32 bytes")
    return keys
