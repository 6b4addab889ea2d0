"""SUIT manifests for fwcm (sans-IO): build, decode and verify signed envelopes; manage signing keys."""

from .codec import (
    CoseSignature,
    Envelope,
    ManifestInfo,
    build_envelope,
    class_id_for,
    decode_envelope,
    vendor_id_for_domain,
    verify_envelope,
)
from .errors import ManifestError, SignatureError
from .keys import (
    PrivateKey,
    PublicKey,
    generate_private_key,
    key_alg,
    key_id,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
    public_of,
)

__all__ = [
    "CoseSignature",
    "Envelope",
    "ManifestError",
    "ManifestInfo",
    "PrivateKey",
    "PublicKey",
    "SignatureError",
    "build_envelope",
    "class_id_for",
    "decode_envelope",
    "generate_private_key",
    "key_alg",
    "key_id",
    "load_private_key",
    "load_public_key",
    "private_key_pem",
    "public_key_pem",
    "public_of",
    "vendor_id_for_domain",
    "verify_envelope",
]
