"""Queries of the campaign engine and report ingest: set-based, one transaction per call."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Row,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from fwcm import attestation
from fwcm.attestation import NONCE_BYTES, Grant
from fwcm.manifest import generate_private_key, load_public_key, private_key_pem
from fwcm.protocol import (
    REPORT_EVIDENCE,
    REPORT_FIRMWARE_NAME,
    REPORT_FIRMWARE_VERSION,
    Report,
    Result,
)
from fwcm.rollout.deployment import Applied, DeploymentView, Expired, Silent
from fwcm.rollout.states import DEVICE_TERMINAL, IN_PROGRESS, CampaignState, DeviceState
from fwcm.store.db import execute_many
from fwcm.store.models import (
    Campaign,
    CampaignEvent,
    Deployment,
    Device,
    DeviceEvent,
    Manifest,
    ServerKey,
    Signer,
    Tenant,
)

_EVENTS = cast(Table, DeviceEvent.__table__)
_DEPLOYMENTS = cast(Table, Deployment.__table__)
_DEVICES = cast(Table, Device.__table__)
HISTORY_PER_DEVICE = 50
"""Device history kept per device; older events are trimmed (bounded growth)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DeviceKey:
    device_pk: int
    tenant_id: int
    secret: bytes


@dataclass(frozen=True)
class Target:
    """A device about to receive a notice for one campaign attempt."""

    device_pk: int
    tenant: str
    name: str
    transport: str
    secret: bytes
    attempt: int
    nonce: bytes | None = None
    """Outstanding attestation nonce (attested campaigns, before the device attested)."""
    attested: bool = False
    """The device attested for this attempt: its notice carries an install token."""
    manifest_id: int | None = None
    """Consent campaigns with variants: this device's manifest (None: the campaign's)."""


@dataclass(frozen=True)
class LeasedCampaign:
    id: int
    tenant_id: int
    state: str
    policy: dict[str, object]
    manifest_id: int
    phase: int
    attestation: bool = False
    consent: dict[str, object] | None = None
    consent_stage: str | None = None
    started_at: datetime | None = None
    granted_at: datetime | None = None
    group_decision: str | None = None
    name: str = ""


_LEASE_COLUMNS = (
    Campaign.id,
    Campaign.tenant_id,
    Campaign.state,
    Campaign.policy,
    Campaign.manifest_id,
    Campaign.phase,
    Campaign.attestation,
    Campaign.consent,
    Campaign.consent_stage,
    Campaign.started_at,
    Campaign.granted_at,
    Campaign.group_decision,
    Campaign.name,
)


_ACTIVE = (CampaignState.RUNNING.value, CampaignState.PAUSED.value, CampaignState.SCHEDULED.value)
"""Campaign states the engine works on."""


def lease_campaigns(s: Session, owner: str, lease_s: float) -> list[LeasedCampaign]:
    """Take (or renew) the lease of every active campaign no other live replica holds."""
    now = utcnow()
    claimable = and_(
        Campaign.state.in_(_ACTIVE),
        or_(Campaign.lease_owner.is_(None), Campaign.lease_owner == owner, Campaign.lease_until < now),
    )
    where = _skip_locked(s, claimable)
    if where is None:
        return []
    rows = s.execute(
        update(Campaign)
        .where(where)
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_s))
        .returning(*_LEASE_COLUMNS)
    ).all()
    return [_leased(r) for r in rows]


def _skip_locked(s: Session, claimable: ColumnElement[bool]) -> ColumnElement[bool] | None:
    """What a claiming UPDATE of campaigns may touch (None: nothing).

    On PostgreSQL the claimable rows are locked first with ``FOR UPDATE SKIP LOCKED``: replicas
    claiming at the same moment each take different rows and never wait on one another (a plain
    UPDATE would queue behind the other replica's row locks). The UPDATE keeps ``claimable``, so a
    row changed since it was read is not taken. SQLite has a single writer (``BEGIN IMMEDIATE``)
    and no row locks: there the UPDATE alone is the claim.
    """
    if s.get_bind().dialect.name != "postgresql":
        return claimable
    ids = list(s.scalars(select(Campaign.id).where(claimable).with_for_update(skip_locked=True)))
    return and_(Campaign.id.in_(ids), claimable) if ids else None


