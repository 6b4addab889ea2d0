"""Device attestation, install tokens and installation credentials (sans-IO).

Three objects prove who may do what:

* **evidence** — signed by the device's attestation key: ``{1: nonce, 2: device, 3: installed
  image digest, 4: manifest digest}``. The nonce comes from the server in the update notice and
  is single-use, so evidence cannot be replayed.
* **install token** — 36 bytes MAC'd by the server: ``expires`` (uint32), ``campaign``
  (uint64), the first 4 bytes of SHA-256 of ``tenant/device`` and of the image digest (so a
  refusal can say which is wrong), then the first 16 bytes of HMAC-SHA256 over ``tenant/device``,
  the image digest and those 20 bytes. Only the server checks a token, so a MAC does what a
  signature would in a fifth of the size: a token travels in a payload URI's query (``t=``),
  where it must fit a CoAP Uri-Query option and the small buffers of constrained clients.
  Payload endpoints of an attested campaign serve only to a request carrying a valid token for
  that device and image.
* **credential** — signed by the server after a successful install: ``{1: tenant, 2: device,
  3: manifest digest, 4: image digest, 5: sequence, 6: installed at, 7: campaign}``. The device
  keeps it as proof of what it installed and from whom.

Evidence and credentials are COSE_Sign1 (tag 18, ES256 or EdDSA by key type) around a map with
small integer keys. Every check raises :class:`AttestationError` whose ``reason`` is a short
metric label.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import cbor2
from cryptography.hazmat.primitives import serialization

from fwcm.manifest import cose
from fwcm.manifest.keys import PrivateKey, PublicKey, key_id, load_public_key
from fwcm.protocol import REPORT_EVIDENCE, Report

NONCE_BYTES = 16
MAX_OBJECT_BYTES = 1024
TOKEN_TTL_S = 300
"""Install tokens are short-lived: long enough to download, too short to hoard."""
NONCE_TTL_S = 600
"""A nonce not answered within this time is stale."""

_EV_NONCE, _EV_DEVICE, _EV_IMAGE, _EV_MANIFEST = 1, 2, 3, 4
"""Claims of evidence."""
_CR_TENANT, _CR_DEVICE, _CR_MANIFEST, _CR_IMAGE, _CR_SEQUENCE, _CR_INSTALLED_AT, _CR_CAMPAIGN = range(1, 8)
"""Claims of an installation credential."""


class AttestationError(ValueError):
    """Evidence, a token or a credential that must be refused; ``reason`` names why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- COSE_Sign1 -------------------------------------------------------------------------------


def sign1(key: PrivateKey, claims: Mapping[int, Any], *, kid: bool = True) -> bytes:
    """Sign ``claims`` with ``key`` into a tagged COSE_Sign1, carrying the key id unless ``kid``
    is false (the verifier tries each of its keys)."""
    protected = cbor2.dumps({cose.HDR_ALG: cose.alg_for(key)})
    payload = cbor2.dumps(dict(claims), canonical=True)
    signature = cose.sign(key, cose.to_be_signed(protected, payload))
    unprotected = {cose.HDR_KID: key_id(key)} if kid else {}
    return cbor2.dumps(cbor2.CBORTag(cose.COSE_SIGN1_TAG, [protected, unprotected, payload, signature]))


def open_sign1(data: bytes, keys: Iterable[PublicKey]) -> dict[int, Any]:
    """Verify a COSE_Sign1 against any of ``keys`` and return its claims map."""
    if not isinstance(data, bytes) or len(data) > MAX_OBJECT_BYTES:
        raise AttestationError("malformed", "signed object missing or too large")
    try:
        obj = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types on garbage; all mean the same here
        raise AttestationError("malformed", f"not CBOR: {exc}") from None
    if isinstance(obj, cbor2.CBORTag) and obj.tag == cose.COSE_SIGN1_TAG:
        obj = obj.value
    if not (isinstance(obj, list | tuple) and len(obj) == 4):
        raise AttestationError("malformed", "not a COSE_Sign1 array")
    protected, _unprotected, payload, signature = obj
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)):
        raise AttestationError("malformed", "COSE_Sign1 fields have wrong types")
    try:
        headers = cbor2.loads(protected)
        claims = cbor2.loads(payload)
    except Exception:
        raise AttestationError("malformed", "COSE_Sign1 header or payload is not CBOR") from None
    if not isinstance(headers, Mapping) or not isinstance(claims, Mapping):
        raise AttestationError("malformed", "COSE_Sign1 header or payload is not a map")
    tbs = cose.to_be_signed(protected, payload)
    if not any(cose.verify(k, headers.get(cose.HDR_ALG, 0), signature, tbs) for k in keys):
        raise AttestationError("bad_signature", "signature does not verify with the expected key")
    return dict(claims)


