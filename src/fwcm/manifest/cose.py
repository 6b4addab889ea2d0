"""COSE_Sign1 primitives (RFC 9052/9053, pure): the to-be-signed structure, signing and checking a
raw signature by algorithm. The SUIT codec and attestation build their objects on these, so the
signature rules are written once.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils

from .keys import PrivateKey, PublicKey, public_of

COSE_SIGN1_TAG = 18
HDR_ALG = 1
HDR_CRIT = 2
HDR_KID = 4
HDR_X5CHAIN = 33
ALG_ES256 = -7
ALG_EDDSA = -8
ALG_ESP256 = -9
ALG_ED25519 = -19
ALG_NAMES = {ALG_ES256: "ES256", ALG_EDDSA: "EdDSA", ALG_ESP256: "ESP256", ALG_ED25519: "Ed25519"}
"""Every algorithm the codec verifies: the fully-specified ESP256 and Ed25519 (RFC 9864) and the
polymorphic ES256 and EdDSA they replace, which older envelopes carry."""
_EDDSA_ALGS = (ALG_EDDSA, ALG_ED25519)
_ECDSA_ALGS = (ALG_ES256, ALG_ESP256)


def alg_for(key: PrivateKey | PublicKey) -> int:
    """The polymorphic algorithm id of a key (EdDSA for Ed25519, ES256 for P-256); attestation
    evidence keeps these ids."""
    return ALG_EDDSA if isinstance(public_of(key), ed25519.Ed25519PublicKey) else ALG_ES256


def fully_specified_alg_for(key: PrivateKey | PublicKey) -> int:
    """The fully-specified algorithm id of a key (RFC 9864), what the SUIT MTI profiles name:
    Ed25519 (-19) for an Ed25519 key, ESP256 (-9) for a P-256 key."""
    return ALG_ED25519 if isinstance(public_of(key), ed25519.Ed25519PublicKey) else ALG_ESP256


def algs_for(key: PrivateKey | PublicKey) -> tuple[int, ...]:
    """The algorithm ids a key may sign or verify under: its fully-specified id and the older one."""
    return _EDDSA_ALGS if isinstance(public_of(key), ed25519.Ed25519PublicKey) else _ECDSA_ALGS


@runtime_checkable
class HeldKey(Protocol):
    """A private key held elsewhere (an HSM, a key store) that signs but is never read: the
    server's keys (:mod:`fwcm.keystore`) sign manifests and certificates through this."""

    def public_key(self) -> PublicKey: ...

    def cose_sign(self, data: bytes) -> bytes:
        """The raw COSE signature of ``data``, as :func:`sign` makes it."""
        ...


def to_be_signed(protected: bytes, payload: bytes) -> bytes:
    """The Sig_structure of a COSE_Sign1 (context "Signature1", no external AAD)."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign(key: PrivateKey | HeldKey, data: bytes) -> bytes:
    """A raw COSE signature: Ed25519's 64 bytes, or ECDSA P-256's r || s (32 bytes each)."""
    if isinstance(key, HeldKey):
        return key.cose_sign(data)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    r, s = utils.decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verify(key: PublicKey, alg: int, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` over ``data`` verifies with ``key`` under algorithm ``alg`` (a key of
    the other type, or an algorithm it does not use, never verifies)."""
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            if alg not in _EDDSA_ALGS:
                return False
            key.verify(signature, data)
        else:
            if alg not in _ECDSA_ALGS or len(signature) != 64:
                return False
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            key.verify(utils.encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
