"""Decoding SUIT envelopes (draft-ietf-suit-manifest, numbering of -28 and later) for the fwcm profile.

The profile is one or more components (the first ``[h'6677']``, "fw", by default), each with one image
and one or more payload URIs tried in order, an optional text section and the severable members of the
draft. ``docs/manifest.md`` documents the structure; this module is pure (no I/O) and every malformed
input surfaces as :class:`ManifestError` so callers handle exactly one exception type.

Integrity model: the authentication wrapper's SUIT_Digest is SHA-256 over the bstr-wrapped manifest and
each COSE_Sign1 signs that encoded SUIT_Digest (detached payload). A severable member carried in the
envelope is covered by the SUIT_Digest the manifest holds in its place. Everything outside the signed
bytes is parsed strictly (canonical outer envelope, only ``kid`` allowed in the unprotected header) so
that any change to a signed envelope makes decoding or verification fail.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from .cose import ALG_NAMES, COSE_SIGN1_TAG, HDR_ALG, HDR_KID, HDR_X5CHAIN
from .encode import (
    canonical_cbor,
)
from .errors import ManifestError
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
    M_INVOKE,
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
    MAX_ENVELOPE_BYTES,
    MAX_REFERENCE_URI,
    MAX_URIS,
    P_CLASS_ID,
    P_IMAGE_DIGEST,
    P_IMAGE_SIZE,
    P_PATCH_FORMAT,
    P_SOURCE_COMPONENT,
    P_URI,
    P_VENDOR_ID,
    PATCH_FORMAT,
    SEVERABLE,
    Component,
    CoseSignature,
    DeltaPatch,
    Envelope,
    ManifestInfo,
    SeverableMember,
)
from .text import ComponentId, decode_text

# --- decoding --------------------------------------------------------------------------------------


def _loads(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item; trailing bytes, duplicate keys and indefinite lengths are errors."""
    fp = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(fp, allow_duplicate_keys=False, allow_indefinite=False, max_depth=32)
        value = decoder.decode()
    except ManifestError:
        raise
    except Exception as exc:  # cbor2 raises a zoo of types on hostile input; all mean "malformed"
        raise ManifestError(f"{what}: malformed CBOR ({type(exc).__name__})") from None
    if fp.tell() != len(data):
        raise ManifestError(f"{what}: trailing bytes after the CBOR item")
    return value


