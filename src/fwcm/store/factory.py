"""Claim-once device ownership: factory registration, claim, release, transfer, outdated devices.

A manufacturer registers ``FactoryDevice`` rows; they are not devices of anyone, so no campaign
can target them and nothing is ever sent to them.  A fleet tenant claims one with its serial and
claim code: one conditional ``UPDATE … WHERE owner_id IS NULL`` picks the single winner (SQLite
serialises writers with BEGIN IMMEDIATE; PostgreSQL row-locks the updated row, and concurrent
updaters re-check the condition after the winner commits), and the unique ``devices.factory_id``
is the second guard.  Release and transfer delete the tenant's ``Device`` row (its deployments and
history go with it, so nothing of one owner is visible to the next) and move ``owner_id``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fwcm import filters
from fwcm.devices import check_tags, check_transport
from fwcm.errors import Conflict, Invalid, NotFound
from fwcm.inventory import FactoryEntry, claim_hash
from fwcm.names import check_name
from fwcm.rollout.states import CAMPAIGN_TERMINAL
from fwcm.store.filtersql import filter_clause
from fwcm.store.models import (
    Campaign,
    Deployment,
    Device,
    DeviceEvent,
    FactoryDevice,
    Manifest,
    Tenant,
    utcnow,
)
from fwcm.versions import version_key

log = logging.getLogger(__name__)

_FACTORY = cast(Table, FactoryDevice.__table__)
_IN_CHUNK = 5000
NO_MATCH = "no unclaimed device with this serial and claim code"
ALREADY_CLAIMED = "device already claimed"
_FINISHED = sorted(state.value for state in CAMPAIGN_TERMINAL)


# -- factory registration ---------------------------------------------------------------------


def _factory_row(manufacturer_id: int, e: FactoryEntry) -> dict[str, Any]:
    return {
        "manufacturer_id": manufacturer_id,
        "serial": e.serial,
        "hardware_id": e.hardware_id,
        "vendor_id": e.vendor_id,
        "class_id": e.class_id,
        "firmware_version": e.firmware_version,
        "sequence": e.sequence,
        "claim_hash": e.claim_hash,
        "secret": e.secret,
        "attest_key_pem": e.attest_key_pem,
    }


def register_factory_devices(s: Session, manufacturer_id: int, entries: Sequence[FactoryEntry]) -> int:
    """Insert a validated batch in one transaction; a serial registered before refuses all of it."""
    serials = [e.serial for e in entries]
    clashes: list[str] = []
    for i in range(0, len(serials), _IN_CHUNK):
        chunk = serials[i : i + _IN_CHUNK]
        clashes.extend(s.scalars(select(FactoryDevice.serial).where(FactoryDevice.serial.in_(chunk))))
    if clashes:
        raise Conflict(_clash_message(clashes))
    if not entries:
        return 0
    try:
        with s.begin_nested():
            for i in range(0, len(entries), 10000):
                rows = [_factory_row(manufacturer_id, e) for e in entries[i : i + 10000]]
                s.execute(insert(_FACTORY), rows)
    except IntegrityError:  # a concurrent upload registered one of these serials first
        raise Conflict("nothing registered: a serial of this batch was registered concurrently") from None
    log.info("manufacturer %d registered %d factory devices", manufacturer_id, len(entries))
    return len(entries)


def _clash_message(clashes: list[str]) -> str:
    clashes.sort()
    shown = ", ".join(repr(n) for n in clashes[:5])
    extra = f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
    return f"nothing registered: {len(clashes)} serial(s) already registered: {shown}{extra}"


def list_factory_devices(
    s: Session, manufacturer_id: int, claimed: bool | None = None, limit: int = 100, offset: int = 0
) -> tuple[int, Sequence[FactoryDevice]]:
    """The manufacturer's own devices (and how many match), optionally only (un)claimed ones."""
    cond: list[Any] = [FactoryDevice.manufacturer_id == manufacturer_id]
    if claimed is not None:
        cond.append(FactoryDevice.owner_id.is_not(None) if claimed else FactoryDevice.owner_id.is_(None))
    total = s.scalar(select(func.count()).select_from(FactoryDevice).where(*cond)) or 0
    rows = s.scalars(
        select(FactoryDevice).where(*cond).order_by(FactoryDevice.serial).limit(limit).offset(offset)
    ).all()
    return total, rows


# -- claim, release, transfer -----------------------------------------------------------------


