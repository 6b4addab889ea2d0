"""The SUIT numbering fwcm uses (draft-ietf-suit-manifest, -28 and later), the profile's bounds,
and the value types a manifest is built from and decoded into (no I/O)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from .cose import ALG_NAMES
from .text import ComponentId, ManifestText

# --- SUIT numbering (draft-ietf-suit-manifest -28+) -----------------------------------------------
ENVELOPE_TAG = 107
ENV_AUTH = 2
ENV_MANIFEST = 3

MANIFEST_VERSION = 1
M_VERSION = 1
M_SEQUENCE = 2
M_COMMON = 3
M_REFERENCE_URI = 4
M_VALIDATE = 7
M_INVOKE = 9
M_PAYLOAD_FETCH = 16
M_INSTALL = 20
M_TEXT = 23

SEVERABLE = {M_PAYLOAD_FETCH: "payload-fetch", M_INSTALL: "install", M_TEXT: "text"}
"""The severable members: in the manifest either inline (bstr) or as a SUIT_Digest of the bstr-wrapped
member, which the envelope then carries under the same key (or not, when it has been severed)."""

C_COMPONENTS = 2
C_SHARED_SEQUENCE = 4

P_VENDOR_ID = 1
P_CLASS_ID = 2
P_IMAGE_DIGEST = 3
P_IMAGE_SIZE = 14
P_URI = 21
P_SOURCE_COMPONENT = 22
P_PATCH_FORMAT = -1
"""fwcm's custom parameter (suit-parameter-custom, a negative key): the format of the patch that
suit-directive-copy applies from the source component."""
PATCH_FORMAT = "detools-sequential-lzma"

COND_VENDOR_ID = 1
COND_CLASS_ID = 2
COND_IMAGE_MATCH = 3

DIR_SET_COMPONENT_INDEX = 12
DIR_TRY_EACH = 15
DIR_OVERRIDE_PARAMETERS = 20
DIR_FETCH = 21
DIR_COPY = 22

REPORT_ALL = 15
"""Reporting policy for conditions: record and sysinfo on success and failure."""
REPORT_FAILURE = 2
"""Reporting policy for fetch: record on failure."""

DIGEST_SHA256 = -16
COMPONENT_FW: list[bytes] = [b"fw"]
"""The component identifier fwcm writes for a single image: ``[h'6677']``."""

MAX_ENVELOPE_BYTES = 256 * 1024
"""Envelopes above this size are refused unread (a profile envelope is a few hundred bytes plus certs)."""
MAX_URIS = 16
MAX_COMPONENTS = 8
MAX_COMPONENT_ID_PARTS = 8
MAX_COMPONENT_ID_PART_BYTES = 64
MAX_REFERENCE_URI = 1024
PATCH_COMPONENT: tuple[bytes, ...] = (b"fwcm-patch",)
"""The temporary component a delta manifest fetches its patch into."""
_UINT64_MAX = 2**64 - 1


def vendor_id_for_domain(domain: str) -> uuid.UUID:
    """Vendor ID convention: UUID5 in the DNS namespace over the vendor's domain name."""
    return uuid.uuid5(uuid.NAMESPACE_DNS, domain)


def class_id_for(vendor_id: uuid.UUID, model: str) -> uuid.UUID:
    """Class ID convention: UUID5 in the vendor's namespace over the device model name."""
    return uuid.uuid5(vendor_id, model)


@dataclass(frozen=True)
class Component:
    """One image of a manifest: which component it goes to, its digest, size and payload URIs."""

    id: ComponentId
    image_digest: bytes
    """SHA-256 of the image, 32 bytes."""
    image_size: int
    uris: tuple[str, ...]
    """One or more payload URIs, tried in order (try-each)."""


@dataclass(frozen=True)
class DeltaPatch:
    """How a delta manifest makes its image: a patch fetched into a temporary component, applied to
    the image the device runs now (the base, checked first) into the inactive slot."""

    base_digest: bytes
    """SHA-256 of the image the patch applies to, 32 bytes."""
    base_size: int
    patch_digest: bytes
    patch_size: int
    uris: tuple[str, ...]
    """Where to fetch the patch, tried in order."""


@dataclass(frozen=True)
class ManifestInfo:
    """Everything the fwcm profile says about one update.

    The first (often only) image is described by ``component_id``, ``image_digest``, ``image_size``
    and ``uris``; a multi-component manifest lists the others in ``extra_components``. All of them
    are installed together or not at all. :attr:`components` gives every image uniformly.
    """

    sequence: int
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    image_digest: bytes
    """SHA-256 of the image, 32 bytes."""
    image_size: int
    uris: tuple[str, ...]
    """One or more payload URIs, tried in order (try-each)."""
    component_id: ComponentId = (b"fw",)
    extra_components: tuple[Component, ...] = ()
    texts: tuple[ManifestText, ...] = ()
    """The text section, one entry per language (written as a severable member)."""
    reference_uri: str | None = None
    delta: DeltaPatch | None = None
    """Set in a delta manifest: the image is made from a patch (``uris`` is then empty)."""

    @property
    def components(self) -> tuple[Component, ...]:
        first = Component(self.component_id, self.image_digest, self.image_size, self.uris)
        return (first, *self.extra_components)


@dataclass(frozen=True)
class SeverableMember:
    """A severable member of the manifest held as a digest: whether the envelope still carries it."""

    key: int
    name: str
    digest: bytes
    """SHA-256 of the bstr-wrapped member, as the manifest holds it."""
    present: bool
    """The envelope carries the member and it matches ``digest`` (False: it has been severed)."""


@dataclass(frozen=True)
class CoseSignature:
    """One parsed COSE_Sign1 entry of the authentication wrapper."""

    alg: int
    kid: bytes | None
    signature: bytes
    x5chain: tuple[bytes, ...]
    """DER certificates from protected header 33 (leaf first), empty when absent."""
    protected: bytes
    """The serialized protected header exactly as carried (it is part of what is signed)."""

    @property
    def alg_name(self) -> str:
        return ALG_NAMES.get(self.alg, str(self.alg))


@dataclass(frozen=True)
class Envelope:
    """A decoded (not yet verified) SUIT envelope."""

    info: ManifestInfo
    manifest_bstr: bytes
    """The bstr-wrapped manifest as it appears in the envelope (CBOR header included)."""
    digest: bytes
    """SHA-256 over ``manifest_bstr`` (32 bytes), the value of the SUIT_Digest."""
    signatures: tuple[CoseSignature, ...]
    raw: bytes
    suit_digest: bytes = field(default=b"", repr=False)
    """The encoded SUIT_Digest ``[-16, digest]`` as carried: the detached payload each signature signs."""
    severable: tuple[SeverableMember, ...] = ()
    """The manifest's severable members held as digests (inline members are not listed)."""