def _short(v: Any) -> str:
    """A repr short enough for a one-line error message."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _uint(v: Any, what: str) -> int:
    if not _is_int(v) or not 0 <= v <= _UINT64_MAX:
        raise ManifestError(f"{what} must be an unsigned 64-bit integer")
    return int(v)


def _bytes(v: Any, what: str) -> bytes:
    if not isinstance(v, bytes):
        raise ManifestError(f"{what} must be a byte string")
    return v


def _map(v: Any, what: str) -> Mapping[Any, Any]:
    if not isinstance(v, Mapping):
        raise ManifestError(f"{what} must be a map")
    return v


def _array(v: Any, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(v, list | tuple):
        raise ManifestError(f"{what} must be an array")
    return v


def _only_keys(m: Mapping[Any, Any], allowed: set[int], what: str) -> None:
    for k in m:
        if not _is_int(k) or k not in allowed:
            raise ManifestError(f"{what}: unsupported key {_short(k)}")


def _decode_suit_digest(data: bytes, what: str) -> bytes:
    arr = _array(_loads(data, what), what)
    if len(arr) != 2:
        raise ManifestError(f"{what}: SUIT_Digest must be [algorithm, bytes]")
    if not _is_int(arr[0]) or arr[0] != DIGEST_SHA256:
        raise ManifestError(f"{what}: unsupported digest algorithm {_short(arr[0])} (need SHA-256, -16)")
    digest = _bytes(arr[1], what)
    if len(digest) != 32:
        raise ManifestError(f"{what}: SHA-256 digest must be 32 bytes")
    return digest


def _commands(data: Any, what: str) -> list[tuple[int, Any]]:
    arr = _array(_loads(_bytes(data, what), what), what)
    if not arr or len(arr) % 2:
        raise ManifestError(f"{what}: a command sequence is a non-empty list of (command, argument) pairs")
    out = []
    for i in range(0, len(arr), 2):
        if not _is_int(arr[i]):
            raise ManifestError(f"{what}: command codes must be integers")
        out.append((int(arr[i]), arr[i + 1]))
    return out


@dataclass
class _Image:
    vendor_id: uuid.UUID | None = None
    class_id: uuid.UUID | None = None
    digest: bytes | None = None
    size: int | None = None
    uris: list[str] = field(default_factory=list)


def _uuid_param(v: Any, what: str) -> uuid.UUID:
    b = _bytes(v, what)
    if len(b) != 16:
        raise ManifestError(f"{what} must be a 16-byte UUID")
    return uuid.UUID(bytes=b)


def _component_index(arg: Any, count: int, what: str) -> list[int]:
    """The components a set-component-index selects: one index, ``true`` for all, or a list."""
    if arg is True:
        return list(range(count))
    indices = list(_array(arg, f"{what}: component index")) if isinstance(arg, list | tuple) else [arg]
    if not indices or not all(_is_int(i) and 0 <= i < count for i in indices):
        raise ManifestError(f"{what}: component index {_short(arg)} out of range (the manifest has {count})")
    return [int(i) for i in indices]


def _shared_sequence(data: Any, images: list[_Image]) -> set[int]:
    """Apply the shared sequence's parameters to ``images``; return the conditions it checks."""
    what = "shared-sequence"
    selected = [0]
    conditions: set[int] = set()
    for code, arg in _commands(data, what):
        if code == DIR_SET_COMPONENT_INDEX:
            selected = _component_index(arg, len(images), what)
        elif code == DIR_OVERRIDE_PARAMETERS:
            params = _map(arg, f"{what}: override-parameters")
            _only_keys(params, {P_VENDOR_ID, P_CLASS_ID, P_IMAGE_DIGEST, P_IMAGE_SIZE, P_URI}, what)
            if P_URI in params:
                raise ManifestError(f"{what}: payload URIs belong in payload-fetch or install")
            for img in (images[i] for i in selected):
                if P_VENDOR_ID in params:
                    img.vendor_id = _uuid_param(params[P_VENDOR_ID], "vendor-id")
                if P_CLASS_ID in params:
                    img.class_id = _uuid_param(params[P_CLASS_ID], "class-id")
                if P_IMAGE_DIGEST in params:
                    raw = _bytes(params[P_IMAGE_DIGEST], "image-digest")
                    img.digest = _decode_suit_digest(raw, "image-digest")
                if P_IMAGE_SIZE in params:
                    img.size = _uint(params[P_IMAGE_SIZE], "image-size")
        elif code in (COND_VENDOR_ID, COND_CLASS_ID, COND_IMAGE_MATCH):
            _uint(arg, f"{what}: reporting policy")
            for img in (images[i] for i in selected):
                if code == COND_VENDOR_ID and img.vendor_id is None:
                    raise ManifestError(f"{what}: vendor-identifier condition before vendor-id is set")
                if code == COND_CLASS_ID and img.class_id is None:
                    raise ManifestError(f"{what}: class-identifier condition before class-id is set")
            conditions.add(code)
        else:
            raise ManifestError(f"{what}: unsupported command {code}")
    return conditions


def _fetch_sequence(data: Any, what: str, images: list[_Image], selected: list[int], depth: int = 0) -> None:
    """Collect the payload URIs a fetch/install sequence fetches each component from, in try order."""
    uri: str | None = None
    for code, arg in _commands(data, what):
        if code == DIR_SET_COMPONENT_INDEX:
            selected = _component_index(arg, len(images), what)
        elif code == DIR_OVERRIDE_PARAMETERS:
            params = _map(arg, f"{what}: override-parameters")
            _only_keys(params, {P_URI}, f"{what}: override-parameters")
            value = params.get(P_URI)
            if not isinstance(value, str) or not value:
                raise ManifestError(f"{what}: uri must be a non-empty text string")
            uri = value
        elif code == DIR_FETCH:
            _uint(arg, f"{what}: reporting policy")
            if uri is None:
                raise ManifestError(f"{what}: fetch without a uri")
            for img in (images[i] for i in selected):
                if uri not in img.uris:
                    img.uris.append(uri)
                if len(img.uris) > MAX_URIS:
                    raise ManifestError(f"{what}: more than {MAX_URIS} payload URIs")
        elif code == COND_IMAGE_MATCH:
            _uint(arg, f"{what}: reporting policy")
        elif code == DIR_TRY_EACH:
            if depth:
                raise ManifestError(f"{what}: nested try-each is not supported")
            options = _array(arg, f"{what}: try-each")
            if options and options[-1] is None:
                options = options[:-1]
            if len(options) < 1:
                raise ManifestError(f"{what}: try-each needs at least one option")
            for option in options:
                _fetch_sequence(option, f"{what}: try-each option", images, list(selected), depth + 1)
        else:
            raise ManifestError(f"{what}: unsupported command {code}")


