"""Encoding fwcm's SUIT manifests and signing envelopes (no I/O); ``docs/manifest.md`` shows the
structure, ``decode.py`` reads it back."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from . import cose
from .cose import ALG_NAMES, COSE_SIGN1_TAG, HDR_ALG, HDR_KID, HDR_X5CHAIN
from .errors import ManifestError
from .keys import PrivateKey, PublicKey, key_id, public_of
from .model import (
    _UINT64_MAX,
    C_COMPONENTS,
    C_SHARED_SEQUENCE,
    COND_CLASS_ID,
    COND_IMAGE_MATCH,
    COND_VENDOR_ID,
    DIGEST_SHA256,
    DIR_COPY,
    DIR_FETCH,
    DIR_OVERRIDE_PARAMETERS,
    DIR_SET_COMPONENT_INDEX,
    DIR_TRY_EACH,
    ENV_AUTH,
    ENV_MANIFEST,
    ENVELOPE_TAG,
    M_COMMON,
    M_INSTALL,
    M_PAYLOAD_FETCH,
    M_REFERENCE_URI,
    M_SEQUENCE,
    M_TEXT,
    M_VALIDATE,
    M_VERSION,
    MANIFEST_VERSION,
    MAX_COMPONENT_ID_PART_BYTES,
    MAX_COMPONENT_ID_PARTS,
    MAX_COMPONENTS,
    MAX_REFERENCE_URI,
    MAX_URIS,
    P_CLASS_ID,
    P_IMAGE_DIGEST,
    P_IMAGE_SIZE,
    P_PATCH_FORMAT,
    P_SOURCE_COMPONENT,
    P_URI,
    P_VENDOR_ID,
    PATCH_COMPONENT,
    PATCH_FORMAT,
    REPORT_ALL,
    REPORT_FAILURE,
    Component,
    DeltaPatch,
    ManifestInfo,
)
from .text import encode_text

# --- encoding --------------------------------------------------------------------------------------


def canonical_cbor(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def suit_digest_of(digest: bytes) -> bytes:
    return canonical_cbor([DIGEST_SHA256, digest])


def _check_uint(v: Any, what: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _UINT64_MAX:
        raise ManifestError(f"{what} must be an integer between 0 and 2**64-1")


def _check_component_id(cid: Any) -> None:
    if (
        not isinstance(cid, tuple)
        or not 1 <= len(cid) <= MAX_COMPONENT_ID_PARTS
        or not all(isinstance(p, bytes) and len(p) <= MAX_COMPONENT_ID_PART_BYTES for p in cid)
    ):
        raise ManifestError(
            f"a component id is a tuple of 1 to {MAX_COMPONENT_ID_PARTS} byte strings "
            f"of at most {MAX_COMPONENT_ID_PART_BYTES} bytes"
        )


def _check_component(c: Component, *, fetched: bool = True) -> None:
    _check_component_id(c.id)
    if not isinstance(c.image_digest, bytes) or len(c.image_digest) != 32:
        raise ManifestError("image_digest must be 32 bytes (SHA-256)")
    _check_uint(c.image_size, "image_size")
    if not fetched:
        if c.uris:
            raise ManifestError("a delta manifest fetches the patch, not the image: give no image URIs")
        return
    if not c.uris:
        raise ManifestError("at least one payload URI is required")
    if len(c.uris) > MAX_URIS:
        raise ManifestError(f"at most {MAX_URIS} payload URIs")
    for uri in c.uris:
        if not isinstance(uri, str) or not uri:
            raise ManifestError("payload URIs must be non-empty strings")


def _check_info(info: ManifestInfo) -> None:
    if not isinstance(info.sequence, int) or isinstance(info.sequence, bool):
        raise ManifestError("sequence must be an integer")
    if not 0 <= info.sequence <= _UINT64_MAX:
        raise ManifestError("sequence must be between 0 and 2**64-1")
    if not isinstance(info.vendor_id, uuid.UUID) or not isinstance(info.class_id, uuid.UUID):
        raise ManifestError("vendor_id and class_id must be UUIDs")
    if not isinstance(info.image_size, int) or isinstance(info.image_size, bool):
        raise ManifestError("image_size must be an integer")
    components = info.components
    if len(components) > MAX_COMPONENTS:
        raise ManifestError(f"at most {MAX_COMPONENTS} components")
    if info.delta is not None and info.extra_components:
        raise ManifestError("a delta manifest has one image")
    for c in components:
        _check_component(c, fetched=info.delta is None)
    if info.delta is not None:
        d = info.delta
        if info.component_id == PATCH_COMPONENT:
            raise ManifestError(f"component id {PATCH_COMPONENT!r} is the patch's")
        _check_component(Component(PATCH_COMPONENT, d.patch_digest, d.patch_size, d.uris))
        if not isinstance(d.base_digest, bytes) or len(d.base_digest) != 32:
            raise ManifestError("base_digest must be 32 bytes (SHA-256)")
        _check_uint(d.base_size, "base_size")
    if len({c.id for c in components}) != len(components):
        raise ManifestError("component ids must be distinct")
    if info.reference_uri is not None and (
        not isinstance(info.reference_uri, str) or not 0 < len(info.reference_uri) <= MAX_REFERENCE_URI
    ):
        raise ManifestError(f"reference_uri must be a text string of 1 to {MAX_REFERENCE_URI} characters")


def _fetch_option(uri: str) -> list[Any]:
    return [
        DIR_OVERRIDE_PARAMETERS,
        {P_URI: uri},
        DIR_FETCH,
        REPORT_FAILURE,
        COND_IMAGE_MATCH,
        REPORT_ALL,
    ]


def _fetch_commands(uris: tuple[str, ...]) -> list[Any]:
    """One URI: the option itself; several: try-each over one option per URI, in order."""
    if len(uris) == 1:
        return _fetch_option(uris[0])
    return [DIR_TRY_EACH, [canonical_cbor(_fetch_option(u)) for u in uris]]


def _shared_sequence_commands(info: ManifestInfo) -> list[Any]:
    """Identity and image of the first component, checked; then the image of each further one."""
    shared: list[Any] = [
        DIR_SET_COMPONENT_INDEX,
        0,
        DIR_OVERRIDE_PARAMETERS,
        {
            P_VENDOR_ID: info.vendor_id.bytes,
            P_CLASS_ID: info.class_id.bytes,
            P_IMAGE_DIGEST: suit_digest_of(info.image_digest),
            P_IMAGE_SIZE: info.image_size,
        },
        COND_VENDOR_ID,
        REPORT_ALL,
        COND_CLASS_ID,
        REPORT_ALL,
    ]
    for index, c in enumerate(info.extra_components, 1):
        shared += [
            DIR_SET_COMPONENT_INDEX,
            index,
            DIR_OVERRIDE_PARAMETERS,
            {P_IMAGE_DIGEST: suit_digest_of(c.image_digest), P_IMAGE_SIZE: c.image_size},
        ]
    return shared


def _patch_parameters(d: DeltaPatch) -> list[Any]:
    return [
        DIR_SET_COMPONENT_INDEX,
        1,
        DIR_OVERRIDE_PARAMETERS,
        {P_IMAGE_DIGEST: suit_digest_of(d.patch_digest), P_IMAGE_SIZE: d.patch_size},
    ]


def _delta_install(info: ManifestInfo) -> list[Any]:
    """Check the running image is the base, apply the patch from component 1 into component 0 (the
    inactive slot), check the result is the new image."""
    d = info.delta
    assert d is not None
    return [
        DIR_SET_COMPONENT_INDEX,
        0,
        DIR_OVERRIDE_PARAMETERS,
        {P_IMAGE_DIGEST: suit_digest_of(d.base_digest), P_IMAGE_SIZE: d.base_size},
        COND_IMAGE_MATCH,
        REPORT_ALL,
        DIR_OVERRIDE_PARAMETERS,
        {P_SOURCE_COMPONENT: 1, P_PATCH_FORMAT: PATCH_FORMAT},
        DIR_COPY,
        REPORT_FAILURE,
        DIR_OVERRIDE_PARAMETERS,
        {P_IMAGE_DIGEST: suit_digest_of(info.image_digest), P_IMAGE_SIZE: info.image_size},
        COND_IMAGE_MATCH,
        REPORT_ALL,
    ]


def encode_manifest(info: ManifestInfo) -> bytes:
    """The deterministic CBOR SUIT_Manifest (not yet bstr-wrapped) for ``info``, text inline."""
    return _encode(info)[0]


def _encode(info: ManifestInfo) -> tuple[bytes, dict[int, bytes]]:
    """The manifest and the severable members the envelope carries (the text, held as a digest)."""
    _check_info(info)
    components = info.components
    common = {
        C_COMPONENTS: [list(c.id) for c in components],
        C_SHARED_SEQUENCE: canonical_cbor(_shared_sequence_commands(info)),
    }
    install: list[Any] | None = None
    if info.delta is not None:
        common[C_COMPONENTS] = [list(info.component_id), list(PATCH_COMPONENT)]
        common[C_SHARED_SEQUENCE] = canonical_cbor(
            _shared_sequence_commands(info) + _patch_parameters(info.delta)
        )
        fetch = [DIR_SET_COMPONENT_INDEX, 1, *_fetch_commands(info.delta.uris)]
        check = [COND_IMAGE_MATCH, REPORT_ALL]
        install = _delta_install(info)
    elif len(components) == 1:
        fetch = _fetch_commands(info.uris)
        check = [COND_IMAGE_MATCH, REPORT_ALL]
    else:
        fetch = []
        for index, c in enumerate(components):
            fetch += [DIR_SET_COMPONENT_INDEX, index, *_fetch_commands(c.uris)]
        check = [DIR_SET_COMPONENT_INDEX, True, COND_IMAGE_MATCH, REPORT_ALL]
    manifest: dict[int, Any] = {
        M_VERSION: MANIFEST_VERSION,
        M_SEQUENCE: info.sequence,
        M_COMMON: canonical_cbor(common),
        M_VALIDATE: canonical_cbor(check),
        M_PAYLOAD_FETCH: canonical_cbor(fetch),
        M_INSTALL: canonical_cbor(check if install is None else install),
    }
    if info.reference_uri is not None:
        manifest[M_REFERENCE_URI] = info.reference_uri
    members: dict[int, bytes] = {}
    if info.texts:
        text = canonical_cbor(encode_text(info.texts, [c.id for c in components]))
        members[M_TEXT] = text
        manifest[M_TEXT] = [DIGEST_SHA256, hashlib.sha256(canonical_cbor(text)).digest()]
    return canonical_cbor(manifest), members


def _signing_alg(public: PublicKey, alg: int | None) -> int:
    if alg is None:
        return cose.fully_specified_alg_for(public)
    if alg not in cose.algs_for(public):
        names = " or ".join(ALG_NAMES[a] for a in cose.algs_for(public))
        raise ManifestError(f"algorithm {alg} does not fit this key (use {names})")
    return alg


def build_envelope(
    info: ManifestInfo,
    key: PrivateKey | cose.HeldKey,
    *,
    x5chain: list[bytes] | None = None,
    alg: int | None = None,
) -> bytes:
    """Sign ``info`` with ``key`` into a tagged SUIT envelope.

    ``key`` is a private key or one held in a key store or HSM (:class:`fwcm.manifest.cose.HeldKey`).
    The algorithm is the key's fully-specified one unless ``alg`` names another that fits the key:
    ESP256 (-9) or ES256 (-7) for P-256, Ed25519 (-19) or EdDSA (-8) for Ed25519. ``x5chain`` (DER
    certificates, leaf first) is carried in the protected header, label 33. A text section is carried
    as a severable member, its digest in the manifest.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        public = public_of(key)
    elif isinstance(key, cose.HeldKey):
        public = public_of(key.public_key())
    else:
        raise ManifestError("a private key is required to sign")
    protected_map: dict[int, Any] = {HDR_ALG: _signing_alg(public, alg)}
    manifest, members = _encode(info)
    manifest_bstr = canonical_cbor(manifest)
    suit_digest = suit_digest_of(hashlib.sha256(manifest_bstr).digest())
    if x5chain:
        if not all(isinstance(c, bytes) and c for c in x5chain):
            raise ManifestError("x5chain entries must be non-empty DER bytes")
        protected_map[HDR_X5CHAIN] = x5chain[0] if len(x5chain) == 1 else list(x5chain)
    protected = canonical_cbor(protected_map)
    signature = cose.sign(key, cose.to_be_signed(protected, suit_digest))
    sign1 = cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {HDR_KID: key_id(public)}, None, signature])
    auth = [suit_digest, canonical_cbor(sign1)]
    envelope = cbor2.CBORTag(
        ENVELOPE_TAG, {ENV_AUTH: canonical_cbor(auth), ENV_MANIFEST: manifest, **members}
    )
    return canonical_cbor(envelope)
