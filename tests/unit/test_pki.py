"""Signer certificate chains: issuing, validation (one test per refusal reason), manifests and the CLI."""

from __future__ import annotations

import datetime as dt
import json
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fwcm import der, pki
from fwcm.cli import keys, manifest
from fwcm.cli import pki as pki_cli
from fwcm.manifest import (
    ManifestInfo,
    PrivateKey,
    SignatureError,
    build_envelope,
    class_id_for,
    decode_envelope,
    generate_private_key,
    key_id,
    vendor_id_for_domain,
)

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
VENDOR = vendor_id_for_domain("example.com")


@dataclass
class Hierarchy:
    root_key: PrivateKey
    root: x509.Certificate
    ca_key: PrivateKey
    ca: x509.Certificate
    signer_key: PrivateKey
    signer: x509.Certificate

    @property
    def chain(self) -> list[bytes]:
        return [pki.cert_der(self.signer), pki.cert_der(self.ca)]


def hierarchy(
    alg: str = "es256", *, hardware_ids: list[str] | None = None, tenant: str = "acme"
) -> Hierarchy:
    root_key, ca_key, signer_key = (generate_private_key(alg) for _ in range(3))
    root = pki.make_root(root_key, "fwcm test root", now=NOW)
    ca = pki.make_tenant_ca(root_key, root, ca_key.public_key(), tenant, now=NOW)
    signer = pki.make_signer(ca_key, ca, signer_key.public_key(), "ci", hardware_ids=hardware_ids, now=NOW)
    return Hierarchy(root_key, root, ca_key, ca, signer_key, signer)


@pytest.fixture(scope="module")
def h() -> Hierarchy:
    return hierarchy()


def refused(reason: str, chain: list[bytes], root: x509.Certificate, at: dt.datetime = NOW) -> pki.ChainError:
    with pytest.raises(pki.ChainError) as info:
        pki.validate_chain(chain, root, at=at)
    assert info.value.reason == reason, str(info.value)
    assert reason in pki.REASONS
    return info.value


def ku(*, sign: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(sign, False, False, False, False, cert_sign, False, False, False)


def custom_cert(
    issuer_key: PrivateKey,
    issuer: x509.Certificate,
    subject_key: PrivateKey,
    cn: str,
    extensions: list[tuple[x509.ExtensionType, bool]],
    *,
    org: str | None = None,
) -> x509.Certificate:
    """A certificate with exactly the given extensions, for chains make_* would never produce."""
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(issuer.subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    algorithm = hashes.SHA256() if isinstance(issuer_key, ec.EllipticCurvePrivateKey) else None
    return builder.sign(issuer_key, algorithm)


# --- issuing and the happy path --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["es256", "eddsa"])
def test_valid_chain_yields_signer_info(alg: str) -> None:
    hy = hierarchy(alg)
    info = pki.validate_chain(hy.chain, hy.root, at=NOW)
    assert info.tenant == "acme"
    assert info.name == "ci"
    assert info.hardware_ids is None
    assert info.key_id == key_id(hy.signer_key)
    assert key_id(info.public_key) == key_id(hy.signer_key)
    assert info.serial == hy.signer.serial_number
    assert info.leaf_der == pki.cert_der(hy.signer)
    assert info.not_after == NOW + dt.timedelta(days=730)


def test_chain_may_end_with_the_root_itself(h: Hierarchy) -> None:
    info = pki.validate_chain([*h.chain, pki.cert_der(h.root)], h.root, at=NOW)
    assert info.tenant == "acme"


def test_issued_certificates_have_the_profile_extensions(h: Hierarchy) -> None:
    def ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType]:
        return cert.extensions.get_extension_for_class(cls)

    root_bc = ext(h.root, x509.BasicConstraints)
    assert root_bc.critical and root_bc.value == x509.BasicConstraints(ca=True, path_length=1)
    assert ext(h.root, x509.KeyUsage).critical
    assert ext(h.ca, x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=0)
    assert h.ca.subject.rfc4514_string() == "O=acme,CN=fwcm tenant CA acme"
    assert pki.tenant_of(h.ca) == "acme"
    leaf_bc = ext(h.signer, x509.BasicConstraints)
    assert leaf_bc.critical and not leaf_bc.value.ca  # type: ignore[attr-defined]
    assert ExtendedKeyUsageOID.CODE_SIGNING in ext(h.signer, x509.ExtendedKeyUsage).value  # type: ignore[operator]
    assert h.signer.not_valid_before_utc == NOW - pki.CLOCK_SKEW


def test_child_never_outlives_its_issuer(h: Hierarchy) -> None:
    late = h.ca.not_valid_after_utc - dt.timedelta(days=10)
    cert = pki.make_signer(h.ca_key, h.ca, generate_private_key().public_key(), "late", now=late)
    assert cert.not_valid_after_utc == h.ca.not_valid_after_utc
    with pytest.raises(ValueError, match="expired"):
        pki.make_signer(h.ca_key, h.ca, h.signer_key.public_key(), "x", now=late + dt.timedelta(days=20))


def test_issuing_with_a_key_that_is_not_the_issuers_is_refused(h: Hierarchy) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        pki.make_signer(h.root_key, h.ca, h.signer_key.public_key(), "x", now=NOW)
    with pytest.raises(ValueError, match="tenant slug"):
        pki.make_tenant_ca(h.root_key, h.root, h.ca_key.public_key(), "bad slug/", now=NOW)
    with pytest.raises(ValueError, match="hardware ID"):
        pki.make_signer(h.ca_key, h.ca, h.signer_key.public_key(), "x", hardware_ids=[], now=NOW)


def test_pem_and_der_helpers_round_trip(h: Hierarchy) -> None:
    assert pki.load_cert(pki.cert_pem(h.signer)) == h.signer
    assert pki.load_cert(pki.cert_der(h.signer)) == h.signer
    with pytest.raises(pki.ChainError) as info:
        pki.load_cert(b"not a certificate")
    assert info.value.reason == "malformed"


# --- developer-build hardware IDs ------------------------------------------------------------------


def test_dev_build_hardware_ids_round_trip(h: Hierarchy) -> None:
    ids = ["dev-0001", "dev-0002", "ünïcødé-" + "x" * 120]
    cert = pki.make_signer(h.ca_key, h.ca, h.signer_key.public_key(), "dev", hardware_ids=ids, now=NOW)
    assert pki.hardware_ids_of(cert) == tuple(ids)
    assert not cert.extensions.get_extension_for_oid(pki.HARDWARE_IDS_OID).critical
    info = pki.validate_chain([pki.cert_der(cert), pki.cert_der(h.ca)], h.root, at=NOW)
    assert info.hardware_ids == tuple(ids)
    assert pki.hardware_ids_of(h.signer) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=pki.MAX_HARDWARE_ID_LEN), min_size=1, max_size=40))
