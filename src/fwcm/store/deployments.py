"""Deployments (one device in one campaign), as stored: which to notify, their current rows, and
what reports and silences did to them (the rules that decide are in ``fwcm.rollout.deployment``)."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Row,
    Select,
    Table,
    bindparam,
    func,
    insert,
    null,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session

from fwcm.attestation import NONCE_BYTES
from fwcm.protocol import (
    Result,
)
from fwcm.rollout.deployment import Applied, DeploymentView, Expired, Reverted, Silent
from fwcm.rollout.states import IN_PROGRESS, DeviceState
from fwcm.store import counts as counts_kept
from fwcm.store.db import execute_many, utcnow
from fwcm.store.models import (
    Deployment,
    Device,
    DeviceEvent,
    Tenant,
)

_EVENTS = cast(Table, DeviceEvent.__table__)


_DEPLOYMENTS = cast(Table, Deployment.__table__)
_DEVICES = cast(Table, Device.__table__)


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


def counts(s: Session, campaign_id: int) -> Counter[str]:
    rows = s.execute(
        select(Deployment.state, func.count())
        .where(Deployment.campaign_id == campaign_id)
        .group_by(Deployment.state)
    ).all()
    return Counter({state: n for state, n in rows})


def targets() -> Select[*tuple[Any, ...]]:
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
        targets()
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
    taken = [
        target_of(r, notified=True, nonce=secrets.token_bytes(NONCE_BYTES) if attestation else None)
        for r in rows
    ]
    fixed = {"c": campaign_id, "old": DeviceState.PENDING.value, "new": DeviceState.NOTIFIED.value}
    fixed |= {"q": -1, "w": when, "na": when if attestation else None}
    notified = [{**fixed, "d": t.device_pk, "a": t.attempt, "n": t.nonce} for t in taken]
    execute_many(s.connection(), _NOTIFY, notified)
    return taken


def phase_counts(s: Session, campaign_id: int) -> list[tuple[int, str, int]]:
    """``(phase, state, count)`` rows: everything the rollout policy needs to decide (the
    maintained counts, a few rows whatever the campaign's size)."""
    return counts_kept.phase_counts(s, campaign_id)


def recent_notifications(s: Session, campaign_id: int, since: float) -> list[float]:
    """Notification times since ``since`` (epoch s), to restore the rate window after a restart."""
    rows = s.execute(
        select(Deployment.notified_at).where(
            Deployment.campaign_id == campaign_id,
            Deployment.notified_at >= datetime.fromtimestamp(since, UTC),
        )
    ).all()
    return [_epoch(r.notified_at) for r in rows if r.notified_at is not None]


def _epoch(t: datetime) -> float:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


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
        targets().where(Deployment.campaign_id == campaign_id, Deployment.state.in_(list(states)))
    ).all()
    return [target_of(r) for r in rows]


def target_of(r: Row[*tuple[Any, ...]], *, notified: bool = False, nonce: bytes | None = None) -> Target:
    """The one constructor of a target from a ``targets()`` row; ``notified``: of a pending row
    about to be notified (its next attempt, with ``nonce``, not attested yet)."""
    return Target(
        device_pk=r.device_id,
        tenant=r.slug,
        name=r.name,
        transport=r.transport,
        secret=r.secret,
        attempt=r.attempt + 1 if notified else r.attempt,
        nonce=nonce if notified else r.nonce,
        attested=False if notified else r.attested_at is not None,
        manifest_id=r.manifest_id,
    )


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


_VIEW_CHUNK = 5000


_STATES = {s.value: s for s in DeviceState}


def deployment_views(s: Session, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], DeploymentView]:
    """Current state of (campaign, device) deployments: one indexed ``IN`` per campaign (a
    row-value ``IN`` over pairs is not an index lookup on SQLite)."""
    by_campaign: dict[int, set[int]] = {}
    for cid, device in pairs:
        by_campaign.setdefault(cid, set()).add(device)
    conn = s.connection()
    current: dict[tuple[int, int], DeploymentView] = {}
    for cid, devices in by_campaign.items():
        ids = sorted(devices)
        for i in range(0, len(ids), _VIEW_CHUNK):
            current |= _views(conn, cid, ids[i : i + _VIEW_CHUNK])
    return current


def _views(conn: Connection, cid: int, ids: list[int]) -> dict[tuple[int, int], DeploymentView]:
    """The deployments of ``ids`` in campaign ``cid``, read through Core."""
    rows = conn.execute(
        select(
            _DEPLOYMENTS.c.device_id,
            _DEPLOYMENTS.c.state,
            _DEPLOYMENTS.c.attempt,
            _DEPLOYMENTS.c.last_seq,
            _DEPLOYMENTS.c.delta_id,
        ).where(_DEPLOYMENTS.c.campaign_id == cid, _DEPLOYMENTS.c.device_id.in_(ids))
    )
    current: dict[tuple[int, int], DeploymentView] = {}
    # unpacked in the select's column order: reading a Row's attribute costs nine times its position
    for device_id, state, attempt, last_seq, delta_id in rows:
        current[(cid, device_id)] = DeploymentView(_STATES[state], attempt, last_seq, delta_id is not None)
    return current