@dataclass
class _Delta:
    base_digest: bytes
    base_size: int
    source: int


def _read_delta_install(data: bytes, images: list[_Image]) -> _Delta:
    """Read a delta install: image-match on the base, copy (apply the patch) from the source
    component, image-match on the result, which must be the manifest's image."""
    what = "install"
    selected = 0
    digest: bytes | None = None
    size: int | None = None
    base: tuple[bytes, int] | None = None
    source: int | None = None
    patch_format: str | None = None
    copied = checked = False
    for code, arg in _commands(data, what):
        if code == DIR_SET_COMPONENT_INDEX:
            indices = _component_index(arg, len(images), what)
            if len(indices) != 1:
                raise ManifestError(f"{what}: a delta install selects one component at a time")
            selected = indices[0]
        elif code == DIR_OVERRIDE_PARAMETERS:
            params = _map(arg, f"{what}: override-parameters")
            _only_keys(params, {P_IMAGE_DIGEST, P_IMAGE_SIZE, P_SOURCE_COMPONENT, P_PATCH_FORMAT}, what)
            if P_IMAGE_DIGEST in params:
                digest = _decode_suit_digest(_bytes(params[P_IMAGE_DIGEST], "image-digest"), "image-digest")
            if P_IMAGE_SIZE in params:
                size = _uint(params[P_IMAGE_SIZE], "image-size")
            if P_SOURCE_COMPONENT in params:
                source = _uint(params[P_SOURCE_COMPONENT], "source-component")
            if P_PATCH_FORMAT in params:
                patch_format = params[P_PATCH_FORMAT]
                if patch_format != PATCH_FORMAT:
                    raise ManifestError(
                        f"{what}: unsupported patch format {_short(patch_format)} (need {PATCH_FORMAT})"
                    )
        elif code == COND_IMAGE_MATCH:
            _uint(arg, f"{what}: reporting policy")
            if selected != 0 or digest is None or size is None:
                raise ManifestError(
                    f"{what}: image-match needs the image's digest and size set on component 0"
                )
            if not copied:
                base = (digest, size)
            elif (digest, size) != (images[0].digest, images[0].size):
                raise ManifestError(
                    f"{what}: the patched image must match the manifest's image digest and size"
                )
            else:
                checked = True
        elif code == DIR_COPY:
            _uint(arg, f"{what}: reporting policy")
            if base is None:
                raise ManifestError(f"{what}: copy before image-match checked the base image")
            if selected != 0 or source is None or not 0 < source < len(images) or patch_format is None:
                raise ManifestError(f"{what}: copy needs a source component and a patch format")
            copied = True
        else:
            raise ManifestError(f"{what}: unsupported command {code} in a delta install")
    if base is None or source is None or not copied or not checked:
        raise ManifestError(
            f"{what}: a delta install checks the base, copies the patch and checks the result"
        )
    return _Delta(base_digest=base[0], base_size=base[1], source=source)


def _is_delta(install: bytes) -> bool:
    return any(code == DIR_COPY for code, _ in _commands(install, "install"))