def test_hardware_id_encoding_round_trips(ids: list[str]) -> None:
    assert pki.decode_hardware_ids(der.encode_utf8_sequence(ids)) == tuple(ids)


@pytest.mark.parametrize(
    "value",
    [b"", b"\x30", b"\x31\x00", b"\x30\x02\x13\x00", b"\x30\x03\x0c\x02a", b"\x30\x81\x01\x00",
     b"\x30\x02\x0c\x00\x00", b"\x30\x02\x0c\x01\xff", b"\x30\x84\x00\x00\x00\x00"],
)  # fmt: skip
def test_garbled_hardware_ids_are_malformed(value: bytes) -> None:
    with pytest.raises(pki.ChainError) as info:
        pki.decode_hardware_ids(value)
    assert info.value.reason == "malformed"


# --- refusals --------------------------------------------------------------------------------------


def test_expired_signer(h: Hierarchy) -> None:
    refused("expired", h.chain, h.root, at=NOW + dt.timedelta(days=731))


def test_not_yet_valid(h: Hierarchy) -> None:
    refused("not_yet_valid", h.chain, h.root, at=NOW - dt.timedelta(hours=1))


def test_naive_time_means_utc(h: Hierarchy) -> None:
    pki.validate_chain(h.chain, h.root, at=NOW.replace(tzinfo=None))


def test_leaf_signed_by_another_ca_of_the_same_name(h: Hierarchy) -> None:
    other = hierarchy(tenant="acme")  # same subject names, different keys
    refused("issuer_mismatch", [pki.cert_der(other.signer), pki.cert_der(h.ca)], h.root)


def test_leaf_signed_by_a_ca_of_another_tenant(h: Hierarchy) -> None:
    other = hierarchy(tenant="globex")
    error = refused("issuer_mismatch", [pki.cert_der(other.signer), pki.cert_der(h.ca)], h.root)
    assert "globex" in str(error)


