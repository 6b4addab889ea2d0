"""Tenant-scoped storage operations: the only way the API touches the database.

Every function takes the caller's ``tenant_id`` and filters on it, so another tenant's object is
indistinguishable from a missing one (``NotFound``).  Functions run inside the caller's session;
``Database.session()`` commits on success and rolls back on any error, so nothing is half-stored.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from cryptography import x509
from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    case,
    false,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fwcm import filters, manifest, pki
from fwcm.devices import NewDevice
from fwcm.errors import Conflict, Invalid, NotFound, TooLarge
from fwcm.names import check_name
from fwcm.protocol import Result
from fwcm.rollout.launch import CampaignDraft, PhaseNamer, StartPlanner
from fwcm.store.models import (
    ApiKey,
    Campaign,
    CampaignEvent,
    Deployment,
    Device,
    DeviceEvent,
    Manifest,
    Payload,
    Signer,
    Tenant,
)

log = logging.getLogger(__name__)

CAMPAIGN_STATES = ("draft", "scheduled", "running", "paused", "completed", "cancelled", "stopped")
FINAL_CAMPAIGN_STATES = ("completed", "cancelled", "stopped")
DEPLOYMENT_STATES = (
    "pending",
    "invited",
    "notified",
    "downloading",
    "downloaded",
    "installing",
    "succeeded",
    "failed",
    "skipped",
    "timed_out",
    "cancelled",
    "declined",
    "no_answer",
)
TERMINAL_STATES = ("succeeded", "failed", "skipped", "timed_out", "cancelled", "declined", "no_answer")
API_KEY_PREFIX = "fwcm_"
_IN_CHUNK = 5000
BIGINT_MAX = 2**63 - 1
"""Largest value of a BIGINT column (ids, sequence numbers, sizes) on SQLite and PostgreSQL."""
_DEVICES = cast(Table, Device.__table__)


def now() -> datetime:
    return datetime.now(UTC)


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# -- tenants ----------------------------------------------------------------------------------


def create_tenant(s: Session, slug: str, name: str | None = None, kind: str = "fleet") -> tuple[Tenant, str]:
    """Create a tenant and its first API key; the plaintext key is returned only here."""
    check_name(slug, "tenant slug")
    if kind not in ("fleet", "manufacturer"):
        raise ValueError(f"tenant kind must be fleet or manufacturer, not {kind!r}")
    if s.scalar(select(Tenant.id).where(Tenant.slug == slug)) is not None:
        raise Conflict(f"tenant {slug!r} already exists")
    tenant = Tenant(slug=slug, name=name or slug, kind=kind)
    s.add(tenant)
    s.flush()
    key = add_api_key(s, tenant.id)
    log.info("created tenant %s (id %d)", slug, tenant.id)
    return tenant, key


def add_api_key(s: Session, tenant_id: int, label: str = "default") -> str:
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    s.add(ApiKey(tenant_id=tenant_id, key_hash=_hash_key(key), label=label))
    s.flush()
    return key


def tenant_for_key(s: Session, key: str) -> Tenant | None:
    if not key.startswith(API_KEY_PREFIX):
        return None
    return s.scalar(
        select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id).where(ApiKey.key_hash == _hash_key(key))
    )


def tenant_by_slug(s: Session, slug: str) -> Tenant | None:
    return s.scalar(select(Tenant).where(Tenant.slug == slug))


# -- signers ----------------------------------------------------------------------------------


def add_signer(
    s: Session,
    tenant_id: int,
    name: str,
    public_key_pem: str | bytes | None = None,
    *,
    cert_pem: str | bytes | None = None,
    root: x509.Certificate | None = None,
) -> Signer:
    """Trust a signer for this tenant's manifests: a bare public key, or a signer certificate that
    chains to the operator root through the tenant's CA (developer certificates carry the hardware
    IDs their builds may target). Raises ManifestError for a bad key, ChainError for a bad chain."""
    check_name(name, "signer name")
    cert_text: str | None = None
    hardware_ids: list[str] | None = None
    if cert_pem is not None:
        info = _signer_chain(s, tenant_id, cert_pem, root)
        key = info.public_key
        cert_text = pki.cert_pem(pki.load_cert(info.leaf_der)).decode()
        hardware_ids = list(info.hardware_ids) if info.hardware_ids is not None else None
    elif public_key_pem is not None:
        pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        key = manifest.load_public_key(pem)
    else:
        raise Invalid("a signer needs public_key_pem (a bare key) or cert_pem (a signer certificate)")
    kid = manifest.key_id(key).hex()
    for other in s.scalars(
        select(Signer).where(Signer.tenant_id == tenant_id, (Signer.name == name) | (Signer.key_id == kid))
    ):
        if other.name == name:
            raise Conflict(f"signer {name!r} already exists")
        raise Conflict(f"this key is already registered as signer {other.name!r}")
    signer = Signer(
        tenant_id=tenant_id,
        name=name,
        alg=manifest.key_alg(key),
        key_id=kid,
        public_key_pem=manifest.public_key_pem(key).decode(),
        cert_pem=cert_text,
        hardware_ids=hardware_ids,
    )
    s.add(signer)
    s.flush()
    return signer


def _signer_chain(
    s: Session, tenant_id: int, cert_pem: str | bytes, root: x509.Certificate | None
) -> pki.SignerInfo:
    """Validate a signer certificate (optionally followed by its CA) against root and tenant CA."""
    if root is None:
        raise Invalid("this server has no operator root CA configured (FWCM_PKI_ROOT)")
    tenant = s.get(Tenant, tenant_id)
    assert tenant is not None
    if not tenant.ca_cert_pem:
        raise Invalid(f"tenant {tenant.slug!r} has no CA registered; the operator issues one")
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    certs = pki.load_pem_chain(data)
    ca = pki.load_cert(tenant.ca_cert_pem.encode())
    if len(certs) > 1 and pki.cert_der(certs[1]) != pki.cert_der(ca):
        raise pki.ChainError("issuer_mismatch", "the certificate's CA is not this tenant's CA")
    info = pki.validate_chain([pki.cert_der(certs[0]), pki.cert_der(ca)], root)
    if info.tenant != tenant.slug:
        raise pki.ChainError("issuer_mismatch", f"certificate issued for tenant {info.tenant!r}")
    return info


def set_tenant_ca(s: Session, slug: str, ca_pem: str | bytes, root: x509.Certificate) -> Tenant:
    """Register the CA certificate the operator issued to a tenant (checked against the root)."""
    tenant = tenant_by_slug(s, slug)
    if tenant is None:
        raise NotFound(f"tenant {slug!r} not found")
    data = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
    ca = pki.load_pem_chain(data)[0]
    pki.check_tenant_ca(ca, root)
    if pki.tenant_of(ca) != slug:
        raise pki.ChainError("issuer_mismatch", f"CA issued for tenant {pki.tenant_of(ca)!r}, not {slug!r}")
    tenant.ca_cert_pem = pki.cert_pem(ca).decode()
    return tenant


def list_signers(s: Session, tenant_id: int) -> Sequence[Signer]:
    return s.scalars(select(Signer).where(Signer.tenant_id == tenant_id).order_by(Signer.id)).all()


def get_signer(s: Session, tenant_id: int, name: str) -> Signer:
    signer = s.scalar(select(Signer).where(Signer.tenant_id == tenant_id, Signer.name == name))
    if signer is None:
        raise NotFound(f"signer {name!r} not found")
    return signer


def revoke_signer(s: Session, tenant_id: int, name: str) -> tuple[Signer, list[int]]:
    """Stop trusting a signer: its manifests are refused from now on, and campaigns still
    delivering one are cancelled (devices get the revocation with the cancel notice and refuse
    the image if they have not installed it yet). Returns the signer and the cancelled campaigns."""
    signer = get_signer(s, tenant_id, name)
    cancelled: list[int] = []
    if signer.revoked_at is None:
        signer.revoked_at = now()
        active = s.scalars(
            select(Campaign)
            .join(Manifest, Manifest.id == Campaign.manifest_id)
            .where(
                Campaign.tenant_id == tenant_id,
                Manifest.signer_id == signer.id,
                Campaign.state.in_(("draft", "scheduled", "running", "paused")),
            )
        ).all()
        for c in active:
            change_campaign(s, tenant_id, c.id, "cancel", f"signer {name!r} revoked")
            cancelled.append(c.id)
    return signer, cancelled


# -- payloads ---------------------------------------------------------------------------------


def record_payload(
    s: Session, tenant_id: int, sha256: str, size: int, name: str | None = None
) -> tuple[Payload, bool]:
    """Record that the tenant owns a stored file; idempotent (returns ``created`` False)."""
    existing = s.scalar(select(Payload).where(Payload.tenant_id == tenant_id, Payload.sha256 == sha256))
    if existing is not None:
        return existing, False
    payload = Payload(tenant_id=tenant_id, sha256=sha256, size=size, name=name)
    try:
        with s.begin_nested():
            s.add(payload)
            s.flush()
    except IntegrityError:  # a concurrent upload of the same image won the race
        existing = s.scalar(select(Payload).where(Payload.tenant_id == tenant_id, Payload.sha256 == sha256))
        if existing is None:
            raise
        return existing, False
    return payload, True


def list_payloads(s: Session, tenant_id: int) -> Sequence[Payload]:
    return s.scalars(select(Payload).where(Payload.tenant_id == tenant_id).order_by(Payload.id)).all()


def get_payload(s: Session, tenant_id: int, sha256: str) -> Payload:
    payload = s.scalar(select(Payload).where(Payload.tenant_id == tenant_id, Payload.sha256 == sha256))
    if payload is None:
        raise NotFound(f"payload {sha256} not found")
    return payload


def payload_is_published(s: Session, sha256: str) -> bool:
    """Whether any tenant owns this image: devices fetch by digest without credentials."""
    return s.scalar(select(Payload.id).where(Payload.sha256 == sha256).limit(1)) is not None


# -- manifests --------------------------------------------------------------------------------


def upload_manifest(
    s: Session,
    tenant_id: int,
    data: bytes,
    *,
    max_bytes: int = 64 * 1024,
    name: str | None = None,
    root: x509.Certificate | None = None,
) -> tuple[Manifest, bool]:
    """Decode and verify an envelope against the tenant's trusted signers, then store it.

    An envelope carrying an ``x5chain`` is also checked like a device checks it: the chain must
    lead to the operator ``root`` through this tenant's CA. Raises ManifestError (malformed),
    SignatureError (not signed by a registered, unrevoked signer) or ChainError (bad chain).
    Uploading the same manifest twice returns the stored one with ``created`` False.
    """
    if len(data) > max_bytes:
        raise TooLarge(f"manifest of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    env = manifest.decode_envelope(data)
    if any(sig.x5chain for sig in env.signatures):
        if root is None:
            raise Invalid("manifest carries a certificate chain but no operator root CA is configured")
        certified = pki.verify_manifest(env, root)
        slug = s.scalar(select(Tenant.slug).where(Tenant.id == tenant_id))
        if certified.tenant != slug:
            raise pki.ChainError("issuer_mismatch", f"signed under the CA of tenant {certified.tenant!r}")
    all_signers = list(s.scalars(select(Signer).where(Signer.tenant_id == tenant_id)))
    signers = [sg for sg in all_signers if sg.revoked_at is None]
    revoked = {bytes.fromhex(sg.key_id): sg.name for sg in all_signers if sg.revoked_at is not None}
    for sig in env.signatures:
        if sig.kid in revoked:
            raise manifest.SignatureError(f"signed by revoked signer {revoked[sig.kid]!r}")
    if not signers:
        raise manifest.SignatureError("no trusted signers registered; add one with `fwcm signer add`")
    keys = {}
    for sg in signers:
        keys[sg.key_id] = (sg, manifest.load_public_key(sg.public_key_pem.encode()))
    verified = manifest.verify_envelope(env, [k for _, k in keys.values()])
    signer = keys[manifest.key_id(verified).hex()][0]
    info = env.info
    for what, value in (("sequence number", info.sequence), ("image size", info.image_size)):
        if value > BIGINT_MAX:
            raise Invalid(f"manifest refused: its {what} {value} exceeds the largest storable, {BIGINT_MAX}")
    digest = env.digest.hex()
    existing = s.scalar(select(Manifest).where(Manifest.tenant_id == tenant_id, Manifest.digest == digest))
    if existing is not None:
        return existing, False
    row = Manifest(
        tenant_id=tenant_id,
        digest=digest,
        sequence=info.sequence,
        vendor_id=str(info.vendor_id),
        class_id=str(info.class_id),
        image_digest=info.image_digest.hex(),
        image_size=info.image_size,
        uris=list(info.uris),
        envelope=bytes(data),
        signer_id=signer.id,
        name=name,
    )
    s.add(row)
    s.flush()
    log.info("tenant %d stored manifest %d (sequence %d)", tenant_id, row.id, info.sequence)
    return row, True


def list_manifests(s: Session, tenant_id: int) -> Sequence[Manifest]:
    return s.scalars(select(Manifest).where(Manifest.tenant_id == tenant_id).order_by(Manifest.id)).all()


def get_manifest(s: Session, tenant_id: int, manifest_id: int) -> Manifest:
    row = s.scalar(select(Manifest).where(Manifest.tenant_id == tenant_id, Manifest.id == manifest_id))
    if row is None:
        raise NotFound(f"manifest {manifest_id} not found")
    return row


def signer_name(s: Session, tenant_id: int, signer_id: int | None) -> str | None:
    if signer_id is None:
        return None
    return s.scalar(select(Signer.name).where(Signer.tenant_id == tenant_id, Signer.id == signer_id))


# -- devices ----------------------------------------------------------------------------------


def _device_row(tenant_id: int, dev: NewDevice) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "name": dev.name,
        "vendor_id": dev.vendor_id,
        "class_id": dev.class_id,
        "tags": dev.tags,
        "sequence": dev.sequence,
        "version": dev.version,
        "transport": dev.transport,
        "hardware_id": dev.hardware_id,
        "secret": dev.secret,
        "attest_key_pem": dev.attest_key_pem,
        "online": False,
    }


def register_device(s: Session, tenant_id: int, dev: NewDevice) -> Device:
    if s.scalar(select(Device.id).where(Device.tenant_id == tenant_id, Device.name == dev.name)) is not None:
        raise Conflict(f"device {dev.name!r} already exists")
    device = Device(**_device_row(tenant_id, dev))
    s.add(device)
    s.flush()
    return device


def import_devices(s: Session, tenant_id: int, devices: list[NewDevice]) -> int:
    """Insert validated devices in one transaction; any clash refuses the whole batch."""
    names = [d.name for d in devices]
    clashes: list[str] = []
    for i in range(0, len(names), _IN_CHUNK):
        chunk = names[i : i + _IN_CHUNK]
        clashes.extend(
            s.scalars(select(Device.name).where(Device.tenant_id == tenant_id, Device.name.in_(chunk)))
        )
    if clashes:
        clashes.sort()
        shown = ", ".join(repr(n) for n in clashes[:5])
        extra = f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
        raise Conflict(f"nothing imported: {len(clashes)} device(s) already exist: {shown}{extra}")
    if devices:
        batch = 10000
        for i in range(0, len(devices), batch):
            s.execute(insert(_DEVICES), [_device_row(tenant_id, d) for d in devices[i : i + batch]])
    log.info("tenant %d imported %d devices", tenant_id, len(devices))
    return len(devices)


def get_device(s: Session, tenant_id: int, name: str) -> Device:
    device = s.scalar(select(Device).where(Device.tenant_id == tenant_id, Device.name == name))
    if device is None:
        raise NotFound(f"device {name!r} not found")
    return device


def list_devices(
    s: Session, tenant_id: int, filter_text: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[int, Sequence[Device]]:
    """Devices matching a filter (raises FilterError) and the total number matching."""
    cond = and_(Device.tenant_id == tenant_id, filter_clause(filters.parse(filter_text)))
    total = s.scalar(select(func.count()).select_from(Device).where(cond)) or 0
    rows = s.scalars(select(Device).where(cond).order_by(Device.name).limit(limit).offset(offset)).all()
    return total, rows


def device_history(s: Session, tenant_id: int, name: str, limit: int = 100) -> Sequence[DeviceEvent]:
    device = get_device(s, tenant_id, name)
    return s.scalars(
        select(DeviceEvent)
        .where(DeviceEvent.tenant_id == tenant_id, DeviceEvent.device_id == device.id)
        .order_by(DeviceEvent.id.desc())
        .limit(limit)
    ).all()


# -- filter compilation -----------------------------------------------------------------------

_ATTR_COLUMNS: dict[str, Any] = {
    "vendor": Device.vendor_id,
    "class": Device.class_id,
    "name": Device.name,
    "version": Device.version,
    "transport": Device.transport,
    "hardware_id": Device.hardware_id,
    "sequence": Device.sequence,
}
_NULLABLE = {"version", "hardware_id"}


def _column(field: str) -> Any:
    if filters.is_tag(field):
        return Device.tags[filters.tag_key(field)].as_string()
    return _ATTR_COLUMNS[field]


def _nullable(field: str) -> bool:
    return filters.is_tag(field) or field in _NULLABLE


def filter_clause(node: filters.Node) -> ColumnElement[bool]:
    """Compile a filter AST to a boolean SQL expression over ``Device`` (never NULL-valued).

    A missing tag or unset attribute is unequal to everything: positive tests are guarded with
    ``IS NOT NULL`` and negative ones accept NULL, so ``not`` behaves like plain boolean logic.
    """
    if isinstance(node, filters.All):
        return true()
    if isinstance(node, filters.And):
        return and_(*(filter_clause(i) for i in node.items))
    if isinstance(node, filters.Or):
        return or_(*(filter_clause(i) for i in node.items))
    if isinstance(node, filters.Not):
        return not_(filter_clause(node.item))
    col = _column(node.field)
    nullable = _nullable(node.field)
    if isinstance(node, filters.Exists):
        return col.is_not(None) if nullable else true()
    if isinstance(node, filters.In):
        if not node.values:
            return true() if node.negated else false()
        if node.negated:
            expr = col.not_in(list(node.values))
            return or_(col.is_(None), expr) if nullable else expr
        expr = col.in_(list(node.values))
        return and_(col.is_not(None), expr) if nullable else expr
    assert isinstance(node, filters.Compare)
    value = node.value
    ops: dict[str, Any] = {
        "==": col.__eq__,
        "!=": col.__ne__,
        "<": col.__lt__,
        "<=": col.__le__,
        ">": col.__gt__,
        ">=": col.__ge__,
    }
    expr = ops[node.op](value)
    if not nullable:
        return expr
    if node.op == "!=":
        return or_(col.is_(None), expr)
    return and_(col.is_not(None), expr)


# -- campaigns --------------------------------------------------------------------------------


def create_campaign(s: Session, tenant_id: int, manifest_id: int, draft: CampaignDraft) -> Campaign:
    """Store a checked draft; its manifest and consent variants must be manifests of this tenant."""
    for value, variant in draft.variants.items():
        try:
            get_manifest(s, tenant_id, variant)
        except NotFound:
            raise Invalid(f"consent.variants.{value}: manifest {variant} not found") from None
    try:
        get_manifest(s, tenant_id, manifest_id)
    except NotFound:
        raise Invalid(f"manifest {manifest_id} not found") from None
    campaign = Campaign(
        tenant_id=tenant_id,
        name=draft.name,
        manifest_id=manifest_id,
        filter=draft.filter,
        policy=draft.policy,
        attestation=draft.attestation,
        consent=draft.consent,
        state="draft",
        phase=0,
        total=0,
    )
    s.add(campaign)
    s.flush()
    _campaign_event(s, campaign, "draft", None)
    return campaign


def list_campaigns(s: Session, tenant_id: int, state: str | None = None) -> Sequence[Campaign]:
    q = select(Campaign).where(Campaign.tenant_id == tenant_id)
    if state:
        q = q.where(Campaign.state == state)
    return s.scalars(q.order_by(Campaign.id)).all()


def get_campaign(s: Session, tenant_id: int, campaign_id: int, *, lock: bool = False) -> Campaign:
    q = select(Campaign).where(Campaign.tenant_id == tenant_id, Campaign.id == campaign_id)
    if lock:
        q = q.with_for_update()
    campaign = s.scalar(q)
    if campaign is None:
        raise NotFound(f"campaign {campaign_id} not found")
    return campaign


def _campaign_event(s: Session, campaign: Campaign, state: str, reason: str | None) -> None:
    s.add(
        CampaignEvent(
            tenant_id=campaign.tenant_id, campaign_id=campaign.id, at=now(), state=state, reason=reason
        )
    )


def start_campaign(s: Session, tenant_id: int, campaign_id: int, plan: StartPlanner) -> Campaign:
    """Freeze the matching devices into deployments with one INSERT … SELECT and start running.

    ``plan`` (``rollout.launch.start_plan``) reads the stored policy: the phase of each device by
    its rank, and the state the campaign enters.
    """
    campaign = get_campaign(s, tenant_id, campaign_id, lock=True)
    if campaign.state not in ("draft", "scheduled"):
        raise Conflict(
            f"campaign {campaign_id} is {campaign.state}; only a draft or scheduled campaign can start"
        )
    cond = and_(Device.tenant_id == tenant_id, filter_clause(filters.parse(campaign.filter)))
    _check_signer_scope(s, campaign, cond)
    matching = s.scalar(select(func.count()).select_from(Device).where(cond)) or 0
    planned = plan(campaign.policy, matching, time.time())
    bounds = planned.bounds
    # Phases by device order: rank < bounds[0] -> phase 0, < bounds[1] -> phase 1, ...
    rank = func.row_number().over(order_by=Device.id) - 1
    whens = [(rank < b, i) for i, b in enumerate(bounds[:-1])]
    phase = case(*whens, else_=len(bounds) - 1) if whens else literal(0)
    source = select(
        literal(campaign.id),
        Device.id,
        literal(tenant_id),
        literal("pending"),
        literal(0),
        phase,
        literal(0),
        literal(-1),
    ).where(cond)
    stmt = insert(Deployment).from_select(
        ["campaign_id", "device_id", "tenant_id", "state", "result", "phase", "attempt", "last_seq"],
        source,
    )
    result = s.execute(stmt)
    total = result.rowcount  # type: ignore[attr-defined]
    if total is None or total < 0:
        total = s.scalar(select(func.count()).where(Deployment.campaign_id == campaign.id)) or 0
    campaign.total = total
    if s.get_bind().dialect.name == "postgresql":
        # fresh rows: without statistics the planner scans pending rows once per notice batch
        s.execute(text("ANALYZE deployments"))
    campaign.state = planned.state
    campaign.phase = 0
    campaign.started_at = now()
    _campaign_event(s, campaign, campaign.state, f"started with {total} devices")
    s.flush()
    log.info("campaign %d started over %d devices", campaign.id, total)
    return campaign


def _check_signer_scope(s: Session, campaign: Campaign, cond: ColumnElement[bool]) -> None:
    """A revoked signer's manifest never starts; a developer build targets listed hardware only."""
    signer = s.scalar(
        select(Signer)
        .join(Manifest, Manifest.signer_id == Signer.id)
        .where(Manifest.id == campaign.manifest_id)
    )
    if signer is None:
        return
    if signer.revoked_at is not None:
        raise Conflict(f"the manifest's signer {signer.name!r} is revoked")
    if signer.hardware_ids is None:
        return
    listed = [str(h) for h in signer.hardware_ids]
    unlisted = (
        s.execute(
            select(Device.name)
            .where(cond, or_(Device.hardware_id.is_(None), Device.hardware_id.notin_(listed)))
            .order_by(Device.id)
        )
        .scalars()
        .all()
    )
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (" …" if len(unlisted) > 5 else "")
        raise Conflict(
            f"developer build of signer {signer.name!r} may only target its {len(listed)} listed "
            f"hardware IDs; {len(unlisted)} targeted devices are not listed ({shown}); "
            'narrow the filter, e.g. hardware_id in ["…", "…"]'
        )


_TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "pause": (("running", "scheduled"), "paused"),
    "resume": (("paused",), "running"),
    "cancel": (("draft", "scheduled", "running", "paused"), "cancelled"),
}


def change_campaign(
    s: Session, tenant_id: int, campaign_id: int, action: str, reason: str | None = None
) -> Campaign:
    """Pause, resume or cancel; the engine notices the new state and acts on the devices."""
    allowed, target = _TRANSITIONS[action]
    campaign = get_campaign(s, tenant_id, campaign_id, lock=True)
    if campaign.state not in allowed:
        raise Conflict(
            f"campaign {campaign_id} is {campaign.state}; {action} needs a campaign that is "
            + " or ".join(allowed)
        )
    if action == "resume" and campaign.started_at is None:
        raise Conflict(f"campaign {campaign_id} was never started; use start")
    campaign.state = target
    if reason:
        campaign.stop_reason = reason
    _campaign_event(s, campaign, target, reason or f"{action} requested")
    s.flush()
    return campaign


def campaign_stats(s: Session, tenant_id: int, campaign_id: int, phase_names: PhaseNamer) -> dict[str, Any]:
    """Counts per deployment state and the most common failure results; ``phase_names``
    (``rollout.launch.phase_names``) labels the phases of the stored policy."""
    campaign = get_campaign(s, tenant_id, campaign_id)
    counts = dict.fromkeys(DEPLOYMENT_STATES, 0)
    for state, n in s.execute(
        select(Deployment.state, func.count())
        .where(Deployment.tenant_id == tenant_id, Deployment.campaign_id == campaign_id)
        .group_by(Deployment.state)
    ):
        counts[state] = n
    phases: dict[int, dict[str, int]] = {}
    for phase, state, n in s.execute(
        select(Deployment.phase, Deployment.state, func.count())
        .where(Deployment.tenant_id == tenant_id, Deployment.campaign_id == campaign_id)
        .group_by(Deployment.phase, Deployment.state)
    ):
        phases.setdefault(phase, {})[state] = n
    failures = []
    for code, n in s.execute(
        select(Deployment.result, func.count())
        .where(
            Deployment.tenant_id == tenant_id,
            Deployment.campaign_id == campaign_id,
            Deployment.state.in_(("failed", "timed_out", "skipped")),
        )
        .group_by(Deployment.result)
        .order_by(func.count().desc())
    ):
        failures.append({"result": code, "name": _result_name(code), "count": n})
    # Throughput: devices that reached a terminal state in the last minute; ETA from that pace.
    recent = (
        s.scalar(
            select(func.count()).where(
                Deployment.campaign_id == campaign_id,
                Deployment.state.in_(TERMINAL_STATES),
                Deployment.updated_at >= now() - timedelta(seconds=60),
            )
        )
        or 0
    )
    remaining = sum(n for st, n in counts.items() if st not in TERMINAL_STATES)
    return {
        "id": campaign.id,
        "name": campaign.name,
        "state": campaign.state,
        "stop_reason": campaign.stop_reason,
        "note": campaign.note,
        "phase": campaign.phase,
        "total": campaign.total,
        "counts": counts,
        "phases": {str(k): v for k, v in sorted(phases.items())},
        "phase_names": phase_names(campaign.policy),
        "per_minute": recent,
        "eta_s": round(60.0 * remaining / recent, 1) if recent and campaign.state == "running" else None,
        "failures": failures,
        "started_at": campaign.started_at,
        "finished_at": campaign.finished_at,
        "consent": _consent_stats(campaign, counts, s) if campaign.consent is not None else None,
    }