def _insert_device(
    s: Session, tenant_id: int, fd: FactoryDevice, name: str, clash: str, **fields: Any
) -> Device:
    """The tenant's Device row for a factory device; a clash raises Conflict(``clash``)."""
    if s.scalar(select(Device.id).where(Device.tenant_id == tenant_id, Device.name == name)) is not None:
        raise Conflict(clash)
    values: dict[str, Any] = {
        "tenant_id": tenant_id,
        "name": name,
        "vendor_id": fd.vendor_id,
        "class_id": fd.class_id,
        "tags": {},
        "sequence": fd.sequence,
        "version": fd.firmware_version,
        "transport": "mqtt",
        "secret": fd.secret,
        "hardware_id": fd.hardware_id,
        "attest_key_pem": fd.attest_key_pem,
        "factory_id": fd.id,
        "online": False,
    }
    values.update(fields)
    values["version_key"] = version_key(values["version"])
    device = Device(**values)
    try:
        with s.begin_nested():
            s.add(device)
            s.flush()
    except IntegrityError:
        taken = s.scalar(select(Device.id).where(Device.factory_id == fd.id))
        if taken is not None:  # the unique devices.factory_id caught what the UPDATE did not
            raise Conflict(f"{ALREADY_CLAIMED} (concurrently)") from None
        raise Conflict(clash) from None
    return device