def test_bad_signature_with_matching_names_and_key_ids(h: Hierarchy) -> None:
    # no AKI: only the signature itself can tell that another key signed
    forger = generate_private_key()
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (ku(sign=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
    ]
    forged = custom_cert(forger, h.ca, h.signer_key, "ci", extensions)
    refused("bad_signature", [pki.cert_der(forged), pki.cert_der(h.ca)], h.root)


def test_tenant_ca_issuing_a_sub_ca(h: Hierarchy) -> None:
    sub_key = generate_private_key()
    sub = pki.make_tenant_ca(h.ca_key, h.ca, sub_key.public_key(), "acme-sub", now=NOW)  # issued by the CA
    refused("path_length", [pki.cert_der(sub), pki.cert_der(h.ca)], h.root)
    leaf = pki.make_signer(sub_key, sub, h.signer_key.public_key(), "deep", now=NOW)
    refused("too_long", [pki.cert_der(leaf), pki.cert_der(sub), pki.cert_der(h.ca)], h.root)


def test_signer_without_code_signing(h: Hierarchy) -> None:
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (ku(sign=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    ]
    cert = custom_cert(h.ca_key, h.ca, h.signer_key, "tls", extensions)
    refused("eku", [pki.cert_der(cert), pki.cert_der(h.ca)], h.root)
    cert = custom_cert(h.ca_key, h.ca, h.signer_key, "no-eku", extensions[:2])
    refused("eku", [pki.cert_der(cert), pki.cert_der(h.ca)], h.root)


def test_signer_without_digital_signature(h: Hierarchy) -> None:
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.KeyUsage(False, False, True, False, False, False, False, False, False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
    ]
    cert = custom_cert(h.ca_key, h.ca, h.signer_key, "enc", extensions)
    refused("key_usage", [pki.cert_der(cert), pki.cert_der(h.ca)], h.root)


def test_root_swapped_for_another_root(h: Hierarchy) -> None:
    other = hierarchy()  # same root name, other key
    refused("unknown_root", h.chain, other.root)
    stranger = pki.make_root(generate_private_key(), "someone else's root", now=NOW)
    refused("unknown_root", h.chain, stranger)
    refused("unknown_root", [*h.chain, pki.cert_der(other.root)], h.root)


@pytest.mark.parametrize("garbage", [b"", b"\x30\x03\x02\x01\x01", b"garbage", bytes(200)])
def test_garbage_der(h: Hierarchy, garbage: bytes) -> None:
    refused("malformed", [garbage, pki.cert_der(h.ca)], h.root)


def test_chain_too_long(h: Hierarchy) -> None:
    refused("too_long", [*h.chain, pki.cert_der(h.root), pki.cert_der(h.root)], h.root)


def test_leaf_is_a_ca(h: Hierarchy) -> None:
    refused("leaf_is_ca", [pki.cert_der(h.ca)], h.root)
    refused("leaf_is_ca", [pki.cert_der(h.root)], h.root)


def test_intermediate_that_is_not_a_ca(h: Hierarchy) -> None:
    # a signer certificate used as if it were a CA: the root certified it, so only "not a CA" is wrong
    fake_key = generate_private_key()
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (ku(sign=True, cert_sign=True), True),
    ]
    fake_ca = custom_cert(h.root_key, h.root, fake_key, "fake CA", extensions, org="acme")
    leaf = pki.make_signer(fake_key, fake_ca, h.signer_key.public_key(), "ci", now=NOW)
    refused("not_ca", [pki.cert_der(leaf), pki.cert_der(fake_ca)], h.root)


def test_ca_without_key_cert_sign(h: Hierarchy) -> None:
    ca_key = generate_private_key()
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (ku(sign=True), True),
    ]
    ca = custom_cert(h.root_key, h.root, ca_key, "weak CA", extensions, org="acme")
    leaf = pki.make_signer(ca_key, ca, h.signer_key.public_key(), "ci", now=NOW)
    refused("key_usage", [pki.cert_der(leaf), pki.cert_der(ca)], h.root)


def test_signer_directly_under_the_root(h: Hierarchy) -> None:
    leaf = pki.make_signer(h.root_key, h.root, h.signer_key.public_key(), "rootling", now=NOW)
    refused("no_tenant_ca", [pki.cert_der(leaf)], h.root)


