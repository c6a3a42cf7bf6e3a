"""TLS material: the cluster CA, actor certificates, key files, and the TLS config keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.config import load_config
from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.tls import TlsIdentity, certificate_name, issue_cert, make_ca


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return make_ca("test")


def test_ca_is_a_p256_ca_that_signs_certificates(ca: tuple[bytes, bytes]) -> None:
    cert = x509.load_pem_x509_certificate(ca[0])
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    cert.verify_directly_issued_by(cert)  # self-signed


def test_actor_certificate_names_the_actor_and_chains_to_the_ca(ca: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = issue_cert(*ca, "da-1")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["da-1"]
    assert certificate_name(cert) == "da-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["da-1"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca[0]))
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    assert b"PRIVATE KEY" in key_pem


def test_certificate_from_another_ca_does_not_verify(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = issue_cert(*make_ca("other"), "da-1")
    with pytest.raises((ValueError, TypeError)):
        x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca[0])
        )


def test_write_cluster_writes_a_ca_and_a_certificate_per_actor(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory"))
    assert not config.insecure
    assert config.settings.ca_cert == tmp_path / "tls" / "ca.crt"
    ca = x509.load_pem_x509_certificate((tmp_path / "tls" / "ca.crt").read_bytes())
    key_files = [tmp_path / "keys" / "ca.tls.key"]
    for entry in config.roster:
        local = config.local_for(entry.name)
        assert local.tls_cert == tmp_path / "tls" / f"{entry.name}.crt"
        assert local.tls_key == tmp_path / "keys" / f"{entry.name}.tls.key"
        key_files.append(local.tls_key)
        identity = config.tls_identity(entry.name)
        assert identity is not None and identity.name == entry.name
        cert = x509.load_pem_x509_certificate(identity.cert_pem)
        cert.verify_directly_issued_by(ca)
        assert certificate_name(cert) == entry.name
    for path in key_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert not list((tmp_path / "tls").glob("*.key")), "no private key next to the certificates"
    assert not list(tmp_path.rglob("*.tmp"))


def test_identity_never_shows_its_key_in_repr(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory"))
    identity = config.tls_identity("ci")
    assert identity is not None
    assert identity.key_pem not in repr(identity).encode() and "PRIVATE" not in repr(identity)


def test_world_readable_tls_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory"))
    key = tmp_path / "keys" / "da-1.tls.key"
    os.chmod(key, 0o644)
    with pytest.raises(DispersError) as info:
        config.tls_identity("da-1")
    assert info.value.code is ErrorCode.CONFIG
    assert str(key) in info.value.message and "readable by others" in info.value.message
    assert b"PRIVATE" not in info.value.message.encode()
    os.chmod(key, 0o640)  # group-readable is refused too
    with pytest.raises(DispersError):
        config.tls_identity("da-1")


def test_load_refuses_mixed_up_files_naming_them(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory"))
    ca_path = tmp_path / "tls" / "ca.crt"
    keys, tls = tmp_path / "keys", tmp_path / "tls"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cert": tls / "ci.crt", "key": keys / "da-1.tls.key"}, "is not issued to 'da-1'"),
        ({"cert": tls / "da-1.crt", "key": keys / "ci.tls.key"}, "does not match"),
        ({"cert": tls / "missing.crt", "key": keys / "da-1.tls.key"}, "does not exist"),
        ({"cert": tls / "da-1.crt", "key": keys / "missing.tls.key"}, "does not exist"),
        ({"cert": keys / "da-1.key", "key": keys / "da-1.tls.key"}, "is not a PEM certificate"),
    ]
    for paths, expected in cases:
        with pytest.raises(DispersError) as info:
            TlsIdentity.load("da-1", ca=ca_path, **paths)
        assert info.value.code is ErrorCode.CONFIG
        assert expected in info.value.message, info.value.message
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(ca[0])
    with pytest.raises(DispersError) as info:
        TlsIdentity.load("da-1", cert=tls / "da-1.crt", key=keys / "da-1.tls.key", ca=other_ca)
    assert "is not issued by the CA" in info.value.message
    assert config.tls_identity("da-1") is not None


def test_insecure_layout_writes_no_tls_material(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, ClusterLayout(backend="memory", insecure=True))
    assert config.insecure and config.settings.ca_cert is None
    assert config.tls_identity("conductor") is None
    assert not (tmp_path / "tls").exists()
    assert not list((tmp_path / "keys").glob("*.tls.key"))
    assert "insecure = true" in (tmp_path / "cluster.toml").read_text()


# --- config keys --------------------------------------------------------------------------------


def _rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("value", ['"yes"', "1", "0"])
def test_insecure_must_be_a_bool(tmp_path: Path, value: str) -> None:
    write_cluster(tmp_path, ClusterLayout(backend="memory"))
    path = tmp_path / "cluster.toml"
    _rewrite(path, "[cluster]\n", f"[cluster]\ninsecure = {value}\n")
    with pytest.raises(DispersError) as info:
        load_config(path)
    assert info.value.code is ErrorCode.CONFIG
    assert "cluster.insecure" in info.value.message


def test_tls_paths_must_be_strings(tmp_path: Path) -> None:
    write_cluster(tmp_path, ClusterLayout(backend="memory"))
    path = tmp_path / "cluster.toml"
    text = path.read_text()
    path.write_text(text.replace('ca_cert = "tls/ca.crt"', "ca_cert = 3"))
    with pytest.raises(DispersError) as info:
        load_config(path)
    assert "cluster.ca_cert" in info.value.message
    path.write_text(text.replace('tls_cert = "tls/ci.crt"', "tls_cert = true"))
    with pytest.raises(DispersError) as info:
        load_config(path)
    assert ".tls_cert must be a path string" in info.value.message


def test_missing_tls_cert_or_key_is_named(tmp_path: Path) -> None:
    write_cluster(tmp_path, ClusterLayout(backend="memory"))
    path = tmp_path / "cluster.toml"
    text = path.read_text()
    path.write_text(text.replace('tls_cert = "tls/da-1.crt"\n', ""))
    config = load_config(path)  # loads: only the process serving da-1 needs its certificate
    with pytest.raises(DispersError) as info:
        config.tls_identity("da-1")
    assert info.value.code is ErrorCode.CONFIG
    assert info.value.message == "actor 'da-1' has no tls_cert (needed unless [cluster] insecure = true)"
    assert config.tls_identity("da-2") is not None
    path.write_text(text.replace('tls_key = "keys/da-1.tls.key"\n', ""))
    with pytest.raises(DispersError) as info:
        load_config(path).tls_identity("da-1")
    assert "actor 'da-1' has no tls_key" in info.value.message


def test_missing_ca_cert_is_named_unless_insecure(tmp_path: Path) -> None:
    write_cluster(tmp_path, ClusterLayout(backend="memory"))
    path = tmp_path / "cluster.toml"
    _rewrite(path, 'ca_cert = "tls/ca.crt"\n', "")
    config = load_config(path)
    with pytest.raises(DispersError) as info:
        config.tls_identity("conductor")
    assert info.value.code is ErrorCode.CONFIG
    assert "ca_cert" in info.value.message and "insecure = true" in info.value.message
    _rewrite(path, "[cluster]\n", "[cluster]\ninsecure = true\n")
    assert load_config(path).tls_identity("conductor") is None


def test_tls_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    write_cluster(tmp_path / "c", ClusterLayout(backend="memory"))
    config = load_config(tmp_path / "c" / "cluster.toml")
    assert config.settings.ca_cert == tmp_path / "c" / "tls" / "ca.crt"
    assert config.local_for("t").tls_key == tmp_path / "c" / "keys" / "t.tls.key"
