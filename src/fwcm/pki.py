"""Certificate chains for manifest signers: operator root CA → tenant CA → signer (sans-IO).

A manifest's COSE signature may carry its signer's certificate chain in the ``x5chain`` header (leaf
first).  With a chain, trust no longer means "this exact public key was uploaded": it means "the signer
was certified by a tenant CA that the operator's root certified".  The root's ``path_length=1`` and the
tenant CA's ``path_length=0`` make the hierarchy fixed at three levels, so a tenant can certify signers
but never another CA, and the tenant a signature belongs to is read from the tenant CA (subject ``O``),
not from anything the signer controls.

A signer certificate may carry a list of hardware IDs (:data:`HARDWARE_IDS_OID`): it is then a
*developer build* signer, whose manifests are only meant for those devices.  Enforcing that is up to
the caller (:attr:`SignerInfo.hardware_ids` is ``None`` for production signers).

Every refusal raises :class:`ChainError` with a short ``reason`` (see :data:`REASONS`) usable as a
metric label.  Nothing here reads files or clocks beyond ``datetime.now`` when no time is given.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fwcm import der
from fwcm.manifest import (
    Envelope,
    ManifestError,
    PrivateKey,
    PublicKey,
    generate_private_key,
    key_id,
    verify_envelope,
)
from fwcm.manifest.cose import HeldKey
from fwcm.manifest.keys import public_of
from fwcm.protocol import NAME_RE

HARDWARE_IDS_OID = x509.ObjectIdentifier("2.25.273917030899795262117396166579372976461")
"""Developer-build signer extension (non-critical).  OID from the 2.25 arc (ITU-T X.667: a UUID as an
integer needs no registration); generated once from uuid4 ce12804f-378f-4119-bff7-283036dc694d.
Value: DER ``SEQUENCE OF UTF8String``, one hardware ID each, in the order given at issue time."""

MAX_CHAIN = 3
"""At most signer, tenant CA and (optionally) the root itself."""
MAX_HARDWARE_ID_LEN = 128
"""Same bound as a device's ``hardware_id`` column."""
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this much before issue time, so a verifier whose clock lags a bit accepts them."""

REASONS = (
    "no_chain",
    "malformed",
    "too_long",
    "unknown_root",
    "issuer_mismatch",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "not_ca",
    "key_usage",
    "path_length",
    "leaf_is_ca",
    "eku",
    "unknown_critical",
    "no_tenant_ca",
    "unsupported_key",
)
"""Every ``ChainError.reason`` this module produces (pre-register them as metric labels)."""

_HANDLED_EXTENSIONS = {
    x509.BasicConstraints.oid,
    x509.KeyUsage.oid,
    x509.ExtendedKeyUsage.oid,
    x509.SubjectKeyIdentifier.oid,
    x509.AuthorityKeyIdentifier.oid,
    HARDWARE_IDS_OID,
}
"""Extensions validation understands; any other extension marked critical makes a certificate unusable."""

_E = TypeVar("_E", bound=x509.ExtensionType)


class ChainError(ValueError):
    """A certificate chain that cannot be trusted; ``reason`` is a short metric label from REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SignerInfo:
    """Who signed, as certified by a validated chain."""

    public_key: PublicKey
    key_id: bytes
    """:func:`fwcm.manifest.key_id` of the signer key (the COSE kid it signs with)."""
    tenant: str
    """Tenant slug from the tenant CA that certified the signer."""
    name: str
    """The signer certificate's common name."""
    hardware_ids: tuple[str, ...] | None
    """Devices a developer-build signer may target; ``None`` for a production signer."""
    not_after: dt.datetime
    serial: int
    leaf_der: bytes


# --- helpers ---------------------------------------------------------------------------------------


def load_cert(pem_or_der: bytes) -> x509.Certificate:
    """Parse one certificate, PEM or DER (the first one of a PEM bundle); ChainError "malformed" if not."""
    try:
        if pem_or_der.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(pem_or_der)
        return x509.load_der_x509_certificate(pem_or_der)
    except ValueError as exc:
        raise ChainError("malformed", f"not a certificate: {exc}") from None


