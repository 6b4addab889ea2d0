"""Signing keys: generation, PEM import/export and the key id used as COSE ``kid``.

Only two key types exist in the profile: P-256 (ES256) and Ed25519 (EdDSA).  Anything else is refused at
load time, so the rest of the codec never meets a key it cannot use.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from .errors import ManifestError

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

ALGS = ("es256", "eddsa")


def generate_private_key(alg: str = "es256") -> PrivateKey:
    """A fresh key for ``alg`` ("es256": P-256, "eddsa": Ed25519)."""
    if alg == "es256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "eddsa":
        return ed25519.Ed25519PrivateKey.generate()
    raise ManifestError(f"unsupported key algorithm {alg!r} (use one of: {', '.join(ALGS)})")


def _check_private(key: object) -> PrivateKey:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ManifestError("unsupported private key type (need a P-256 or Ed25519 key)")


def _check_public(key: object) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ManifestError("unsupported public key type (need a P-256 or Ed25519 key)")


def public_of(key: PrivateKey | PublicKey) -> PublicKey:
    """The public half of ``key`` (``key`` itself when it is already public)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        return _check_public(key.public_key())
    return _check_public(key)


def private_key_pem(key: PrivateKey) -> bytes:
    """PEM PKCS#8, unencrypted: the key file format of ``fwcm keys generate``."""
    return _check_private(key).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: PrivateKey | PublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo of ``key`` (private or public)."""
    return public_of(key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(pem: bytes) -> PrivateKey:
    """Parse an unencrypted PEM private key; anything unusable raises :class:`ManifestError`."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ManifestError(f"not a usable PEM private key: {exc}") from None
    return _check_private(key)


def load_public_key(pem: bytes) -> PublicKey:
    """Parse a PEM SubjectPublicKeyInfo; anything unusable raises :class:`ManifestError`."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ManifestError(f"not a usable PEM public key: {exc}") from None
    return _check_public(key)


def key_id(public_key: PrivateKey | PublicKey) -> bytes:
    """SHA-256 of the SPKI DER (32 bytes): stable across PEM formatting, carried as COSE kid (label 4)."""
    der = public_of(public_key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def key_alg(key: PrivateKey | PublicKey) -> str:
    """ "es256" or "eddsa", the signing algorithm a key is used with."""
    pub = public_of(key)
    return "eddsa" if isinstance(pub, ed25519.Ed25519PublicKey) else "es256"