def _bytes(claims: Mapping[int, Any], k: int) -> bytes:
    v = claims.get(k)
    if not isinstance(v, bytes):
        raise AttestationError("malformed", f"claim {k} must be bytes")
    return v


def _text(claims: Mapping[int, Any], k: int) -> str:
    v = claims.get(k)
    if not isinstance(v, str):
        raise AttestationError("malformed", f"claim {k} must be text")
    return v


def _int(claims: Mapping[int, Any], k: int) -> int:
    v = claims.get(k)
    if not isinstance(v, int) or isinstance(v, bool):
        raise AttestationError("malformed", f"claim {k} must be an integer")
    return v


# -- evidence ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """What a device attests: the server's nonce, its name, what it runs, what it is to install."""

    nonce: bytes
    device: str
    image_digest: bytes
    manifest_digest: bytes

    def to_claims(self) -> dict[int, Any]:
        return {
            _EV_NONCE: self.nonce,
            _EV_DEVICE: self.device,
            _EV_IMAGE: self.image_digest,
            _EV_MANIFEST: self.manifest_digest,
        }

    @classmethod
    def from_claims(cls, claims: Mapping[int, Any]) -> Evidence:
        return cls(
            _bytes(claims, _EV_NONCE),
            _text(claims, _EV_DEVICE),
            _bytes(claims, _EV_IMAGE),
            _bytes(claims, _EV_MANIFEST),
        )


def make_evidence(key: PrivateKey, ev: Evidence) -> bytes:
    """What a device sends to prove itself before it is given an install token."""
    return sign1(key, ev.to_claims())


def check_evidence(
    data: bytes,
    key: PublicKey | None,
    *,
    device: str,
    nonce: bytes | None,
    nonce_age_s: float | None,
    manifest_digest: bytes,
) -> Evidence:
    """Verify evidence against the device's registered key and the deployment's current nonce.

    ``nonce`` is None once the nonce was used (or never issued): evidence then counts as replayed.
    """
    if key is None:
        raise AttestationError("no_key", f"device {device!r} has no registered attestation key")
    claims = open_sign1(data, [key])
    ev = Evidence.from_claims(claims)
    if ev.device != device:
        raise AttestationError("wrong_device", f"evidence names {ev.device!r}, sent by {device!r}")
    if nonce is None:
        raise AttestationError("replayed", "no nonce outstanding: evidence replayed or unsolicited")
    if ev.nonce != nonce:
        raise AttestationError("stale_nonce", "evidence answers a nonce that is not the current one")
    if nonce_age_s is not None and nonce_age_s > NONCE_TTL_S:
        raise AttestationError("expired", f"nonce is {nonce_age_s:.0f} s old (limit {NONCE_TTL_S} s)")
    if ev.manifest_digest != manifest_digest:
        raise AttestationError("wrong_manifest", "evidence is for another manifest")
    return ev


class Awaiting(NamedTuple):
    """A deployment of an attested campaign as stored, which a device's evidence is judged against."""

    attempt: int
    last_seq: int
    notified: bool
    """Only a notified deployment (not yet downloading) may attest."""
    nonce: bytes | None
    nonce_age_s: float | None
    key_pem: str | None
    """The device's registered attestation key (PEM), if any."""
    tenant: str
    device: str
    manifest_digest: bytes
    image_digest: bytes


class Verdict(NamedTuple):
    """Evidence judged: a ``grant`` for an install token, or the ``refusal``."""

    campaign: int
    device_pk: int
    attempt: int
    seq: int
    grant: Grant | None
    refusal: AttestationError | None


def judge_evidence(
    awaiting: Mapping[tuple[int, int], Awaiting], evidence: Iterable[tuple[int, Report]], now: float
) -> list[Verdict]:
    """Judge evidence reports, ``(device row id, report)``, against their deployments
    (``awaiting`` by (campaign, device row id)), in seq order.

    Duplicates (seq already applied), evidence for an attempt no longer current and evidence for a
    deployment past ``notified`` are ignored; after a refusal, later evidence of the same
    deployment in the batch finds nothing to judge.
    """
    pending = dict(awaiting)
    out: list[Verdict] = []
    for device_pk, report in sorted(evidence, key=lambda e: e[1].seq):
        key = (report.campaign, device_pk)
        a = pending.get(key)
        if a is None or a.attempt != report.attempt or a.last_seq >= report.seq or not a.notified:
            continue
        data = report.extra.get(REPORT_EVIDENCE)
        try:
            public = load_public_key(a.key_pem.encode()) if a.key_pem else None
            check_evidence(
                data if isinstance(data, bytes) else b"",
                public,
                device=a.device,
                nonce=a.nonce,
                nonce_age_s=a.nonce_age_s,
                manifest_digest=a.manifest_digest,
            )
        except AttestationError as err:
            out.append(Verdict(report.campaign, device_pk, a.attempt, report.seq, None, err))
            del pending[key]
            continue
        grant = Grant(
            a.tenant,
            a.device,
            a.manifest_digest,
            a.image_digest,
            report.campaign,
            expires=int(now) + TOKEN_TTL_S,
        )
        out.append(Verdict(report.campaign, device_pk, a.attempt, report.seq, grant, None))
    return out


