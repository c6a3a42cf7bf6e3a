"""Mutual TLS material: a cluster CA, one certificate per actor (CN = SAN = roster name)."""

from __future__ import annotations

import datetime as dt
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.keyfiles import write_owner_only

CA_DAYS = 3650
CERT_DAYS = 825
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew between machines


def _config_error(message: str) -> DispersError:
    return DispersError(ErrorCode.CONFIG, message)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(cluster_name: str) -> tuple[bytes, bytes]:
    """A self-signed cluster CA (ECDSA P-256): (certificate PEM, private key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dispers CA {cluster_name}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, actor_name: str, *, days: int = CERT_DAYS
) -> tuple[bytes, bytes]:
    """A certificate for `actor_name` signed by the CA, for both server and client use.

    Subject CN and the single DNS SAN are the actor's roster name, so a peer that checks the
    name it expects (the client) or reads the CN (the server) learns which actor it talks to.
    Returns (certificate PEM, private key PEM).
    """
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except ValueError:
        raise _config_error("the CA certificate or key is not valid PEM") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise _config_error("the CA key must be an ECDSA key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, actor_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(actor_name)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def write_private_pem(path: Path, pem: bytes, *, overwrite: bool = False) -> None:
    """Write a private key PEM with mode 0600, atomically (temp file then rename)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise _config_error(f"key file {path} exists (use overwrite)")
    write_owner_only(path, pem)


def write_public_pem(path: Path, pem: bytes) -> None:
    """Write a certificate PEM (public), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pem)
    os.replace(tmp, path)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _config_error(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise _config_error(f"{what} file {path} cannot be read ({exc.strerror})") from None


def _read_private(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise _config_error(f"TLS key file {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise _config_error(f"TLS key file {path} is readable by others (chmod 600 it)")
    return _read(path, "TLS key")


@dataclass(frozen=True)
class TlsIdentity:
    """What one actor needs for mutual TLS: its certificate and key, and the cluster CA."""

    name: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes

    @classmethod
    def load(cls, name: str, *, cert: Path, key: Path, ca: Path) -> TlsIdentity:
        """Read the PEM files, refusing a key file that group or others can read.

        Errors name the file, never its contents. The certificate must carry `name` as its
        subject CN and be issued by the CA, so a mixed-up file is caught here, not at a peer.
        """
        cert_pem, ca_pem = _read(Path(cert), "TLS certificate"), _read(Path(ca), "CA certificate")
        key_pem = _read_private(Path(key))
        try:
            parsed = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise _config_error(f"TLS certificate file {cert} is not a PEM certificate") from None
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_pem)
        except ValueError:
            raise _config_error(f"CA certificate file {ca} is not a PEM certificate") from None
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise _config_error(f"TLS key file {key} is not an unencrypted PEM private key") from None
        if certificate_name(parsed) != name:
            raise _config_error(f"TLS certificate file {cert} is not issued to {name!r}")
        if parsed.issuer != ca_cert.subject:
            raise _config_error(f"TLS certificate file {cert} is not issued by the CA in {ca}")
        if private.public_key() != parsed.public_key():
            raise _config_error(f"TLS key file {key} does not match the certificate {cert}")
        return cls(name, cert_pem, key_pem, ca_pem)


def certificate_name(cert: x509.Certificate) -> str | None:
    """The subject common name of a certificate (an actor's roster name), if it has one."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else value.decode()
