"""A device's life on the wire, as stored: its key lookups, hellos, presence, CoAP address and
bounded history."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

from sqlalchemy import (
    Boolean,
    String,
    Table,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from fwcm.protocol import (
    REPORT_FIRMWARE_NAME,
    REPORT_FIRMWARE_VERSION,
    Report,
)
from fwcm.rollout.deployment import Claim, DeviceRecord
from fwcm.store.db import execute_many, utcnow
from fwcm.store.models import (
    Device,
    DeviceEvent,
    Tenant,
)
from fwcm.versions import version_key

_DEVICES = cast(Table, Device.__table__)


HISTORY_PER_DEVICE = 50


"""Device history kept per device; older events are trimmed (bounded growth)."""


@dataclass(frozen=True)
class DeviceKey:
    device_pk: int
    tenant_id: int
    secret: bytes
    retired: bool = False
    """Decommissioned: its messages are refused."""


def device_keys(s: Session, names: Iterable[tuple[str, str]]) -> dict[tuple[str, str], DeviceKey]:
    """Look up devices by (tenant slug, device name), in one query."""
    wanted = list(set(names))
    if not wanted:
        return {}
    rows = s.execute(
        select(
            Tenant.slug,
            Device.name,
            Device.id,
            Device.tenant_id,
            Device.secret,
            Device.decommissioned_at,
        )
        .join(Tenant, Tenant.id == Device.tenant_id)
        .where(tuple_(Tenant.slug, Device.name).in_(wanted))
    ).all()
    return {
        (r.slug, r.name): DeviceKey(r.id, r.tenant_id, r.secret, retired=r.decommissioned_at is not None)
        for r in rows
    }


def transport_of(s: Session, tenant: str, name: str) -> str | None:
    """The transport of an active (not decommissioned) device, None when there is no such device."""
    return s.execute(
        select(Device.transport)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .where(Tenant.slug == tenant, Device.name == name, Device.decommissioned_at.is_(None))
    ).scalar_one_or_none()


class Verified(NamedTuple):
    key: DeviceKey
    report: Report


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
        image_digest=func.coalesce(bindparam("dg", type_=String()), _DEVICES.c.image_digest),
        version=func.coalesce(bindparam("fv"), _DEVICES.c.version),
        # the key follows a reported version (None when it is not a semantic version)
        version_key=case(
            (bindparam("vk_set", type_=Boolean()), bindparam("vk", type_=String())),
            else_=_DEVICES.c.version_key,
        ),
        last_seen=bindparam("u"),
        online=bindparam("on"),
    )
)


def hello_records(s: Session, device_pks: Iterable[int]) -> dict[int, DeviceRecord]:
    """What hellos of these devices are judged against: the newest hello applied and the claim
    of the last confirmed success (``rollout.deployment.judge_hellos``)."""
    ids = sorted(set(device_pks))
    if not ids:
        return {}
    rows = s.execute(
        select(
            Device.id,
            Device.hello_seq,
            Device.claim_campaign,
            Device.claim_sequence,
            Device.claim_digest,
            Device.claim_hello_seq,
        ).where(Device.id.in_(ids))
    ).all()
    return {
        r.id: DeviceRecord(
            r.hello_seq,
            None
            if r.claim_campaign is None
            else Claim(
                r.claim_campaign,
                r.claim_sequence,
                bytes.fromhex(r.claim_digest) if r.claim_digest else None,
                r.claim_hello_seq,
            ),
        )
        for r in rows
    }


def apply_hellos(s: Session, hellos: Sequence[Verified]) -> None:
    """Record what devices say they run (campaign 0 reports), newest hello first to last."""
    now = utcnow()
    rows = [
        {
            "d": v.key.device_pk,
            "q": v.report.seq,
            "sq": v.report.installed_sequence,
            "fn": _short_text(v.report.extra.get(REPORT_FIRMWARE_NAME), 200),
            "dg": v.report.image_digest.hex() if v.report.image_digest is not None else None,
            **_version(_short_text(v.report.extra.get(REPORT_FIRMWARE_VERSION), 64)),
            "u": now,
            "on": True,
        }
        for v in hellos
        if v.report.installed_sequence is not None
    ]
    if rows:  # the hello is the device's receipt of what it runs
        execute_many(s.connection(), _HELLO, rows)


def _short_text(v: object, limit: int) -> str | None:
    return v[:limit] if isinstance(v, str) else None


def _version(reported: str | None) -> dict[str, object]:
    """The ``_HELLO`` parameters of a reported version: the version, whether it was reported, its key."""
    return {"fv": reported, "vk_set": reported is not None, "vk": version_key(reported)}


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