def load_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (or one DER certificate), in file order."""
    if not data.lstrip().startswith(b"-----BEGIN"):
        return [load_cert(data)]
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ChainError("malformed", f"not a PEM certificate bundle: {exc}") from None
    if not certs:
        raise ChainError("malformed", "no certificate in the PEM bundle")
    return certs


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _ext(cert: x509.Certificate, cls: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def describe(cert: x509.Certificate) -> str:
    """A certificate's CN (or full subject when it has none), for messages."""
    return _cn(cert.subject) or cert.subject.rfc4514_string() or "(empty subject)"


def tenant_of(ca_cert: x509.Certificate) -> str:
    """The tenant slug of a tenant CA (its subject ``O``); ChainError "no_tenant_ca" when it has none."""
    attrs = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    value = str(attrs[0].value) if len(attrs) == 1 else ""
    if not NAME_RE.match(value):
        raise ChainError("no_tenant_ca", f"{describe(ca_cert)} carries no valid tenant slug (subject O)")
    return value


def hardware_ids_of(cert: x509.Certificate) -> tuple[str, ...] | None:
    """Hardware IDs of a developer-build signer, ``None`` for a production one; ChainError if garbled."""
    try:
        ext = cert.extensions.get_extension_for_oid(HARDWARE_IDS_OID).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(ext, x509.UnrecognizedExtension):  # pragma: no cover - cryptography never parses it
        raise ChainError("malformed", "unexpected hardware-ids extension type")
    return decode_hardware_ids(ext.value)


def decode_hardware_ids(value: bytes) -> tuple[str, ...]:
    """The hardware-ids extension value; ChainError "malformed" when it is not strict DER."""
    try:
        return der.decode_utf8_sequence(value)
    except der.DerError as exc:
        raise ChainError("malformed", f"hardware-ids: {exc}") from None


# --- issuing ---------------------------------------------------------------------------------------


def _utc(when: dt.datetime | None) -> dt.datetime:
    """``when`` as an aware UTC datetime (naive means UTC); now when ``None``."""
    if when is None:
        return dt.datetime.now(dt.UTC)
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _spki(key: CertificatePublicKeyTypes | PrivateKey | HeldKey) -> bytes:
    pub = key.public_key() if isinstance(key, PrivateKey | HeldKey) else key
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _sign_hash(key: PrivateKey) -> hashes.SHA256 | None:
    """SHA-256 for ECDSA; Ed25519 hashes internally and takes no algorithm."""
    return hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    days: int,
    now: dt.datetime | None,
    issuer_cert: x509.Certificate | None,
) -> x509.CertificateBuilder:
    """Common fields; validity is clamped to the issuer's so no certificate outlives its issuer."""
    if days < 1:
        raise ValueError("days must be at least 1")
    start = _utc(now)
    end = start + dt.timedelta(days=days)
    if issuer_cert is not None:
        end = min(end, issuer_cert.not_valid_after_utc)
        if end <= start:
            raise ValueError(f"issuer {describe(issuer_cert)} has expired")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(
    *, digital_signature: bool = False, cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_issuer_key(issuer_key: PrivateKey | HeldKey, issuer_cert: x509.Certificate) -> None:
    """Refuse to issue with a key that is not the issuer certificate's: the result would never verify."""
    if _spki(issuer_key) != _spki(issuer_cert.public_key()):
        raise ValueError(f"the key does not belong to {describe(issuer_cert)}")


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = _ext(issuer_cert, x509.SubjectKeyIdentifier)
    if ski is not None:
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())  # type: ignore[arg-type]


def make_root(
    key: PrivateKey, name: str, *, days: int = 3650, now: dt.datetime | None = None
) -> x509.Certificate:
    """The operator's self-signed root: may certify tenant CAs, which may only certify signers."""
    pub = public_of(key)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        _builder(subject, subject, pub, days, now, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_key_usage(cert_sign=True, crl_sign=True), critical=True)
    )
    return builder.sign(key, _sign_hash(key))