def _component_ids(common: Mapping[Any, Any]) -> list[ComponentId]:
    components = _array(common.get(C_COMPONENTS), "components")
    if not 1 <= len(components) <= MAX_COMPONENTS:
        raise ManifestError(f"common: the profile has 1 to {MAX_COMPONENTS} components")
    ids: list[ComponentId] = []
    for item in components:
        component = tuple(_array(item, "component identifier"))
        if not 1 <= len(component) <= MAX_COMPONENT_ID_PARTS or not all(
            isinstance(p, bytes) and len(p) <= MAX_COMPONENT_ID_PART_BYTES for p in component
        ):
            raise ManifestError(
                f"common: a component identifier is an array of 1 to {MAX_COMPONENT_ID_PARTS} byte strings "
                f"of at most {MAX_COMPONENT_ID_PART_BYTES} bytes"
            )
        if component in ids:
            raise ManifestError("common: component identifiers must be distinct")
        ids.append(component)
    return ids


def _severable_members(
    m: Mapping[Any, Any], carried: Mapping[int, bytes]
) -> tuple[dict[int, bytes], tuple[SeverableMember, ...]]:
    """Each severable member's bytes (inline, or carried and matching its digest; absent when
    severed) and the members held as digests."""
    members: dict[int, bytes] = {}
    held: list[SeverableMember] = []
    for key, name in SEVERABLE.items():
        value = m.get(key)
        if value is None:
            if key in carried:
                raise ManifestError(
                    f"envelope: {name} ({key}) is carried but the manifest has no digest for it"
                )
            continue
        if isinstance(value, bytes):
            if key in carried:
                raise ManifestError(f"envelope: {name} ({key}) is both in the manifest and in the envelope")
            members[key] = value
            continue
        arr = _array(value, f"{name} digest")
        if len(arr) != 2 or not _is_int(arr[0]) or arr[0] != DIGEST_SHA256:
            raise ManifestError(f"{name} ({key}): a severed member's digest must be a SHA-256 SUIT_Digest")
        digest = _bytes(arr[1], f"{name} digest")
        if len(digest) != 32:
            raise ManifestError(f"{name} ({key}): SHA-256 digest must be 32 bytes")
        present = key in carried
        if present:
            body = _bytes(carried[key], name)
            if hashlib.sha256(canonical_cbor(body)).digest() != digest:
                raise ManifestError(f"envelope: {name} ({key}) does not match its digest in the manifest")
            members[key] = body
        held.append(SeverableMember(key=key, name=name, digest=digest, present=present))
    return members, tuple(held)


