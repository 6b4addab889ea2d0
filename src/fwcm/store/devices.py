"""A tenant's devices: registration, import, lookup, listing by filter, history; and the whole
fleet's broker accounts.

Devices arrive checked (``fwcm.devices``); an import is one transaction, refused as a whole when a
name exists.  Every tenant function takes the caller's ``tenant_id`` and filters on it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from fwcm import filters
from fwcm.devices import NewDevice, TagChanges
from fwcm.errors import Conflict, NotFound
from fwcm.rollout.states import DEVICE_TERMINAL, CampaignState, DeviceState
from fwcm.store.db import utcnow
from fwcm.store.filtersql import filter_clause
from fwcm.store.models import Campaign, Deployment, Device, DeviceEvent, Tenant
from fwcm.store.paging import page
from fwcm.versions import version_key

log = logging.getLogger(__name__)

_DEVICES = cast(Table, Device.__table__)
_IN_CHUNK = 5000


def _device_row(tenant_id: int, dev: NewDevice) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "name": dev.name,
        "vendor_id": dev.vendor_id,
        "class_id": dev.class_id,
        "tags": dev.tags,
        "sequence": dev.sequence,
        "version": dev.version,
        "version_key": version_key(dev.version),
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


def device_history(
    s: Session, tenant_id: int, name: str, limit: int = 100, offset: int = 0
) -> tuple[int, Sequence[DeviceEvent]]:
    """A page of one device's deployment state changes, newest first, and how many it has."""
    device = get_device(s, tenant_id, name)
    query = (
        select(DeviceEvent)
        .where(DeviceEvent.tenant_id == tenant_id, DeviceEvent.device_id == device.id)
        .order_by(DeviceEvent.id.desc())
    )
    return page(s, query, limit, offset)


# -- changes ------------------------------------------------------------------------------------

_RETAG_BATCH = 1000
IN_SERVICE = Device.decommissioned_at.is_(None)
"""Devices that campaigns reach and the broker admits."""
_LIVE_CAMPAIGNS = (CampaignState.SCHEDULED.value, CampaignState.RUNNING.value, CampaignState.PAUSED.value)
DECOMMISSIONED = "device decommissioned"
"""The detail of a deployment withdrawn because its device was decommissioned."""


def update_device(
    s: Session, tenant_id: int, name: str, tags: TagChanges, attributes: dict[str, str | None]
) -> Device:
    """Change a device's tags (a merge) and attributes (``version``, ``hardware_id``)."""
    device = get_device(s, tenant_id, name)
    if tags:
        device.tags = tags.apply(device.tags)
    for field, value in attributes.items():
        setattr(device, field, value)
    if "version" in attributes:
        device.version_key = version_key(device.version)
    s.flush()
    return device


def retag_devices(s: Session, tenant_id: int, filter_text: str, tags: TagChanges) -> int:
    """Apply one tag change to every device the filter (raises FilterError) selects; the number
    of devices it selected."""
    cond = and_(Device.tenant_id == tenant_id, filter_clause(filters.parse(filter_text)))
    rows = s.execute(select(Device.id, Device.tags).where(cond).order_by(Device.id)).all()
    stmt = update(_DEVICES).where(_DEVICES.c.id == bindparam("d")).values(tags=bindparam("t"))
    for i in range(0, len(rows), _RETAG_BATCH):
        batch = [{"d": r.id, "t": tags.apply(r.tags)} for r in rows[i : i + _RETAG_BATCH]]
        s.connection().execute(stmt, batch)
    log.info("tenant %d retagged %d devices", tenant_id, len(rows))
    return len(rows)


def decommission_device(s: Session, tenant_id: int, name: str) -> tuple[Device, int]:
    """Take a device out of service and withdraw its deployments in live campaigns (they end
    ``cancelled``); the device and the number of deployments withdrawn. Again is a no-op."""
    device = get_device(s, tenant_id, name)
    if device.decommissioned_at is not None:
        return device, 0
    now = utcnow()
    device.decommissioned_at = now
    device.online = False
    live = select(Campaign.id).where(Campaign.tenant_id == tenant_id, Campaign.state.in_(_LIVE_CAMPAIGNS))
    withdrawn = (
        s.execute(
            update(Deployment)
            .where(
                Deployment.device_id == device.id,
                Deployment.state.notin_([st.value for st in DEVICE_TERMINAL]),
                Deployment.campaign_id.in_(live),
            )
            .values(state=DeviceState.CANCELLED.value, detail=DECOMMISSIONED, updated_at=now, retry_at=None)
            .returning(Deployment.campaign_id)
            .execution_options(synchronize_session=False)
        )
        .scalars()
        .all()
    )
    for campaign_id in withdrawn:
        s.add(
            DeviceEvent(
                tenant_id=tenant_id,
                campaign_id=campaign_id,
                device_id=device.id,
                at=now,
                state=DeviceState.CANCELLED.value,
                detail=DECOMMISSIONED,
            )
        )
    s.flush()
    log.info("tenant %d decommissioned device %s (%d deployments withdrawn)", tenant_id, name, len(withdrawn))
    return device, len(withdrawn)


def delete_device(s: Session, tenant_id: int, name: str, *, force: bool = False) -> Device:
    """Delete a decommissioned device (any device with ``force``) with its deployments and history.

    A claimed device is released instead, so its claim code works again.
    """
    device = get_device(s, tenant_id, name)
    if device.factory_id is not None:
        raise Conflict(f"device {name!r} was claimed; release it instead, so its claim code works again")
    if device.decommissioned_at is None:
        if not force:
            raise Conflict(f"device {name!r} is in service; decommission it first, or delete with force")
        decommission_device(s, tenant_id, name)
    s.execute(delete(DeviceEvent).where(DeviceEvent.device_id == device.id))
    s.execute(delete(Deployment).where(Deployment.device_id == device.id))
    s.delete(device)
    s.flush()
    log.info("tenant %d deleted device %s", tenant_id, name)
    return device


# -- broker accounts --------------------------------------------------------------------------


class AccountRow(NamedTuple):
    """What a device's broker account is made of."""

    tenant: str
    device: str
    secret: bytes


def broker_account_rows(s: Session, batch: int = 5000) -> Iterator[AccountRow]:
    """Every device with its tenant's slug and its secret, streamed in batches (plain rows: this
    reads the whole fleet)."""
    stmt = (
        select(Tenant.slug, Device.name, Device.secret)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .where(IN_SERVICE)
    )
    result = s.connection().execution_options(stream_results=True, max_row_buffer=batch).execute(stmt)
    for r in result:
        yield AccountRow(r.slug, r.name, r.secret)


def devices_fingerprint(s: Session) -> tuple[int, int]:
    """(number of devices in service, highest device id): changes whenever a device is added,
    decommissioned or removed.

    On PostgreSQL ids are never reused.  SQLite may reuse the highest id after it was deleted (a
    transfer of the newest device keeps both numbers), but SQLite runs one replica, whose API
    reports every change itself.
    """
    in_service = func.count().filter(IN_SERVICE)
    r = s.execute(select(in_service.label("n"), func.max(Device.id).label("top")).select_from(Device)).one()
    return int(r.n), int(r.top or 0)