def _leased(r: Sequence[Any]) -> LeasedCampaign:
    return LeasedCampaign(
        r[0],
        r[1],
        r[2],
        r[3] or {},
        r[4],
        r[5],
        bool(r[6]),
        r[7],
        r[8],
        _maybe_aware(r[9]),
        _maybe_aware(r[10]),
        r[11],
        r[12],
    )


def _maybe_aware(t: datetime | None) -> datetime | None:
    return None if t is None else _aware(t)


def held_campaigns(s: Session, ids: list[int], owner: str) -> list[LeasedCampaign]:
    """The active campaigns among ``ids`` still leased to ``owner``, freshly read (no write)."""
    rows = s.execute(
        select(*_LEASE_COLUMNS).where(
            Campaign.id.in_(ids), Campaign.lease_owner == owner, Campaign.state.in_(_ACTIVE)
        )
    ).all()
    return [_leased(r) for r in rows]


def release_leases(s: Session, owner: str) -> None:
    s.execute(
        update(Campaign).where(Campaign.lease_owner == owner).values(lease_owner=None, lease_until=None)
    )


def counts(s: Session, campaign_id: int) -> Counter[str]:
    rows = s.execute(
        select(Deployment.state, func.count())
        .where(Deployment.campaign_id == campaign_id)
        .group_by(Deployment.state)
    ).all()
    return Counter({state: n for state, n in rows})


def _targets() -> Select[int, int, str, str, str, bytes, bytes | None, datetime | None, int | None]:
    """Deployment rows with what a notice needs: device key, name, tenant slug and transport."""
    return (
        select(
            Deployment.device_id,
            Deployment.attempt,
            Tenant.slug,
            Device.name,
            Device.transport,
            Device.secret,
            Deployment.nonce,
            Deployment.attested_at,
            Deployment.manifest_id,
        )
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
    )


def take_pending(
    s: Session,
    campaign_id: int,
    limit: int,
    *,
    max_phase: int = 0,
    now: float | None = None,
    attestation: bool = False,
    consented_only: bool = False,
) -> list[Target]:
    """Mark up to ``limit`` pending deployments notified (new attempt) and return them.

    Only phases up to ``max_phase`` are eligible, and retries only once their backoff has passed.
    In an attested campaign every new attempt gets a fresh single-use nonce.
    """
    if limit <= 0:
        return []
    when = utcnow() if now is None else datetime.fromtimestamp(now, UTC)
    rows = s.execute(
        _targets()
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.state == DeviceState.PENDING.value,
            Deployment.phase <= max_phase,
            or_(Deployment.retry_at.is_(None), Deployment.retry_at <= when),
            Deployment.choice.is_not(None) if consented_only else true(),
        )
        .order_by(Deployment.phase, Deployment.device_id)
        .limit(limit)
    ).all()
    if not rows:
        return []
    nonces = {r[0]: secrets.token_bytes(NONCE_BYTES) if attestation else None for r in rows}
    s.connection().execute(
        update(Deployment)
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.device_id == bindparam("d"),
            Deployment.state == DeviceState.PENDING.value,
        )
        .values(
            state=DeviceState.NOTIFIED.value,
            attempt=bindparam("a"),
            last_seq=-1,
            notified_at=when,
            updated_at=when,
            retry_at=None,
            nonce=bindparam("n"),
            nonce_at=when if attestation else None,
            attested_at=None,
        ),
        [{"d": r[0], "a": r[1] + 1, "n": nonces[r[0]]} for r in rows],
    )
    return [Target(r[0], r[2], r[3], r[4], r[5], r[1] + 1, nonces[r[0]], False, r[8]) for r in rows]


def phase_counts(s: Session, campaign_id: int) -> list[tuple[int, str, int]]:
    """``(phase, state, count)`` rows: everything the rollout policy needs to decide."""
    rows = s.execute(
        select(Deployment.phase, Deployment.state, func.count())
        .where(Deployment.campaign_id == campaign_id)
        .group_by(Deployment.phase, Deployment.state)
    ).all()
    return [(int(p), str(st), int(n)) for p, st, n in rows]