_NOTIFY = (
    update(_DEPLOYMENTS)
    .where(
        _DEPLOYMENTS.c.campaign_id == bindparam("c"),
        _DEPLOYMENTS.c.device_id == bindparam("d"),
        _DEPLOYMENTS.c.state == bindparam("old"),
    )
    .values(
        state=bindparam("new"),
        attempt=bindparam("a"),
        last_seq=bindparam("q"),
        notified_at=bindparam("w"),
        updated_at=bindparam("w"),
        retry_at=null(),
        nonce=bindparam("n"),
        nonce_at=bindparam("na"),
        attested_at=null(),
    )
)
"""A pending deployment notified (take_pending), run once per device (execute_many)."""


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


_CLAIM = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("d"))
    .values(
        claim_campaign=bindparam("c"),
        claim_sequence=bindparam("sq"),
        claim_digest=bindparam("dg"),
        claim_hello_seq=bindparam("hq"),
        image_digest=func.coalesce(bindparam("dg"), _DEVICES.c.image_digest),
    )
)
_FULL_IMAGE = (
    update(_DEPLOYMENTS)
    .where(
        _DEPLOYMENTS.c.campaign_id == bindparam("c"),
        _DEPLOYMENTS.c.device_id == bindparam("d"),
        _DEPLOYMENTS.c.delta_id.is_not(None),
    )
    .values(manifest_id=null(), delta_id=null())
)
_UNCLAIM = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("d"), _DEVICES.c.claim_campaign == bindparam("c"))
    .values(claim_campaign=null(), claim_sequence=null(), claim_digest=null(), claim_hello_seq=null())
)


def write_reports(s: Session, applied: Sequence[Applied]) -> None:
    """Persist what reports did to their deployments (judged by ``rollout.deployment``), with the
    history of every state entered, the sequence a device that succeeded now runs and its claim
    (what later hellos are held against; a revert of the claimed campaign ends it)."""
    if not applied:
        return
    now = utcnow()
    updates: list[dict[str, object]] = []
    events: list[dict[str, object]] = []
    installs: list[dict[str, object]] = []
    claims: list[dict[str, object]] = []
    unclaims: list[dict[str, object]] = []
    full: list[dict[str, object]] = []
    for a in applied:
        if a.full_image:
            full.append({"c": a.campaign, "d": a.device_pk})
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
            if a.full_image:
                detail = f"{a.detail or 'base mismatch'}; the full image follows"
            events.append(
                {"t": a.tenant_id, "c": a.campaign, "d": a.device_pk, "u": now}
                | {"st": a.entered.value, "r": a.result, "dt": detail}
            )
        if a.installed is not None:
            installs.append({"d": a.device_pk, "sq": a.installed, "u": now})
        if a.entered == DeviceState.SUCCEEDED:
            digest = a.digest.hex() if a.digest is not None else None
            claims.append(
                {"d": a.device_pk, "c": a.campaign, "sq": a.installed, "dg": digest, "hq": a.boot_hello}
            )
        elif a.entered == DeviceState.REVERTED:
            unclaims.append({"d": a.device_pk, "c": a.campaign})
    # one row order for every replica: concurrent batches then wait on each other, not deadlock
    updates.sort(key=lambda u: (u["c"], u["d"]))
    execute_many(s.connection(), _REPORT_UPDATE, updates)
    execute_many(s.connection(), _EVENT_INSERT, events)
    execute_many(s.connection(), _INSTALLED, installs)
    execute_many(s.connection(), _CLAIM, claims)
    execute_many(s.connection(), _UNCLAIM, unclaims)
    execute_many(s.connection(), _FULL_IMAGE, sorted(full, key=lambda f: (f["c"], f["d"])))


def write_reverted(s: Session, reverted: Sequence[Reverted]) -> set[int]:
    """Mark succeeded deployments ``reverted`` that hellos showed running another image, end their
    claims and record why; returns the campaigns changed (their engines must look again)."""
    now = utcnow()
    changed: set[int] = set()
    for r in reverted:
        done = s.execute(
            update(Deployment)
            .where(
                Deployment.campaign_id == r.campaign,
                Deployment.device_id == r.device_pk,
                Deployment.state == DeviceState.SUCCEEDED.value,
            )
            .values(
                state=DeviceState.REVERTED.value, result=int(Result.REVERTED), detail=r.detail, updated_at=now
            )
        )
        s.execute(_UNCLAIM, {"d": r.device_pk, "c": r.campaign})
        if not done.rowcount:  # type: ignore[attr-defined]
            continue
        changed.add(r.campaign)
        s.add(
            DeviceEvent(
                tenant_id=r.tenant_id,
                campaign_id=r.campaign,
                device_id=r.device_pk,
                at=now,
                state=DeviceState.REVERTED.value,
                result=int(Result.REVERTED),
                detail=r.detail,
            )
        )
    return changed


def silent_in_progress(s: Session, campaign_id: int, silent_s: float) -> list[tuple[Target, str]]:
    """In-progress deployments with no report for ``silent_s`` seconds, with their state:
    candidates for a repeated notice (their last report may have been lost)."""
    cutoff = utcnow() - timedelta(seconds=silent_s)
    rows = s.execute(
        targets()
        .add_columns(Deployment.state)
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.state.in_([st.value for st in IN_PROGRESS]),
            Deployment.updated_at <= cutoff,
        )
    ).all()
    return [(target_of(r), r.state) for r in rows]
