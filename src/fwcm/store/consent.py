"""Queries of consent campaigns: invitations, answers, quorum tallies, group decisions, accounting.

Set-based like :mod:`fwcm.store.deployments`, and run in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from sqlalchemy import Table, and_, case, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fwcm.protocol import Answer, Result
from fwcm.rollout.consent import ConsentSpec, Group, Tally
from fwcm.rollout.states import CampaignState, DeviceState
from fwcm.store.db import utcnow
from fwcm.store.deployments import Target, target_of, targets
from fwcm.store.device_state import Verified
from fwcm.store.leases import set_campaign_state
from fwcm.store.models import AccountingRecord, Campaign, Deployment, Device, DeviceEvent

_MEMBER_FAILED = (
    DeviceState.FAILED.value,
    DeviceState.TIMED_OUT.value,
    DeviceState.CANCELLED.value,
    DeviceState.SKIPPED.value,
)


def take_for_invite(s: Session, campaign_id: int, limit: int = 1000) -> list[Target]:
    """Mark up to ``limit`` not yet invited deployments ``invited`` (attempt 1) and return them."""
    now = utcnow()
    rows = s.execute(
        targets()
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.state == DeviceState.PENDING.value,
            Deployment.attempt == 0,
        )
        .order_by(Deployment.device_id)
        .limit(limit)
    ).all()
    if not rows:
        return []
    s.execute(
        update(Deployment)
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.device_id.in_([r.device_id for r in rows]),
            Deployment.state == DeviceState.PENDING.value,
        )
        .values(state=DeviceState.INVITED.value, attempt=1, last_seq=-1, notified_at=now, updated_at=now)
    )
    return [replace(target_of(r), attempt=1) for r in rows]


def tally(s: Session, campaign_id: int) -> Tally:
    total, accepted, declined = s.execute(
        select(
            func.count(),
            func.count(Deployment.choice),
            func.sum(case((Deployment.state == DeviceState.DECLINED.value, 1), else_=0)),
        ).where(Deployment.campaign_id == campaign_id)
    ).one()
    return Tally(int(total), int(accepted), int(declined or 0))


def set_stage(s: Session, campaign_id: int, stage: str) -> None:
    values: dict[str, object] = {"consent_stage": stage}
    if stage == "granted":
        values["granted_at"] = utcnow()
    s.execute(update(Campaign).where(Campaign.id == campaign_id).values(**values))


def refuse(s: Session, campaign_id: int, tenant_id: int, reason: str) -> list[Target]:
    """Quorum not met: the campaign stops, nothing is installed; returns the devices to tell."""
    asked = s.execute(
        targets().where(
            Deployment.campaign_id == campaign_id,
            Deployment.state.in_((DeviceState.INVITED.value, DeviceState.PENDING.value)),
            Deployment.attempt > 0,
        )
    ).all()
    s.execute(
        update(Deployment)
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.state.in_((DeviceState.INVITED.value, DeviceState.PENDING.value)),
        )
        .values(
            state=DeviceState.CANCELLED.value,
            result=int(Result.CANCELLED),
            detail=reason[:200],
            updated_at=utcnow(),
        )
    )
    set_stage(s, campaign_id, "refused")
    set_campaign_state(s, campaign_id, tenant_id, CampaignState.STOPPED, reason)
    return [target_of(r) for r in asked]


def expire_invitations(s: Session, campaign_id: int) -> int:
    """After the deadline, silent devices end ``no_answer``."""
    res = s.execute(
        update(Deployment)
        .where(Deployment.campaign_id == campaign_id, Deployment.state == DeviceState.INVITED.value)
        .values(state=DeviceState.NO_ANSWER.value, detail="no answer by the deadline", updated_at=utcnow())
    )
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


def group(s: Session, campaign_id: int) -> Group:
    members, prepared, failed = s.execute(
        select(
            func.count(),
            func.sum(case((Deployment.state == DeviceState.DOWNLOADED.value, 1), else_=0)),
            func.sum(case((Deployment.state.in_(_MEMBER_FAILED), 1), else_=0)),
        ).where(Deployment.campaign_id == campaign_id, Deployment.choice.is_not(None))
    ).one()
    return Group(int(members), int(prepared or 0), int(failed or 0))


def decide_group(s: Session, campaign_id: int, decision: str) -> bool:
    """Record commit or abort once; False when another decision was recorded first."""
    res = s.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id, Campaign.group_decision.is_(None))
        .values(group_decision=decision)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def members(s: Session, campaign_id: int, states: Sequence[str]) -> list[Target]:
    rows = s.execute(
        targets().where(
            Deployment.campaign_id == campaign_id,
            Deployment.choice.is_not(None),
            Deployment.state.in_(list(states)),
        )
    ).all()
    return [target_of(r) for r in rows]


def abort_members(s: Session, campaign_id: int, reason: str) -> None:
    """Group aborted: members that have not finished end cancelled; none installs."""
    s.execute(
        update(Deployment)
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.state.in_(
                [
                    DeviceState.PENDING.value,
                    DeviceState.NOTIFIED.value,
                    DeviceState.DOWNLOADING.value,
                    DeviceState.DOWNLOADED.value,
                ]
            ),
        )
        .values(
            state=DeviceState.CANCELLED.value,
            result=int(Result.CANCELLED),
            detail=reason[:200],
            updated_at=utcnow(),
        )
    )


@dataclass(frozen=True)
class AnswerContext:
    spec: ConsentSpec
    manifest_id: int


def apply_answers(s: Session, batch: Sequence[Verified], specs: Mapping[int, AnswerContext]) -> set[int]:
    """Record invitation answers: accept (with options) → pending with the matching variant;
    decline → declined. Answers to stale attempts, duplicates and late answers are ignored."""
    if not batch:
        return set()
    now = utcnow()
    pairs = [(v.report.campaign, v.key.device_pk) for v in batch]
    rows = s.execute(
        select(
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.state,
            Deployment.attempt,
            Deployment.last_seq,
            Device.class_id,
        )
        .join(Device, Device.id == Deployment.device_id)
        .where(
            Deployment.state == DeviceState.INVITED.value,
            Deployment.campaign_id.in_({c for c, _ in pairs}),
            Deployment.device_id.in_({d for _, d in pairs}),
        )
    ).all()
    current = {(r.campaign_id, r.device_id): r for r in rows}
    changed: set[int] = set()
    for v in sorted(batch, key=lambda v: v.report.seq):
        key = (v.report.campaign, v.key.device_pk)
        row = current.pop(key, None)
        ctx = specs.get(v.report.campaign)
        if row is None or ctx is None or row.attempt != v.report.attempt or v.report.seq <= row.last_seq:
            continue
        accepted, choice = _read_answer(v.report.answer)
        values: dict[str, object] = {"last_seq": v.report.seq, "updated_at": now}
        problem = ctx.spec.check_choice(choice) if accepted else None
        manifest = (
            ctx.spec.manifest_for(choice, row.class_id, ctx.manifest_id) if accepted and not problem else None
        )
        if accepted and problem is None and manifest is not None:
            values.update(state=DeviceState.PENDING.value, choice=choice, manifest_id=manifest, detail=None)
            event, result, detail = DeviceState.PENDING.value, 0, "accepted " + _choice_text(choice)
        elif accepted:
            why = problem or "no variant matches the chosen options"
            values.update(state=DeviceState.SKIPPED.value, result=int(Result.CONDITION_MISMATCH), detail=why)
            event, result, detail = DeviceState.SKIPPED.value, int(Result.CONDITION_MISMATCH), why
        else:
            values.update(state=DeviceState.DECLINED.value, result=int(Result.DECLINED), detail="declined")
            event, result, detail = DeviceState.DECLINED.value, int(Result.DECLINED), "declined"
        s.execute(
            update(Deployment)
            .where(
                Deployment.campaign_id == key[0],
                Deployment.device_id == key[1],
                Deployment.state == DeviceState.INVITED.value,
            )
            .values(**values)
        )
        s.add(
            DeviceEvent(
                tenant_id=v.key.tenant_id,
                campaign_id=key[0],
                device_id=key[1],
                at=now,
                state=event,
                result=result,
                detail=detail[:200],
            )
        )
        changed.add(key[0])
    return changed


def _read_answer(answer: Answer | None) -> tuple[bool, dict[str, str]]:
    if answer is None:
        return False, {}
    return answer.accepted, dict(answer.choice or {})


def _choice_text(choice: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(choice.items())) or "(no options)"


def apply_accounting(s: Session, batch: Sequence[Verified]) -> int:
    """Store usage records; a record delivered twice is stored once (unique per report)."""
    now = utcnow()
    rows = []
    for v in batch:
        acct = v.report.accounting
        if acct is None:
            continue
        rows.append(
            {
                "tenant_id": v.key.tenant_id,
                "campaign_id": v.report.campaign,
                "device_id": v.key.device_pk,
                "attempt": v.report.attempt,
                "seq": v.report.seq,
                "at": now,
                "kind": acct.kind,
                "uses": acct.uses,
                "seconds": acct.seconds,
                "detail": acct.detail,
            }
        )
    if not rows:
        return 0
    dialect = s.get_bind().dialect.name
    table = cast(Table, AccountingRecord.__table__)
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(table).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).on_conflict_do_nothing()
    else:  # pragma: no cover - only the two supported databases
        stmt = insert(table)
    s.execute(stmt, rows)
    removed = [
        {"d": v.key.device_pk, "sq": v.report.installed_sequence, "c": v.report.campaign}
        for v in batch
        if (acct := v.report.accounting) is not None
        and acct.kind == "removed"
        and v.report.installed_sequence is not None
    ]
    for r in removed:  # the software is gone again: the device runs its previous image
        s.execute(update(Device).where(Device.id == r["d"]).values(sequence=r["sq"]))
        s.execute(  # and its success no longer claims what it runs: no revert to see
            update(Device)
            .where(Device.id == r["d"], Device.claim_campaign == r["c"])
            .values(claim_campaign=None, claim_sequence=None, claim_digest=None, claim_hello_seq=None)
        )
    return len(rows)


def accounting_report(s: Session, tenant_id: int, campaign_id: int) -> list[dict[str, Any]]:
    """Per device: latest usage counters, and how its use ended (final or removed), if it did."""
    latest = (
        select(
            AccountingRecord.device_id,
            func.max(AccountingRecord.id).label("last_id"),
            func.count().label("records"),
        )
        .where(AccountingRecord.tenant_id == tenant_id, AccountingRecord.campaign_id == campaign_id)
        .group_by(AccountingRecord.device_id)
        .subquery()
    )
    ended = (
        select(AccountingRecord.device_id, func.max(AccountingRecord.id).label("end_id"))
        .where(
            AccountingRecord.tenant_id == tenant_id,
            AccountingRecord.campaign_id == campaign_id,
            AccountingRecord.kind.in_(("final", "removed")),
        )
        .group_by(AccountingRecord.device_id)
        .subquery()
    )
    rows = s.execute(
        select(
            Device.name,
            AccountingRecord.uses,
            AccountingRecord.seconds,
            AccountingRecord.at,
            AccountingRecord.kind,
            AccountingRecord.detail,
            latest.c.records,
            ended.c.end_id,
        )
        .join(latest, latest.c.last_id == AccountingRecord.id)
        .join(Device, Device.id == AccountingRecord.device_id)
        .outerjoin(ended, and_(ended.c.device_id == AccountingRecord.device_id))
        .order_by(Device.name)
    ).all()
    return [
        {
            "device": r.name,
            "uses": r.uses,
            "seconds": r.seconds,
            "last_report_at": r.at,
            "last_kind": r.kind,
            "ended": r.end_id is not None,
            "removed": r.kind == "removed",
            "detail": r.detail,
            "records": r.records,
        }
        for r in rows
    ]