# -- install tokens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """What an install token or a credential says: who may fetch or has installed what."""

    tenant: str
    device: str
    manifest_digest: bytes
    image_digest: bytes
    campaign: int
    expires: int = 0
    sequence: int = 0
    installed_at: int = 0


_TOKEN = struct.Struct(">IQ4s4s")
TOKEN_TAG_BYTES = 16
TOKEN_BYTES = _TOKEN.size + TOKEN_TAG_BYTES
_TOKEN_KEY_LABEL = b"fwcm install token key v1"


def token_key(signing_key: PrivateKey) -> bytes:
    """The MAC key of install tokens, derived from the server's signing key (every replica has
    it, so every replica checks every token)."""
    raw = signing_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return hmac.digest(raw, _TOKEN_KEY_LABEL, "sha256")


def _subject(tenant: str, device: str) -> bytes:
    return f"{tenant}/{device}".encode()


def _token_tag(key: bytes, subject: bytes, image_digest: bytes, body: bytes) -> bytes:
    return hmac.digest(key, subject + b"\0" + image_digest + body, "sha256")[:TOKEN_TAG_BYTES]


def issue_token(key: bytes, g: Grant) -> bytes:
    """An install token for ``g.tenant/g.device`` to fetch ``g.image_digest`` until ``g.expires``."""
    subject = _subject(g.tenant, g.device)
    body = _TOKEN.pack(g.expires, g.campaign, hashlib.sha256(subject).digest()[:4], g.image_digest[:4])
    return body + _token_tag(key, subject, g.image_digest, body)


def check_token(
    data: bytes, keys: Iterable[bytes], *, tenant: str, device: str, image_digest: bytes, now: float
) -> Grant:
    """Verify an install token for a fetch of ``image_digest`` by ``tenant/device``."""
    if not isinstance(data, bytes) or len(data) != TOKEN_BYTES:
        raise AttestationError("malformed", f"an install token has {TOKEN_BYTES} bytes")
    body, tag = data[: _TOKEN.size], data[_TOKEN.size :]
    expires, campaign, subject_hint, image_hint = _TOKEN.unpack(body)
    subject = _subject(tenant, device)
    if subject_hint != hashlib.sha256(subject).digest()[:4]:
        raise AttestationError("wrong_device", f"token of another device presented by {tenant}/{device}")
    if image_hint != image_digest[:4]:
        raise AttestationError("wrong_payload", "token is for another image")
    if not any(hmac.compare_digest(_token_tag(k, subject, image_digest, body), tag) for k in keys):
        raise AttestationError("bad_signature", "token was not issued by this server")
    if now >= expires:
        raise AttestationError("expired", f"token expired {now - expires:.0f} s ago")
    return Grant(tenant, device, b"", image_digest, campaign, expires=expires)


# -- installation credentials -----------------------------------------------------------------


def issue_credential(key: PrivateKey, g: Grant) -> bytes:
    return sign1(
        key,
        {
            _CR_TENANT: g.tenant,
            _CR_DEVICE: g.device,
            _CR_MANIFEST: g.manifest_digest,
            _CR_IMAGE: g.image_digest,
            _CR_SEQUENCE: g.sequence,
            _CR_INSTALLED_AT: g.installed_at,
            _CR_CAMPAIGN: g.campaign,
        },
    )


def read_credential(data: bytes, keys: Iterable[PublicKey]) -> Grant:
    claims = open_sign1(data, keys)
    return Grant(
        _text(claims, _CR_TENANT),
        _text(claims, _CR_DEVICE),
        _bytes(claims, _CR_MANIFEST),
        _bytes(claims, _CR_IMAGE),
        _int(claims, _CR_CAMPAIGN),
        sequence=_int(claims, _CR_SEQUENCE),
        installed_at=_int(claims, _CR_INSTALLED_AT),
    )


# -- transport helpers ------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise AttestationError("malformed", "token is not base64url") from None