def _consent_stats(campaign: Campaign, counts: dict[str, int], s: Session) -> dict[str, Any]:
    accepted = s.scalar(
        select(func.count()).where(Deployment.campaign_id == campaign.id, Deployment.choice.is_not(None))
    )
    return {
        "stage": campaign.consent_stage,
        "invited": counts.get("invited", 0),
        "accepted": int(accepted or 0),
        "declined": counts.get("declined", 0),
        "no_answer": counts.get("no_answer", 0),
        "group_decision": campaign.group_decision,
        "quorum": campaign.consent.get("quorum") if campaign.consent else None,
    }


def _result_name(code: int) -> str:
    try:
        return Result(code).name.lower()
    except ValueError:
        return f"code_{code}"


def campaign_devices(
    s: Session,
    tenant_id: int,
    campaign_id: int,
    state: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[int, list[dict[str, Any]]]:
    """Deployments of a campaign (optionally in one state) with their device names."""
    get_campaign(s, tenant_id, campaign_id)
    if state is not None and state not in DEPLOYMENT_STATES:
        raise Invalid(f"unknown state {state!r}; one of {', '.join(DEPLOYMENT_STATES)}")
    cond = [Deployment.tenant_id == tenant_id, Deployment.campaign_id == campaign_id]
    if state is not None:
        cond.append(Deployment.state == state)
    total = s.scalar(select(func.count()).select_from(Deployment).where(*cond)) or 0
    rows = s.execute(
        select(Deployment, Device.name)
        .join(Device, Device.id == Deployment.device_id)
        .where(*cond)
        .order_by(Device.name)
        .limit(limit)
        .offset(offset)
    ).all()
    out = [
        {
            "device": name,
            "state": d.state,
            "result": d.result,
            "result_name": _result_name(d.result),
            "detail": d.detail,
            "phase": d.phase,
            "attempt": d.attempt,
            "progress": d.progress,
            "notified_at": d.notified_at,
            "updated_at": d.updated_at,
        }
        for d, name in rows
    ]
    return total, out


def campaign_events(s: Session, tenant_id: int, campaign_id: int) -> Sequence[CampaignEvent]:
    get_campaign(s, tenant_id, campaign_id)
    return s.scalars(
        select(CampaignEvent)
        .where(CampaignEvent.tenant_id == tenant_id, CampaignEvent.campaign_id == campaign_id)
        .order_by(CampaignEvent.id)
    ).all()


def join_new_devices(s: Session, campaign_id: int, tenant_id: int, phase: int) -> int:
    """Dynamic membership: add devices that match the campaign's filter but are not in it yet."""
    campaign = get_campaign(s, tenant_id, campaign_id)
    cond = and_(
        Device.tenant_id == tenant_id,
        filter_clause(filters.parse(campaign.filter)),
        ~select(Deployment.device_id)
        .where(Deployment.campaign_id == campaign_id, Deployment.device_id == Device.id)
        .exists(),
    )
    source = select(
        literal(campaign_id),
        Device.id,
        literal(tenant_id),
        literal("pending"),
        literal(0),
        literal(phase),
        literal(0),
        literal(-1),
    ).where(cond)
    added = len(
        s.execute(
            insert(Deployment)
            .from_select(
                ["campaign_id", "device_id", "tenant_id", "state", "result", "phase", "attempt", "last_seq"],
                source,
            )
            .returning(Deployment.device_id)
        ).all()
    )
    if added:
        campaign.total += added
        _campaign_event(s, campaign, campaign.state, f"{added} newly registered devices joined")
        log.info("campaign %d: %d newly registered devices joined", campaign_id, added)
    return added