def recent_notifications(s: Session, campaign_id: int, since: float) -> list[float]:
    """Notification times since ``since`` (epoch s), to restore the rate window after a restart."""
    rows = s.execute(
        select(Deployment.notified_at).where(
            Deployment.campaign_id == campaign_id,
            Deployment.notified_at >= datetime.fromtimestamp(since, UTC),
        )
    ).all()
    return [_epoch(r[0]) for r in rows if r[0] is not None]


def _epoch(t: datetime) -> float:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def set_note(s: Session, campaign_id: int, note: str | None) -> None:
    s.execute(update(Campaign).where(Campaign.id == campaign_id).values(note=note))


def set_phase(s: Session, campaign_id: int, tenant_id: int, phase: int, label: str) -> None:
    s.execute(update(Campaign).where(Campaign.id == campaign_id).values(phase=phase))
    s.add(
        CampaignEvent(
            tenant_id=tenant_id,
            campaign_id=campaign_id,
            at=utcnow(),
            state="running",
            reason=f"{label} begins",
        )
    )


def silent(s: Session, campaign_id: int, cutoffs: Mapping[DeviceState, float]) -> list[Silent]:
    """In-progress deployments whose last report is older than their state's cutoff (POSIX s)."""
    out: list[Silent] = []
    for st, cutoff in cutoffs.items():
        rows = s.execute(
            select(Deployment.device_id, Deployment.attempt, Deployment.tenant_id).where(
                Deployment.campaign_id == campaign_id,
                Deployment.state == st.value,
                Deployment.updated_at <= datetime.fromtimestamp(cutoff, UTC),
            )
        ).all()
        out += [Silent(r.tenant_id, r.device_id, r.attempt, st) for r in rows]
    return out


def write_expired(s: Session, campaign_id: int, expired: Sequence[Expired], now: float) -> None:
    """Persist what the device timeout decided (a deployment that reported meanwhile is left)."""
    when = datetime.fromtimestamp(now, UTC)
    for e in expired:
        changed = s.execute(
            update(Deployment)
            .where(
                Deployment.campaign_id == campaign_id,
                Deployment.device_id == e.device_pk,
                Deployment.state == e.was.value,
            )
            .values(
                state=e.state.value,
                updated_at=when,
                retry_at=datetime.fromtimestamp(e.retry_at, UTC) if e.retry_at is not None else None,
                detail=e.detail,
            )
        )
        if not changed.rowcount:  # type: ignore[attr-defined]
            continue
        s.add(
            DeviceEvent(
                tenant_id=e.tenant_id,
                campaign_id=campaign_id,
                device_id=e.device_pk,
                at=when,
                state=DeviceState.TIMED_OUT.value,
                result=0,
                detail="retry scheduled" if e.retry_at is not None else "timed out",
            )
        )


def in_flight(s: Session, campaign_id: int, states: Iterable[str]) -> list[Target]:
    """Deployments in the given states, for re-sending or withdrawing their notice."""
    rows = s.execute(
        _targets().where(Deployment.campaign_id == campaign_id, Deployment.state.in_(list(states)))
    ).all()
    return [_target(r) for r in rows]


def _target(r: Row[int, int, str, str, str, bytes, bytes | None, datetime | None, int | None]) -> Target:
    return Target(r[0], r[2], r[3], r[4], r[5], r[1], r[6], r[7] is not None, r[8])


def cancel_not_started(s: Session, campaign_id: int) -> int:
    """Cancel deployments whose device has not reported any progress (pending or notified).

    A notified device still gets the cancel notice; whatever it reports afterwards changes nothing.
    """
    now = utcnow()
    not_started = [DeviceState.PENDING.value, DeviceState.NOTIFIED.value]
    res = s.execute(
        update(Deployment)
        .where(Deployment.campaign_id == campaign_id, Deployment.state.in_(not_started))
        .values(state=DeviceState.CANCELLED.value, result=int(Result.CANCELLED), updated_at=now)
    )
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


def set_campaign_state(
    s: Session, campaign: int, tenant_id: int, state: CampaignState, reason: str | None
) -> None:
    now = utcnow()
    values: dict[str, object] = {"state": state.value, "stop_reason": reason, "note": None}
    if state in (CampaignState.COMPLETED, CampaignState.CANCELLED, CampaignState.STOPPED):
        values.update(finished_at=now, lease_owner=None, lease_until=None)
    s.execute(update(Campaign).where(Campaign.id == campaign).values(**values))
    s.add(CampaignEvent(tenant_id=tenant_id, campaign_id=campaign, at=now, state=state.value, reason=reason))


