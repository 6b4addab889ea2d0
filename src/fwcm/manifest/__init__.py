"""SUIT manifests for fwcm (sans-IO): build, decode and verify signed envelopes; manage signing keys."""

from .cose import ALG_ED25519, ALG_EDDSA, ALG_ES256, ALG_ESP256, ALG_NAMES
from .decode import (
    decode_envelope,
    sever,
)
from .encode import (
    build_envelope,
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
from .model import (
    Component,
    CoseSignature,
    DeltaPatch,
    Envelope,
    ManifestInfo,
    SeverableMember,
    class_id_for,
    vendor_id_for_domain,
)
from .text import ComponentText, ManifestText
from .verify import (
    verify_envelope,
)

__all__ = [
    "ALG_ED25519",
    "ALG_EDDSA",
    "ALG_ES256",
    "ALG_ESP256",
    "ALG_NAMES",
    "Component",
    "ComponentText",
    "CoseSignature",
    "DeltaPatch",
    "Envelope",
    "ManifestError",
    "ManifestInfo",
    "ManifestText",
    "PrivateKey",
    "PublicKey",
    "SeverableMember",
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
    "sever",
    "vendor_id_for_domain",
    "verify_envelope",
]
