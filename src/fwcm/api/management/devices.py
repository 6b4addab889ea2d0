"""Devices of a tenant registered directly: add one, import a CSV, list, read, history.

Claimed devices (factory registration, claim, release, transfer) live in ``inventory``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, ApiError, Notify, Tenant, read_body, router
from fwcm.config import Settings
from fwcm.devices import parse_devices_csv, validate_device
from fwcm.store import devices as device_store
from fwcm.store.db import Database


def create_router(db: Database, settings: Settings, notify: Notify) -> APIRouter:
    api = router(*MANAGEMENT_ERRORS)

    @api.post("/devices", response_model=sc.DeviceOut, status_code=201, tags=["devices"])
    def add_device(body: sc.DeviceIn, t: Tenant) -> sc.DeviceOut:
        """Register one device; the answer carries its secret (hex) and MQTT credentials once."""
        dev = validate_device(**body.model_dump())
        with db.session() as s:
            out = sc.DeviceOut.of(
                device_store.register_device(s, t.id, dev), secret=dev.secret, tenant=t.slug
            )
        notify.devices_changed()
        return out

    @api.post(
        "/devices/import",
        response_model=sc.ImportOut,
        status_code=201,
        tags=["devices"],
        responses={422: {"model": sc.ImportErrorOut}},
        openapi_extra={
            "requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}}
        },
    )
    async def import_devices(request: Request, t: Tenant) -> sc.ImportOut:
        """Import devices from CSV, all or nothing.

        Header: ``name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret``
        (name, vendor_id and class_id required; tags as ``k=v;k2=v2``; secret generated when
        empty).  Any bad row refuses the whole file with every problem listed by line number.
        """
        data = await read_body(request, settings.max_import_bytes, "CSV file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"CSV is not UTF-8 (byte {exc.start})") from None

        def run() -> sc.ImportOut:
            devices = parse_devices_csv(text)
            with db.session() as s:
                device_store.import_devices(s, t.id, devices)
            notify.devices_changed()
            return sc.ImportOut(
                imported=len(devices),
                devices=[sc.ImportedDevice.of(d.name, d.secret, t.slug) for d in devices],
            )

        return await run_in_threadpool(run)

    @api.get("/devices", response_model=sc.DevicePage, tags=["devices"])
    def list_devices(
        t: Tenant,
        filter: Annotated[str, Query(description='Filter expression, e.g. tag.region == "eu"')] = "",
        limit: sc.Limit = 100,
        offset: sc.Offset = 0,
    ) -> sc.DevicePage:
        with db.read() as s:
            total, rows = device_store.list_devices(s, t.id, filter, limit, offset)
            return sc.DevicePage.of(total, limit, offset, [sc.DeviceOut.of(d) for d in rows])

    @api.get("/devices/{name}", response_model=sc.DeviceOut, tags=["devices"])
    def get_device(name: str, t: Tenant) -> sc.DeviceOut:
        with db.read() as s:
            return sc.DeviceOut.of(device_store.get_device(s, t.id, name))

    @api.get("/devices/{name}/events", response_model=sc.DeviceEventPage, tags=["devices"])
    def device_events(
        name: str, t: Tenant, limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: sc.Offset = 0
    ) -> sc.DeviceEventPage:
        """Recent deployment state changes of one device, newest first."""
        with db.read() as s:
            total, rows = device_store.device_history(s, t.id, name, limit, offset)
            return sc.DeviceEventPage.of(total, limit, offset, [sc.DeviceEventOut.of(e) for e in rows])

    return api