def test_unknown_critical_extension(h: Hierarchy) -> None:
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (ku(sign=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
        (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"), True),
    ]
    cert = custom_cert(h.ca_key, h.ca, h.signer_key, "ci", extensions)
    refused("unknown_critical", [pki.cert_der(cert), pki.cert_der(h.ca)], h.root)


def test_empty_chain(h: Hierarchy) -> None:
    refused("no_chain", [], h.root)


# --- manifests -------------------------------------------------------------------------------------


def envelope(key: PrivateKey, chain: list[bytes] | None) -> bytes:
    info = ManifestInfo(
        sequence=3,
        vendor_id=VENDOR,
        class_id=class_id_for(VENDOR, "sensor"),
        image_digest=bytes(32),
        image_size=1024,
        uris=("coap://127.0.0.1/p/x",),
    )
    return build_envelope(info, key, x5chain=chain)


def test_verify_manifest_with_chain(h: Hierarchy) -> None:
    env = decode_envelope(envelope(h.signer_key, h.chain))
    info = pki.verify_manifest(env, h.root, at=NOW)
    assert (info.tenant, info.name, info.key_id) == ("acme", "ci", key_id(h.signer_key))


def test_verify_manifest_signed_by_another_key(h: Hierarchy) -> None:
    env = decode_envelope(envelope(generate_private_key(), h.chain))
    with pytest.raises(SignatureError):
        pki.verify_manifest(env, h.root, at=NOW)


def test_verify_manifest_without_chain(h: Hierarchy) -> None:
    env = decode_envelope(envelope(h.signer_key, None))
    with pytest.raises(pki.ChainError) as info:
        pki.verify_manifest(env, h.root, at=NOW)
    assert info.value.reason == "no_chain"


def test_verify_manifest_with_expired_chain(h: Hierarchy) -> None:
    env = decode_envelope(envelope(h.signer_key, h.chain))
    with pytest.raises(pki.ChainError) as info:
        pki.verify_manifest(env, h.root, at=NOW + dt.timedelta(days=3000))
    assert info.value.reason == "expired"


# --- CLI -------------------------------------------------------------------------------------------

cli = typer.Typer()
cli.add_typer(keys.app, name="keys")
cli.add_typer(pki_cli.app, name="pki")
cli.add_typer(manifest.app, name="manifest")
runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_root_tenant_signer_verify(tmp_path: Path) -> None:
    root_dir, ca_dir = tmp_path / "root", tmp_path / "acme"
    code, out, err = run("pki", "init-root", "--dir", root_dir, "--alg", "eddsa")
    assert code == 0, err
    assert stat.S_IMODE((root_dir / "root.key.pem").stat().st_mode) == 0o600
    code, out, err = run("pki", "tenant-ca", "--root-dir", root_dir, "--tenant", "acme", "--out-dir", ca_dir)
    assert code == 0, err
    assert stat.S_IMODE((ca_dir / "ca.key.pem").stat().st_mode) == 0o600
    code, out, err = run("keys", "generate", "ci", "--dir", tmp_path)
    assert code == 0, err
    chain = tmp_path / "ci.chain.pem"
    code, out, err = run(
        "pki", "signer", "--ca-dir", ca_dir, "--key", tmp_path / "ci.pub", "--name", "ci",
        "--hardware-id", "dev-1", "--hardware-id", "dev-2", "--out", chain, "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["certificate"]["hardware_ids"] == ["dev-1", "dev-2"]

    code, out, err = run("pki", "verify", "--root", root_dir / "root.pem", chain, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["tenant"] == "acme" and data["name"] == "ci" and data["hardware_ids"] == ["dev-1", "dev-2"]
    pub = (tmp_path / "ci.pub").read_bytes()
    assert data["key_id"] == key_id(pki_cli.load_public_key(pub)).hex()
    code, out, err = run("pki", "verify", "--root", root_dir / "root.pem", chain)
    assert code == 0 and out.startswith("valid: signer 'ci' of tenant acme"), err

    (tmp_path / "fw.bin").write_bytes(b"firmware" * 64)
    code, out, err = run(
        "manifest", "create", tmp_path / "fw.bin", "--key", tmp_path / "ci.key", "--uri", "coap://h/p",
        "--sequence", "1", "--vendor-domain", "example.com", "--model", "m", "--x5chain", chain,
        "--output", tmp_path / "m.suit",
    )  # fmt: skip
    assert code == 0, err
    env = decode_envelope((tmp_path / "m.suit").read_bytes())
    root_cert = pki.load_cert((root_dir / "root.pem").read_bytes())
    assert pki.verify_manifest(env, root_cert).hardware_ids == ("dev-1", "dev-2")

    code, out, err = run("pki", "show", chain, "--json")
    assert code == 0, err
    assert [c["ca"] for c in json.loads(out)["certificates"]] == [False, True]
    code, out, err = run("pki", "show", chain)
    assert code == 0 and "dev-1, dev-2" in out, err

    code, out, err = run("pki", "init-root", "--dir", tmp_path / "other", "--name", "other root")
    assert code == 0, err
    code, out, err = run("pki", "verify", "--root", tmp_path / "other" / "root.pem", chain, "--json")
    assert code == 1
    assert json.loads(out)["reason"] == "unknown_root"
    code, out, err = run("pki", "verify", "--root", ca_dir / "ca.pem", chain, "--json")
    assert code == 1 and json.loads(out)["reason"] == "no_tenant_ca"  # a tenant CA is no trust anchor
    code, out, err = run(
        "pki", "verify", "--root", root_dir / "root.pem", chain, "--at", "2000-01-01T00:00:00"
    )
    assert code == 1 and err.startswith("error: chain refused (not_yet_valid)"), err
    code, out, err = run("pki", "init-root", "--dir", root_dir)
    assert code == 1 and "exists" in err
    code, out, err = run("pki", "init-root", "--dir", tmp_path / "unnamed", "--name", "")
    assert code == 1 and err.startswith("error: "), err