def make_tenant_ca(
    root_key: PrivateKey,
    root_cert: x509.Certificate,
    ca_public_key: PublicKey,
    tenant: str,
    *,
    days: int = 1825,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A tenant's CA: subject CN "fwcm tenant CA <tenant>", O <tenant> (the machine-readable slug)."""
    if not NAME_RE.match(tenant):
        raise ValueError(f"invalid tenant slug {tenant!r}")
    _check_issuer_key(root_key, root_cert)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"fwcm tenant CA {tenant}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, tenant),
        ]
    )
    builder = (
        _builder(subject, root_cert.subject, public_of(ca_public_key), days, now, root_cert)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(_aki(root_cert), critical=False)
    )
    return builder.sign(root_key, _sign_hash(root_key))


def _check_hardware_ids(hardware_ids: Sequence[str]) -> list[str]:
    ids = list(hardware_ids)
    if not ids:
        raise ValueError("a developer-build signer needs at least one hardware ID")
    for hw in ids:
        if not isinstance(hw, str) or not hw or len(hw) > MAX_HARDWARE_ID_LEN:
            raise ValueError(f"hardware IDs are 1-{MAX_HARDWARE_ID_LEN} character strings, not {hw!r}")
    return ids


def make_signer(
    ca_key: PrivateKey | HeldKey,
    ca_cert: x509.Certificate,
    signer_public_key: PublicKey,
    name: str,
    *,
    hardware_ids: list[str] | None = None,
    days: int = 730,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A manifest signer certificate; with ``hardware_ids`` a developer-build signer for those devices.

    ``ca_key`` may be held in a key store or HSM (:class:`fwcm.manifest.cose.HeldKey`)."""
    if not name:
        raise ValueError("a signer needs a name")
    _check_issuer_key(ca_key, ca_cert)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        _builder(subject, ca_cert.subject, public_of(signer_public_key), days, now, ca_cert)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if hardware_ids is not None:
        value = der.encode_utf8_sequence(_check_hardware_ids(hardware_ids))
        builder = builder.add_extension(x509.UnrecognizedExtension(HARDWARE_IDS_OID, value), critical=False)
    if isinstance(ca_key, HeldKey):
        cert = sign_with(builder, ca_key)
        cert.verify_directly_issued_by(ca_cert)  # a token that signed with another key fails here
        return cert
    return builder.sign(ca_key, _sign_hash(ca_key))


def sign_with(builder: x509.CertificateBuilder, key: HeldKey) -> x509.Certificate:
    """Sign a certificate with a key that cannot be read (an HSM's).

    ``cryptography`` signs only with keys it holds, so the certificate is first signed with a
    throw-away key of the same type (which fixes the signature algorithm inside the TBS part), then
    the TBS bytes are signed by ``key`` and the certificate is reassembled around that signature.
    """
    public = public_of(key.public_key())
    ed = isinstance(public, ed25519.Ed25519PublicKey)
    scratch: PrivateKey = generate_private_key("eddsa" if ed else "es256")
    draft = builder.sign(scratch, _sign_hash(scratch))
    _, body, _ = der.read_tlv(cert_der(draft), 0)  # Certificate ::= SEQUENCE { tbs, algorithm, signature }
    _, _, alg_at = der.read_tlv(body, 0)
    _, _, alg_end = der.read_tlv(body, alg_at)
    tbs, alg_id = body[:alg_at], body[alg_at:alg_end]
    raw = key.cose_sign(tbs)
    if ed:
        signature = raw
    else:
        half = len(raw) // 2
        r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        signature = encode_dss_signature(r, s)
    signed = der.tlv(0x30, tbs + alg_id + der.tlv(0x03, b"\x00" + signature))
    return x509.load_der_x509_certificate(signed)


# --- validation ------------------------------------------------------------------------------------


def _parse(chain: Sequence[bytes]) -> list[x509.Certificate]:
    """DER certificates with their extensions parsed up front, so later checks never meet garbage."""
    certs = []
    for i, item in enumerate(chain):
        try:
            cert = x509.load_der_x509_certificate(bytes(item))
            _ = cert.extensions  # lazily parsed: duplicate or garbled extensions raise here
        except (ValueError, TypeError) as exc:
            raise ChainError("malformed", f"certificate {i} of the chain is not valid DER: {exc}") from None
        certs.append(cert)
    return certs


def _check_validity(cert: x509.Certificate, at: dt.datetime) -> None:
    if at < cert.not_valid_before_utc:
        raise ChainError("not_yet_valid", f"{describe(cert)} is valid from {cert.not_valid_before_utc}")
    if at > cert.not_valid_after_utc:
        raise ChainError("expired", f"{describe(cert)} expired {cert.not_valid_after_utc}")


def _check_critical(cert: x509.Certificate) -> None:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _HANDLED_EXTENSIONS:
            raise ChainError("unknown_critical", f"{describe(cert)} has unknown critical extension {ext.oid}")


def _check_ca(cert: x509.Certificate, cas_below: int) -> None:
    """``cert`` issues the next certificate: it must be a CA allowed to sign certs this deep."""
    bc = _ext(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        raise ChainError("not_ca", f"{describe(cert)} is not a CA")
    ku = _ext(cert, x509.KeyUsage)
    if ku is None or not ku.key_cert_sign:
        raise ChainError("key_usage", f"{describe(cert)} may not sign certificates (keyCertSign)")
    if bc.path_length is not None and cas_below > bc.path_length:
        raise ChainError(
            "path_length",
            f"{describe(cert)} may have {bc.path_length} CA(s) below it, the chain has {cas_below}",
        )


def _is_ca(cert: x509.Certificate) -> bool:
    bc = _ext(cert, x509.BasicConstraints)
    return bc is not None and bc.ca


def _check_link(issuer: x509.Certificate, cert: x509.Certificate, *, anchor: bool) -> None:
    """``cert`` names ``issuer``, its key id matches and ``issuer``'s key signed it."""
    mismatch = "unknown_root" if anchor else "issuer_mismatch"
    if cert.issuer != issuer.subject:
        named = cert.issuer.rfc4514_string()
        raise ChainError(mismatch, f"{describe(cert)} is issued by {named!r}, not {describe(issuer)}")
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    ski = _ext(issuer, x509.SubjectKeyIdentifier)
    if (
        aki is not None
        and aki.key_identifier is not None
        and ski is not None
        and aki.key_identifier != ski.digest
    ):
        raise ChainError(mismatch, f"{describe(cert)} was issued by another key than {describe(issuer)}'s")
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        detail = f": {exc}" if str(exc) else ""
        raise ChainError(
            "bad_signature", f"{describe(cert)} is not signed by {describe(issuer)}{detail}"
        ) from None


def _check_leaf(leaf: x509.Certificate) -> None:
    if _is_ca(leaf):
        raise ChainError("leaf_is_ca", f"{describe(leaf)} is a CA, not a signer")
    ku = _ext(leaf, x509.KeyUsage)
    if ku is None or not ku.digital_signature:
        raise ChainError("key_usage", f"{describe(leaf)} may not sign (digitalSignature)")
    eku = _ext(leaf, x509.ExtendedKeyUsage)
    if eku is None or ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise ChainError("eku", f"{describe(leaf)} is not a code-signing certificate")


def _below_root(certs: list[x509.Certificate], root: x509.Certificate) -> list[x509.Certificate]:
    """The chain without a trailing copy of the root; a trailing different self-issued cert is refused."""
    last = certs[-1]
    if cert_der(last) == cert_der(root):
        return certs[:-1]
    if last.subject == last.issuer and len(certs) > 1:
        raise ChainError("unknown_root", f"the chain ends in {describe(last)}, not the trusted root")
    return certs


def validate_chain(
    chain: Sequence[bytes], root: x509.Certificate, *, at: dt.datetime | None = None
) -> SignerInfo:
    """Validate an x5chain (leaf first: signer, tenant CA[, root]) against ``root`` at time ``at``."""
    if not chain:
        raise ChainError("no_chain", "no certificate chain")
    if len(chain) > MAX_CHAIN:
        raise ChainError("too_long", f"chain of {len(chain)} certificates (at most {MAX_CHAIN})")
    when = _utc(at)
    below = _below_root(_parse(chain), root)
    if not below:
        raise ChainError("leaf_is_ca", "the chain is only the root: it certifies no signer")
    if len(below) > MAX_CHAIN - 1:
        raise ChainError("too_long", f"{len(below)} certificates below the root (at most {MAX_CHAIN - 1})")
    path = [root, *reversed(below)]  # top-down: root, tenant CA, signer
    _check_critical(root)
    _check_validity(root, when)
    for depth in range(1, len(path)):
        issuer, cert = path[depth - 1], path[depth]
        _check_ca(issuer, sum(1 for c in path[depth:] if _is_ca(c)))
        _check_link(issuer, cert, anchor=depth == 1)  # trust before anything the cert claims
        _check_critical(cert)
        _check_validity(cert, when)
    leaf = path[-1]
    _check_leaf(leaf)
    if len(below) < 2:
        raise ChainError(
            "no_tenant_ca", f"{describe(leaf)} is certified by the root directly, not a tenant CA"
        )
    return _signer_info(leaf, tenant_of(below[1]))


def check_tenant_ca(ca: x509.Certificate, root: x509.Certificate, *, at: dt.datetime | None = None) -> str:
    """A tenant CA as the operator issues it: signed by ``root``, a CA with path length 0 (it may
    only issue signers), currently valid; returns its tenant slug."""
    when = _utc(at)
    _check_critical(root)
    _check_validity(root, when)
    _check_ca(root, 1)
    _check_link(root, ca, anchor=True)
    _check_critical(ca)
    _check_validity(ca, when)
    _check_ca(ca, 0)
    bc = _ext(ca, x509.BasicConstraints)
    if bc is None or bc.path_length != 0:
        raise ChainError("path_length", f"{describe(ca)} must have path length 0 (it issues signers only)")
    return tenant_of(ca)


def _signer_info(leaf: x509.Certificate, tenant: str) -> SignerInfo:
    try:
        pub = public_of(leaf.public_key())  # type: ignore[arg-type]
    except (ManifestError, UnsupportedAlgorithm, ValueError) as exc:
        raise ChainError("unsupported_key", f"{describe(leaf)}: {exc}") from None
    name = _cn(leaf.subject)
    if not name:
        raise ChainError("malformed", "the signer certificate has no common name")
    return SignerInfo(
        public_key=pub,
        key_id=key_id(pub),
        tenant=tenant,
        name=name,
        hardware_ids=hardware_ids_of(leaf),
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
        leaf_der=cert_der(leaf),
    )


def verify_manifest(env: Envelope, root: x509.Certificate, *, at: dt.datetime | None = None) -> SignerInfo:
    """Trust ``env`` through its x5chain: validate the chain, then the COSE signature with the leaf key.

    Chain problems raise :class:`ChainError`; a signature that does not verify with the certified key
    raises :class:`fwcm.manifest.SignatureError` unchanged (callers report the two differently).
    """
    chains = [sig.x5chain for sig in env.signatures if sig.x5chain]
    if not chains:
        raise ChainError("no_chain", "the manifest carries no certificate chain (x5chain)")
    first_error: ChainError | None = None
    for chain in chains:
        try:
            info = validate_chain(chain, root, at=at)
        except ChainError as exc:
            first_error = first_error or exc
            continue
        verify_envelope(env, [info.public_key])
        return info
    assert first_error is not None
    raise first_error