def add_campaign_event(s: Session, campaign: int, tenant_id: int, state: str, reason: str) -> None:
    s.add(CampaignEvent(tenant_id=tenant_id, campaign_id=campaign, at=utcnow(), state=state, reason=reason))


def manifest_envelope(s: Session, manifest_id: int) -> bytes:
    return s.execute(select(Manifest.envelope).where(Manifest.id == manifest_id)).scalar_one()


def device_keys(s: Session, names: Iterable[tuple[str, str]]) -> dict[tuple[str, str], DeviceKey]:
    """Look up devices by (tenant slug, device name), in one query."""
    wanted = list(set(names))
    if not wanted:
        return {}
    rows = s.execute(
        select(Tenant.slug, Device.name, Device.id, Device.tenant_id, Device.secret)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .where(tuple_(Tenant.slug, Device.name).in_(wanted))
    ).all()
    return {(r[0], r[1]): DeviceKey(r[2], r[3], r[4]) for r in rows}


class Verified(NamedTuple):
    key: DeviceKey
    report: Report


def campaign_policy_rows(s: Session, campaign_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The stored policies of campaigns, as stored."""
    rows = s.execute(select(Campaign.id, Campaign.policy).where(Campaign.id.in_(list(set(campaign_ids)))))
    return {r.id: r.policy or {} for r in rows}


_VIEW_CHUNK = 5000


def deployment_views(s: Session, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], DeploymentView]:
    """Current state of (campaign, device) deployments: one indexed ``IN`` per campaign (a
    row-value ``IN`` over pairs is not an index lookup on SQLite), read through Core."""
    by_campaign: dict[int, set[int]] = {}
    for cid, device in pairs:
        by_campaign.setdefault(cid, set()).add(device)
    conn = s.connection()
    current: dict[tuple[int, int], DeploymentView] = {}
    for cid, devices in by_campaign.items():
        ids = sorted(devices)
        for i in range(0, len(ids), _VIEW_CHUNK):
            rows = conn.execute(
                select(
                    _DEPLOYMENTS.c.device_id,
                    _DEPLOYMENTS.c.state,
                    _DEPLOYMENTS.c.attempt,
                    _DEPLOYMENTS.c.last_seq,
                ).where(
                    _DEPLOYMENTS.c.campaign_id == cid,
                    _DEPLOYMENTS.c.device_id.in_(ids[i : i + _VIEW_CHUNK]),
                )
            ).all()
            for device, state, attempt, last_seq in rows:
                current[(cid, device)] = DeploymentView(DeviceState(state), attempt, last_seq)
    return current


# Statements run once per report (execute_many): every value is a named parameter.
_REPORT_UPDATE = (
    update(_DEPLOYMENTS)
    .where(
        _DEPLOYMENTS.c.campaign_id == bindparam("c"),
        _DEPLOYMENTS.c.device_id == bindparam("d"),
        _DEPLOYMENTS.c.attempt == bindparam("a"),
        _DEPLOYMENTS.c.last_seq < bindparam("q"),
    )
    .values(
        state=bindparam("st"),
        result=bindparam("r"),
        last_seq=bindparam("q"),
        progress=bindparam("p"),
        detail=bindparam("dt"),
        retry_at=bindparam("rt"),
        updated_at=bindparam("u"),
    )
)
_EVENT_INSERT = insert(_EVENTS).values(
    tenant_id=bindparam("t"),
    campaign_id=bindparam("c"),
    device_id=bindparam("d"),
    at=bindparam("u"),
    state=bindparam("st"),
    result=bindparam("r"),
    detail=bindparam("dt"),
)
_INSTALLED = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("d"))
    .values(sequence=bindparam("sq"), last_seen=bindparam("u"))
)
_HELLO = (
    update(_DEVICES)
    .where(
        _DEVICES.c.id == bindparam("d"),
        # a hello delivered late (redelivered after a replica died) must not undo a newer one
        or_(_DEVICES.c.hello_seq.is_(None), _DEVICES.c.hello_seq < bindparam("q")),
    )
    .values(
        hello_seq=bindparam("q"),
        sequence=bindparam("sq"),
        firmware_name=func.coalesce(bindparam("fn"), _DEVICES.c.firmware_name),
        version=func.coalesce(bindparam("fv"), _DEVICES.c.version),
        last_seen=bindparam("u"),
        online=bindparam("on"),
    )
)


def apply_hellos(s: Session, hellos: Sequence[Verified]) -> None:
    """Record what devices say they run (campaign 0 reports), newest hello first to last."""
    now = utcnow()
    rows = [
        {
            "d": v.key.device_pk,
            "q": v.report.seq,
            "sq": v.report.installed_sequence,
            "fn": _short_text(v.report.extra.get(REPORT_FIRMWARE_NAME), 200),
            "fv": _short_text(v.report.extra.get(REPORT_FIRMWARE_VERSION), 64),
            "u": now,
            "on": True,
        }
        for v in hellos
        if v.report.installed_sequence is not None
    ]
    if rows:  # the hello is the device's receipt of what it runs
        execute_many(s.connection(), _HELLO, rows)


def write_reports(s: Session, applied: Sequence[Applied]) -> None:
    """Persist what reports did to their deployments (judged by ``rollout.deployment``), with the
    history of every state entered and the sequence a device that succeeded now runs."""
    if not applied:
        return
    now = utcnow()
    updates: list[dict[str, object]] = []
    events: list[dict[str, object]] = []
    installs: list[dict[str, object]] = []
    for a in applied:
        retry_at = datetime.fromtimestamp(a.retry_at, UTC) if a.retry_at is not None else None
        updates.append(
            {
                "c": a.campaign,
                "d": a.device_pk,
                "st": a.state.value,
                "r": a.result,
                "rt": retry_at,
                "q": a.seq,
                "a": a.attempt,
                "p": a.progress,
                "dt": a.detail,
                "u": now,
            }
        )
        if a.entered is not None:
            detail = a.detail if retry_at is None else f"retry at {retry_at:%H:%M:%S}"
            events.append(
                {"t": a.tenant_id, "c": a.campaign, "d": a.device_pk, "u": now}
                | {"st": a.entered.value, "r": a.result, "dt": detail}
            )
        if a.installed is not None:
            installs.append({"d": a.device_pk, "sq": a.installed, "u": now})
    # one row order for every replica: concurrent batches then wait on each other, not deadlock
    updates.sort(key=lambda u: (u["c"], u["d"]))
    execute_many(s.connection(), _REPORT_UPDATE, updates)
    execute_many(s.connection(), _EVENT_INSERT, events)
    execute_many(s.connection(), _INSTALLED, installs)


def _short_text(v: object, limit: int) -> str | None:
    return v[:limit] if isinstance(v, str) else None


def set_presence(s: Session, device_pks: dict[int, bool]) -> None:
    now = utcnow()
    if device_pks:
        s.connection().execute(
            update(Device).where(Device.id == bindparam("d")).values(online=bindparam("o"), last_seen=now),
            [{"d": d, "o": o} for d, o in device_pks.items()],
        )


def coap_addresses(s: Session) -> dict[tuple[str, str], str]:
    """Where CoAP devices last observed their notice from, by (tenant slug, device name)."""
    rows = s.execute(
        select(Tenant.slug, Device.name, Device.coap_address)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .where(Device.coap_address.is_not(None))
    ).all()
    return {(r.slug, r.name): r.coap_address for r in rows}


def set_coap_addresses(s: Session, seen: dict[tuple[str, str], str]) -> None:
    tenants = dict(
        s.execute(select(Tenant.slug, Tenant.id).where(Tenant.slug.in_({t for t, _ in seen}))).all()
    )
    rows = [
        {"t": tenants[t], "n": name, "a": address[:80]} for (t, name), address in seen.items() if t in tenants
    ]
    if rows:
        s.connection().execute(
            update(Device)
            .where(Device.tenant_id == bindparam("t"), Device.name == bindparam("n"))
            .values(coap_address=bindparam("a")),
            rows,
        )


def trim_history(s: Session, keep: int = HISTORY_PER_DEVICE) -> int:
    """Delete device events beyond the newest ``keep`` per device."""
    ranked = select(
        DeviceEvent.id,
        func.row_number()
        .over(partition_by=DeviceEvent.device_id, order_by=DeviceEvent.id.desc())
        .label("rn"),
    ).subquery()
    old = select(ranked.c.id).where(ranked.c.rn > keep)
    res = s.execute(delete(DeviceEvent).where(DeviceEvent.id.in_(old)))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


class Speaking(NamedTuple):
    """A device's newest deployment that still has something to say to it, and what decides the
    notice (``rollout.deployment.notice_kind``)."""

    campaign: int
    target: Target
    manifest_id: int
    state: DeviceState
    campaign_state: CampaignState
    group_decision: str | None
    detail: str | None


def speaking_deployment(s: Session, tenant: str, device: str) -> Speaking | None:
    """The newest deployment of a device in progress in a live or cancelled campaign, or withdrawn
    (cancel, quorum not met, group abort) after it was notified: the device may have started, so
    it must see the withdrawal."""
    in_flight = [st.value for st in DEVICE_TERMINAL] + [DeviceState.PENDING.value]
    withdrawn = and_(Deployment.state == DeviceState.CANCELLED.value, Deployment.attempt > 0)
    live = [CampaignState.RUNNING.value, CampaignState.PAUSED.value, CampaignState.CANCELLED.value]
    ended = [CampaignState.CANCELLED.value, CampaignState.STOPPED.value]
    row = _newest_deployment(
        s,
        tenant,
        device,
        (
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.attempt,
            Device.transport,
            Device.secret,
            func.coalesce(Deployment.manifest_id, Campaign.manifest_id).label("manifest_id"),
            Campaign.state.label("campaign_state"),
            Deployment.nonce,
            Deployment.attested_at,
            Deployment.state,
            Campaign.group_decision,
            Deployment.detail,
        ),
        or_(
            and_(Deployment.state.notin_(in_flight), Campaign.state.in_(live)),
            and_(withdrawn, or_(Campaign.state.in_(ended), Campaign.group_decision == "abort")),
        ),
    )
    if row is None:
        return None
    target = Target(
        row.device_id,
        tenant,
        device,
        row.transport,
        row.secret,
        row.attempt,
        row.nonce,
        row.attested_at is not None,
    )
    return Speaking(
        row.campaign_id,
        target,
        row.manifest_id,
        DeviceState(row.state),
        CampaignState(row.campaign_state),
        row.group_decision,
        row.detail,
    )


def credential_targets(s: Session, pairs: Iterable[tuple[int, int]]) -> list[tuple[int, Target, int]]:
    """Succeeded deployments of attested campaigns among (campaign, device) ``pairs``."""
    wanted = list(set(pairs))
    if not wanted:
        return []
    rows = s.execute(
        select(
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.attempt,
            Tenant.slug,
            Device.name,
            Device.transport,
            Device.secret,
            Campaign.manifest_id,
        )
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .join(Campaign, Campaign.id == Deployment.campaign_id)
        .where(
            tuple_(Deployment.campaign_id, Deployment.device_id).in_(wanted),
            Campaign.attestation.is_(True),
            Deployment.state == DeviceState.SUCCEEDED.value,
        )
    ).all()
    return [(r[0], Target(r[1], r[3], r[4], r[5], r[6], r[2]), r[7]) for r in rows]


def last_attested_success(s: Session, tenant: str, device: str) -> tuple[int, Target, int] | None:
    """The device's newest succeeded deployment of an attested campaign: its credential is due."""
    row = _newest_deployment(
        s,
        tenant,
        device,
        (
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.attempt,
            Device.transport,
            Device.secret,
            Campaign.manifest_id,
        ),
        Campaign.attestation.is_(True),
        Deployment.state == DeviceState.SUCCEEDED.value,
    )
    if row is None:
        return None
    target = Target(row.device_id, tenant, device, row.transport, row.secret, row.attempt)
    return row.campaign_id, target, row.manifest_id


def _newest_deployment(
    s: Session, tenant: str, device: str, columns: Sequence[Any], *where: ColumnElement[bool]
) -> Row[Any] | None:
    """The newest deployment of one device (by tenant slug and name) matching ``where``."""
    return s.execute(
        select(*columns)
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .join(Campaign, Campaign.id == Deployment.campaign_id)
        .where(Tenant.slug == tenant, Device.name == device, *where)
        .order_by(Deployment.campaign_id.desc())
        .limit(1)
    ).first()


# -- attestation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttestationResult:
    """One evidence report judged: ``grant`` to sign into a token, or ``reason`` it was refused."""

    campaign: int
    manifest_id: int
    target: Target
    grant: Grant | None
    reason: str | None


def apply_attestations(s: Session, batch: Sequence[Verified]) -> list[AttestationResult]:
    """Judge evidence reports against each deployment's outstanding nonce, in the caller's transaction.

    Accepted: the nonce is consumed and the deployment marked attested. Refused: the deployment
    fails with ATTESTATION_REFUSED and the reason. Duplicates (sequence already applied) and
    evidence for attempts no longer current are ignored.
    """
    if not batch:
        return []
    now = utcnow()
    pairs = {(v.report.campaign, v.key.device_pk) for v in batch}
    rows = s.execute(
        select(
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.state,
            Deployment.attempt,
            Deployment.last_seq,
            Deployment.nonce,
            Deployment.nonce_at,
            Device.attest_key_pem,
            Device.name,
            Device.transport,
            Device.secret,
            Tenant.slug,
            Manifest.digest,
            Manifest.image_digest,
            Campaign.manifest_id,
            Campaign.attestation,
        )
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .join(Campaign, Campaign.id == Deployment.campaign_id)
        .join(Manifest, Manifest.id == Campaign.manifest_id)
        .where(tuple_(Deployment.campaign_id, Deployment.device_id).in_(list(pairs)))
    ).all()
    by_pair = {(r[0], r[1]): r for r in rows}
    out: list[AttestationResult] = []
    for v in sorted(batch, key=lambda v: v.report.seq):
        r = by_pair.get((v.report.campaign, v.key.device_pk))
        rep = v.report
        if r is None or not r[15] or r[3] != rep.attempt or r[4] >= rep.seq:
            continue
        if r[2] != DeviceState.NOTIFIED.value:
            continue
        target = Target(r[1], r[11], r[8], r[9], r[10], r[3])
        evidence = rep.extra.get(REPORT_EVIDENCE)
        try:
            key = load_public_key(r[7].encode()) if r[7] else None
            age = (now - _aware(r[6])).total_seconds() if r[6] is not None else None
            attestation.check_evidence(
                evidence if isinstance(evidence, bytes) else b"",
                key,
                device=r[8],
                nonce=r[5],
                nonce_age_s=age,
                manifest_digest=bytes.fromhex(r[12]),
            )
        except attestation.AttestationError as err:
            _refuse_attestation(s, v, r[3], err, now)
            out.append(AttestationResult(r[0], r[14], target, None, err.reason))
            del by_pair[(r[0], r[1])]  # later evidence in this batch finds nothing to judge
            continue
        s.execute(
            update(Deployment)
            .where(Deployment.campaign_id == r[0], Deployment.device_id == r[1], Deployment.attempt == r[3])
            .values(nonce=None, attested_at=now, last_seq=rep.seq, updated_at=now)
        )
        grant = Grant(
            r[11],
            r[8],
            bytes.fromhex(r[12]),
            bytes.fromhex(r[13]),
            r[0],
            expires=int(now.timestamp()) + attestation.TOKEN_TTL_S,
        )
        out.append(AttestationResult(r[0], r[14], replace(target, attested=True), grant, None))
    return out


def _refuse_attestation(
    s: Session, v: Verified, attempt: int, err: attestation.AttestationError, now: datetime
) -> None:
    detail = f"attestation refused: {err.reason}: {err}"[:200]
    s.execute(
        update(Deployment)
        .where(
            Deployment.campaign_id == v.report.campaign,
            Deployment.device_id == v.key.device_pk,
            Deployment.attempt == attempt,
        )
        .values(
            state=DeviceState.FAILED.value,
            result=int(Result.ATTESTATION_REFUSED),
            detail=detail,
            nonce=None,
            last_seq=v.report.seq,
            updated_at=now,
        )
    )
    s.add(
        DeviceEvent(
            tenant_id=v.key.tenant_id,
            campaign_id=v.report.campaign,
            device_id=v.key.device_pk,
            at=now,
            state=DeviceState.FAILED.value,
            result=int(Result.ATTESTATION_REFUSED),
            detail=detail,
        )
    )


def _aware(t: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def grant_for(s: Session, campaign_id: int, device_pk: int, *, ttl_s: int) -> Grant | None:
    """What a token or credential for this deployment says (tenant, device, manifest and image)."""
    row = s.execute(
        select(Tenant.slug, Device.name, Manifest.digest, Manifest.image_digest, Manifest.sequence)
        .select_from(Deployment)
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .join(Campaign, Campaign.id == Deployment.campaign_id)
        .join(Manifest, Manifest.id == Campaign.manifest_id)
        .where(Deployment.campaign_id == campaign_id, Deployment.device_id == device_pk)
    ).first()
    if row is None:
        return None
    now = int(utcnow().timestamp())
    return Grant(
        row[0],
        row[1],
        bytes.fromhex(row[2]),
        bytes.fromhex(row[3]),
        campaign_id,
        expires=now + ttl_s,
        sequence=row[4],
        installed_at=now,
    )


def server_signing_keys(s: Session) -> list[bytes]:
    """PEM private keys that sign tokens and credentials, oldest first; made on first use."""
    keys = list(s.scalars(select(ServerKey.private_pem).order_by(ServerKey.id)))
    if not keys:
        pem = private_key_pem(generate_private_key("eddsa"))
        s.add(ServerKey(private_pem=pem))
        s.flush()
        keys = [pem]
    return keys


def revoked_key_ids(s: Session) -> dict[str, tuple[bytes, ...]]:
    """Key ids of revoked signers per tenant slug: carried in every notice to that tenant's devices."""
    out: dict[str, list[bytes]] = {}
    for slug, key_id_hex in s.execute(
        select(Tenant.slug, Signer.key_id)
        .join(Tenant, Tenant.id == Signer.tenant_id)
        .where(Signer.revoked_at.is_not(None))
    ):
        out.setdefault(slug, []).append(bytes.fromhex(key_id_hex))
    return {k: tuple(v) for k, v in out.items()}


def protected_images(s: Session) -> set[str]:
    """Image digests of attested campaigns that may still deliver: fetching them needs a token."""
    rows = s.execute(
        select(Manifest.image_digest)
        .join(Campaign, Campaign.manifest_id == Manifest.id)
        .where(Campaign.attestation.is_(True), Campaign.state.in_(_ACTIVE))
    ).scalars()
    return set(rows)


def cancelled_unsettled(s: Session, owner: str, lease_s: float) -> list[tuple[int, int, int]]:
    """Claim cancelled campaigns whose notices were not yet withdrawn: (id, tenant, manifest)."""
    now = utcnow()
    where = _skip_locked(
        s,
        and_(
            Campaign.state == CampaignState.CANCELLED.value,
            Campaign.finished_at.is_(None),
            or_(Campaign.lease_owner.is_(None), Campaign.lease_owner == owner, Campaign.lease_until < now),
        ),
    )
    if where is None:
        return []
    rows = s.execute(
        update(Campaign)
        .where(where)
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_s))
        .returning(Campaign.id, Campaign.tenant_id, Campaign.manifest_id)
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def settle_cancel(s: Session, campaign_id: int) -> None:
    s.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id)
        .values(finished_at=utcnow(), lease_owner=None, lease_until=None)
    )


def silent_in_progress(s: Session, campaign_id: int, silent_s: float) -> list[tuple[Target, str]]:
    """In-progress deployments with no report for ``silent_s`` seconds, with their state:
    candidates for a repeated notice (their last report may have been lost)."""
    cutoff = utcnow() - timedelta(seconds=silent_s)
    rows = s.execute(
        _targets()
        .add_columns(Deployment.state)
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.state.in_([st.value for st in IN_PROGRESS]),
            Deployment.updated_at <= cutoff,
        )
    ).all()
    return [(Target(r[0], r[2], r[3], r[4], r[5], r[1], r[6], r[7] is not None, r[8]), r[9]) for r in rows]