def _decode_manifest(
    manifest: bytes, carried: Mapping[int, bytes] | None = None
) -> tuple[ManifestInfo, tuple[SeverableMember, ...]]:
    m = _map(_loads(manifest, "manifest"), "manifest")
    _only_keys(
        m,
        {M_VERSION, M_SEQUENCE, M_COMMON, M_REFERENCE_URI, M_VALIDATE, M_INVOKE, *SEVERABLE},
        "manifest",
    )
    if m.get(M_VERSION) != MANIFEST_VERSION or not _is_int(m.get(M_VERSION)):
        raise ManifestError(f"manifest: unsupported manifest-version {_short(m.get(M_VERSION))} (need 1)")
    if M_SEQUENCE not in m:
        raise ManifestError("manifest: sequence-number missing")
    sequence = _uint(m[M_SEQUENCE], "sequence-number")
    reference_uri = m.get(M_REFERENCE_URI)
    if reference_uri is not None and (
        not isinstance(reference_uri, str) or len(reference_uri) > MAX_REFERENCE_URI
    ):
        raise ManifestError(f"reference-uri must be a text string of at most {MAX_REFERENCE_URI} characters")
    if M_COMMON not in m:
        raise ManifestError("manifest: common missing")
    common = _map(_loads(_bytes(m[M_COMMON], "common"), "common"), "common")
    _only_keys(common, {C_COMPONENTS, C_SHARED_SEQUENCE}, "common")
    ids = _component_ids(common)
    if C_SHARED_SEQUENCE not in common:
        raise ManifestError("common: shared-sequence missing")
    images = [_Image() for _ in ids]
    conditions = _shared_sequence(common[C_SHARED_SEQUENCE], images)
    first = images[0]
    if first.vendor_id is None or first.class_id is None:
        raise ManifestError("shared-sequence: vendor-id and class-id are required")
    if not {COND_VENDOR_ID, COND_CLASS_ID} <= conditions:
        raise ManifestError("shared-sequence: vendor-identifier and class-identifier conditions are required")
    for index, img in enumerate(images):
        if img.digest is None or img.size is None:
            raise ManifestError(
                f"shared-sequence: image-digest and image-size are required (component {index})"
            )
        if img.vendor_id not in (None, first.vendor_id) or img.class_id not in (None, first.class_id):
            raise ManifestError(
                "shared-sequence: components with different vendor or class ids are outside the profile"
            )
    for key, name in ((M_VALIDATE, "validate"), (M_INVOKE, "invoke")):
        if key in m:
            _commands(m[key], name)
    members, held = _severable_members(m, carried or {})
    delta: _Delta | None = None
    if M_INSTALL in members and _is_delta(members[M_INSTALL]):
        if len(images) != 2:
            raise ManifestError("manifest: a delta manifest has the image and the patch's component")
        delta = _read_delta_install(members[M_INSTALL], images)
    for key in (M_PAYLOAD_FETCH, M_INSTALL) if delta is None else (M_PAYLOAD_FETCH,):
        if key in members:
            _fetch_sequence(members[key], SEVERABLE[key], images, [0])
    if delta is not None:
        patch = images[delta.source]
        if images[0].uris:
            raise ManifestError("manifest: a delta manifest fetches the patch, not the image")
        if not patch.uris:
            raise ManifestError("manifest: no payload URI for the patch")
    for index, img in enumerate(images):
        if delta is not None and index == 0:
            continue  # made by applying the patch, not fetched
        if not img.uris:
            raise ManifestError(
                "manifest: no payload URI (payload-fetch or install must fetch)"
                + (f" for component {index}" if len(images) > 1 else "")
            )
    texts = decode_text(_loads(members[M_TEXT], "text"), ids) if M_TEXT in members else ()
    components = [
        Component(id=cid, image_digest=img.digest, image_size=img.size, uris=tuple(img.uris))
        for cid, img in zip(ids, images, strict=True)
        if img.digest is not None and img.size is not None
    ]
    head = components[0]
    delta_patch = None
    if delta is not None:
        patch_component = components.pop(delta.source)
        head = Component(head.id, head.image_digest, head.image_size, ())
        delta_patch = DeltaPatch(
            base_digest=delta.base_digest,
            base_size=delta.base_size,
            patch_digest=patch_component.image_digest,
            patch_size=patch_component.image_size,
            uris=patch_component.uris,
        )
    info = ManifestInfo(
        sequence=sequence,
        vendor_id=first.vendor_id,
        class_id=first.class_id,
        image_digest=head.image_digest,
        image_size=head.image_size,
        uris=head.uris,
        component_id=head.id,
        extra_components=tuple(components[1:]),
        texts=texts,
        reference_uri=reference_uri,
        delta=delta_patch,
    )
    return info, held


def _decode_x5chain(v: Any) -> tuple[bytes, ...]:
    certs = [v] if isinstance(v, bytes) else list(_array(v, "x5chain"))
    if not certs or not all(isinstance(c, bytes) and c for c in certs):
        raise ManifestError("x5chain must be a DER certificate or a non-empty array of them")
    return tuple(certs)