def claim_device(
    s: Session,
    tenant_id: int,
    serial: str,
    claim_code: str,
    name: str | None = None,
    tags: Any = None,
    transport: Any = None,
) -> tuple[Device, FactoryDevice]:
    """Take ownership of an unclaimed factory device and create the tenant's device for it.

    A wrong serial and a wrong code answer the same ``NotFound``; the right code for a device
    someone already owns answers ``Conflict``.  Runs in the caller's transaction: any later failure
    (a name clash) rolls the ownership back too.
    """
    if not isinstance(serial, str) or not isinstance(claim_code, str) or not claim_code.strip():
        raise NotFound(NO_MATCH)
    serial = serial.strip()
    device_name = check_name(name if name else serial, "device name")
    clean_tags = check_tags(tags)
    clean_transport = check_transport(transport)
    digest = claim_hash(claim_code)
    claimed_at = utcnow()
    result = s.execute(
        update(FactoryDevice)
        .where(
            FactoryDevice.serial == serial,
            FactoryDevice.claim_hash == digest,
            FactoryDevice.owner_id.is_(None),
        )
        .values(owner_id=tenant_id, claimed_at=claimed_at)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        owner = s.execute(
            select(FactoryDevice.owner_id).where(
                FactoryDevice.serial == serial, FactoryDevice.claim_hash == digest
            )
        ).first()
        if owner is None:
            raise NotFound(NO_MATCH)
        if owner.owner_id == tenant_id:
            mine = s.scalar(
                select(Device.name)
                .join(FactoryDevice, FactoryDevice.id == Device.factory_id)
                .where(Device.tenant_id == tenant_id, FactoryDevice.serial == serial)
            )
            raise Conflict(f"{ALREADY_CLAIMED} by this tenant" + (f" as device {mine!r}" if mine else ""))
        raise Conflict(ALREADY_CLAIMED)
    fd = s.scalar(
        select(FactoryDevice).where(FactoryDevice.serial == serial).execution_options(populate_existing=True)
    )
    assert fd is not None and fd.owner_id == tenant_id
    clash = f"device {device_name!r} already exists in this tenant; claim it under another name"
    device = _insert_device(s, tenant_id, fd, device_name, clash, tags=clean_tags, transport=clean_transport)
    log.info("tenant %d claimed factory device %s as %s", tenant_id, serial, device_name)
    return device, fd


def _owned_claimed_device(s: Session, tenant_id: int, name: str, action: str) -> tuple[Device, FactoryDevice]:
    """The tenant's device, row-locked, claimed from a factory and in no unfinished campaign."""
    device = s.scalar(
        select(Device).where(Device.tenant_id == tenant_id, Device.name == name).with_for_update()
    )
    if device is None:
        raise NotFound(f"device {name!r} not found")
    if device.factory_id is None:
        raise Conflict(
            f"device {name!r} was registered directly, not claimed from a manufacturer; "
            f"only claimed devices can be {action}"
        )
    busy = s.execute(
        select(Campaign.id, Campaign.state)
        .join(Deployment, Deployment.campaign_id == Campaign.id)
        .where(
            Deployment.device_id == device.id,
            Campaign.tenant_id == tenant_id,
            Campaign.state.not_in(_FINISHED),
        )
        .order_by(Campaign.id)
        .limit(1)
    ).first()
    if busy is not None:
        raise Conflict(
            f"device {name!r} is in campaign {busy.id}, which is {busy.state}; it can be {action} "
            "once the campaign has finished or been cancelled"
        )
    fd = s.scalar(select(FactoryDevice).where(FactoryDevice.id == device.factory_id).with_for_update())
    if fd is None or fd.owner_id != tenant_id:  # cannot happen while the two guards hold
        raise Conflict(f"device {name!r} is not owned by this tenant in the factory records")
    return device, fd


def _drop_device(s: Session, device: Device) -> None:
    """Delete a device with its deployments and history (they belong to the previous owner)."""
    s.execute(delete(DeviceEvent).where(DeviceEvent.device_id == device.id))
    s.execute(delete(Deployment).where(Deployment.device_id == device.id))
    s.delete(device)
    s.flush()


def release_device(s: Session, tenant_id: int, name: str) -> FactoryDevice:
    """Give a claimed device up: its Device row goes and its claim code works again."""
    device, fd = _owned_claimed_device(s, tenant_id, name, "released")
    _drop_device(s, device)
    fd.owner_id = None
    fd.claimed_at = None
    s.flush()
    log.info("tenant %d released factory device %s (%s)", tenant_id, fd.serial, name)
    return fd


def transfer_device(
    s: Session, tenant_id: int, name: str, to_slug: str, new_name: str | None = None
) -> tuple[Device, FactoryDevice, Tenant]:
    """Move a claimed device to another fleet tenant in one transaction.

    The receiving tenant gets a fresh Device row (same secret, ids and firmware state; no tags,
    deployments or history of the previous owner).
    """
    device, fd = _owned_claimed_device(s, tenant_id, name, "transferred")
    target = s.scalar(select(Tenant).where(Tenant.slug == to_slug))
    if target is None:
        raise NotFound(f"tenant {to_slug!r} not found")
    if target.id == tenant_id:
        raise Invalid(f"device {name!r} already belongs to tenant {to_slug!r}")
    if target.kind != "fleet":
        raise Invalid(f"tenant {to_slug!r} is a {target.kind}; devices can only move to a fleet tenant")
    target_name = check_name(new_name if new_name else device.name, "device name")
    clash = f"tenant {to_slug!r} already has a device named {target_name!r}; pass another name"
    if s.scalar(select(Device.id).where(Device.tenant_id == target.id, Device.name == target_name)):
        raise Conflict(clash)
    kept = {
        "sequence": device.sequence,
        "version": device.version,
        "firmware_name": device.firmware_name,
        "transport": device.transport,
    }
    _drop_device(s, device)
    fd.owner_id = target.id
    fd.claimed_at = utcnow()
    s.flush()
    moved = _insert_device(s, target.id, fd, target_name, clash, **kept)
    log.info("tenant %d transferred factory device %s to tenant %d", tenant_id, fd.serial, target.id)
    return moved, fd, target


# -- outdated devices -------------------------------------------------------------------------


def outdated_devices(
    s: Session, tenant_id: int, filter_text: str | None = None, limit: int = 1000, offset: int = 0
) -> tuple[int, list[dict[str, Any]]]:
    """The tenant's devices behind the newest manifest (of this tenant) for their vendor and class.

    One set-based query: the tenant's manifests ranked per (vendor, class) by sequence (newest id
    breaks ties), joined to the devices whose reported sequence is lower.  Raises FilterError.
    """
    ranked = (
        select(
            Manifest.id.label("manifest_id"),
            Manifest.sequence.label("manifest_sequence"),
            Manifest.name.label("manifest_name"),
            Manifest.vendor_id,
            Manifest.class_id,
            func.row_number()
            .over(
                partition_by=(Manifest.vendor_id, Manifest.class_id),
                order_by=(Manifest.sequence.desc(), Manifest.id.desc()),
            )
            .label("rank"),
        )
        .where(Manifest.tenant_id == tenant_id)
        .subquery("newest")
    )
    on = and_(
        ranked.c.vendor_id == Device.vendor_id,
        ranked.c.class_id == Device.class_id,
        ranked.c.rank == 1,
        ranked.c.manifest_sequence > Device.sequence,
    )
    cond = and_(Device.tenant_id == tenant_id, filter_clause(filters.parse(filter_text)))
    total = s.scalar(select(func.count()).select_from(Device).join(ranked, on).where(cond)) or 0
    rows = s.execute(
        select(
            Device.name,
            Device.class_id,
            Device.version,
            Device.sequence,
            Device.firmware_name,
            ranked.c.manifest_id,
            ranked.c.manifest_sequence,
            ranked.c.manifest_name,
        )
        .join(ranked, on)
        .where(cond)
        .order_by(Device.name)
        .limit(limit)
        .offset(offset)
    ).all()
    items = [
        {
            "device": r.name,
            "class_id": r.class_id,
            "version": r.version,
            "sequence": r.sequence,
            "firmware_name": r.firmware_name,
            "newest_manifest_id": r.manifest_id,
            "newest_sequence": r.manifest_sequence,
            "newest_name": r.manifest_name,
        }
        for r in rows
    ]
    return total, items
