"""A tenant's devices: registration, import, lookup, listing by filter, history; and the whole
fleet's broker accounts.

Devices arrive checked (``fwcm.devices``); an import is one transaction, refused as a whole when a
name exists.  Every tenant function takes the caller's ``tenant_id`` and filters on it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, and_, func, insert, select
from sqlalchemy.orm import Session

from fwcm import filters
from fwcm.devices import NewDevice
from fwcm.errors import Conflict, NotFound
from fwcm.store.filtersql import filter_clause
from fwcm.store.models import Device, DeviceEvent, Tenant
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


# -- broker accounts --------------------------------------------------------------------------


class AccountRow(NamedTuple):
    """What a device's broker account is made of."""

    tenant: str
    device: str
    secret: bytes


def broker_account_rows(s: Session, batch: int = 5000) -> Iterator[AccountRow]:
    """Every device with its tenant's slug and its secret, streamed in batches (plain rows: this
    reads the whole fleet)."""
    stmt = select(Tenant.slug, Device.name, Device.secret).join(Tenant, Tenant.id == Device.tenant_id)
    result = s.connection().execution_options(stream_results=True, max_row_buffer=batch).execute(stmt)
    for r in result:
        yield AccountRow(r.slug, r.name, r.secret)


def devices_fingerprint(s: Session) -> tuple[int, int]:
    """(number of devices, highest device id): changes whenever a device is added or removed.

    On PostgreSQL ids are never reused.  SQLite may reuse the highest id after it was deleted (a
    transfer of the newest device keeps both numbers), but SQLite runs one replica, whose API
    reports every change itself.
    """
    r = s.execute(select(func.count().label("n"), func.max(Device.id).label("top")).select_from(Device)).one()
    return int(r.n), int(r.top or 0)