def _decode_sign1(data: Any) -> CoseSignature:
    what = "COSE_Sign1"
    tag = _loads(_bytes(data, what), what)
    if not isinstance(tag, cbor2.CBORTag) or tag.tag != COSE_SIGN1_TAG:
        raise ManifestError(f"{what}: expected tag 18")
    arr = _array(tag.value, what)
    if len(arr) != 4:
        raise ManifestError(f"{what}: expected [protected, unprotected, payload, signature]")
    protected_bytes = _bytes(arr[0], f"{what}: protected header")
    if arr[2] is not None:
        raise ManifestError(f"{what}: payload must be detached (nil)")
    signature = _bytes(arr[3], f"{what}: signature")
    protected: Mapping[Any, Any] = {}
    if protected_bytes:
        protected = _map(_loads(protected_bytes, "protected header"), "protected header")
    _only_keys(protected, {HDR_ALG, HDR_KID, HDR_X5CHAIN}, f"{what}: protected header")
    unprotected = _map(arr[1], f"{what}: unprotected header")
    _only_keys(unprotected, {HDR_KID}, f"{what}: unprotected header")
    alg = protected.get(HDR_ALG)
    if not _is_int(alg) or alg not in ALG_NAMES:
        raise ManifestError(
            f"{what}: unsupported algorithm {_short(alg)} (need ESP256, Ed25519, ES256 or EdDSA)"
        )
    if HDR_KID in protected and HDR_KID in unprotected:
        raise ManifestError(f"{what}: kid in both headers")
    kid_value = protected.get(HDR_KID, unprotected.get(HDR_KID))
    kid = None if kid_value is None else _bytes(kid_value, "kid")
    x5chain = _decode_x5chain(protected[HDR_X5CHAIN]) if HDR_X5CHAIN in protected else ()
    if len(signature) != 64:
        raise ManifestError(f"{what}: {ALG_NAMES[alg]} signature must be 64 bytes")
    return CoseSignature(
        alg=int(alg), kid=kid, signature=signature, x5chain=x5chain, protected=protected_bytes
    )


def decode_envelope(data: bytes) -> Envelope:
    """Parse a SUIT envelope without trusting it; raises :class:`ManifestError` on anything malformed.

    The manifest digest is checked here; signatures are checked by :func:`verify_envelope`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ManifestError("envelope must be bytes")
    data = bytes(data)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ManifestError(f"envelope larger than {MAX_ENVELOPE_BYTES} bytes")
    top = _loads(data, "envelope")
    if not isinstance(top, cbor2.CBORTag) or top.tag != ENVELOPE_TAG:
        raise ManifestError("not a SUIT envelope (expected CBOR tag 107)")
    env = _map(top.value, "envelope")
    _only_keys(env, {ENV_AUTH, ENV_MANIFEST, *SEVERABLE}, "envelope")
    if ENV_AUTH not in env:
        raise ManifestError("envelope: authentication-wrapper missing (unsigned manifest)")
    if ENV_MANIFEST not in env:
        raise ManifestError("envelope: manifest missing")
    auth_bytes = _bytes(env[ENV_AUTH], "authentication-wrapper")
    manifest = _bytes(env[ENV_MANIFEST], "manifest")
    carried = {k: _bytes(env[k], SEVERABLE[k]) for k in SEVERABLE if k in env}
    outer = {ENV_AUTH: auth_bytes, ENV_MANIFEST: manifest, **carried}
    if canonical_cbor(cbor2.CBORTag(ENVELOPE_TAG, outer)) != data:
        raise ManifestError("envelope: not deterministically encoded")
    manifest_bstr = canonical_cbor(manifest)

    auth = _array(_loads(auth_bytes, "authentication-wrapper"), "authentication-wrapper")
    if len(auth) < 2:
        raise ManifestError("authentication-wrapper: needs a digest and at least one signature")
    suit_digest = _bytes(auth[0], "authentication digest")
    carried_digest = _decode_suit_digest(suit_digest, "authentication digest")
    digest = hashlib.sha256(manifest_bstr).digest()
    if carried_digest != digest:
        raise ManifestError("authentication digest does not match the manifest")
    signatures = tuple(_decode_sign1(item) for item in auth[1:])
    info, held = _decode_manifest(manifest, carried)
    return Envelope(
        info=info,
        manifest_bstr=manifest_bstr,
        digest=digest,
        signatures=signatures,
        raw=data,
        suit_digest=suit_digest,
        severable=held,
    )


def sever(data: bytes, keys: Iterable[int] = tuple(SEVERABLE)) -> bytes:
    """``data`` without the severable members ``keys`` (default: all); the signature still holds, as
    the manifest keeps their digests. The envelope is decoded first, so only a valid one is cut."""
    drop = set(keys)
    if not drop <= SEVERABLE.keys():
        raise ManifestError(f"only severable members can be severed ({', '.join(map(str, SEVERABLE))})")
    decode_envelope(data)
    top = cbor2.loads(data)
    return canonical_cbor(cbor2.CBORTag(ENVELOPE_TAG, {k: v for k, v in top.value.items() if k not in drop}))
