"""Devices of a tenant registered directly: add one, import a CSV, list, read, history; change
tags and attributes (one device, or every device a filter selects), decommission and delete.

Claimed devices (factory registration, claim, release, transfer) live in ``inventory``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, ApiError, Notify, Tenant, read_body, router
from fwcm.config import Settings
from fwcm.devices import check_attributes, check_tag_changes, parse_devices_csv, validate_device
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

    @api.post("/devices/retag", response_model=sc.RetagOut, tags=["devices"])
    def retag_devices(body: sc.RetagIn, t: Tenant) -> sc.RetagOut:
        """Merge one tag change into every device the filter selects (decommissioned ones too, as
        ``GET /devices`` lists them); answers how many it selected."""
        changes = check_tag_changes(body.tags)
        with db.session() as s:
            return sc.RetagOut(matched=device_store.retag_devices(s, t.id, body.filter, changes))

    @api.patch("/devices/{name}", response_model=sc.DeviceOut, tags=["devices"])
    def update_device(name: str, body: sc.DeviceUpdate, t: Tenant) -> sc.DeviceOut:
        """Change a device's tags (merged; null removes a tag), version or hardware_id."""
        changes = check_tag_changes(body.tags)
        attributes = check_attributes(body.model_dump(include=body.model_fields_set - {"tags"}))
        with db.session() as s:
            return sc.DeviceOut.of(device_store.update_device(s, t.id, name, changes, attributes))

    @api.post("/devices/{name}/decommission", response_model=sc.DecommissionOut, tags=["devices"])
    def decommission_device(name: str, t: Tenant) -> sc.DecommissionOut:
        """Take a device out of service: its broker account and payload access go, its
        deployments in live campaigns are withdrawn (cancelled) with its notices, its reports and
        hellos are refused, and no campaign takes it in again.  It stays listed, with its history,
        until it is deleted.  Again is a no-op."""
        with db.session() as s:
            device, withdrawn = device_store.decommission_device(s, t.id, name)
            out = sc.DecommissionOut(device=sc.DeviceOut.of(device), withdrawn=withdrawn)
        notify.devices_withdrawn(t.slug, [name])
        return out

    @api.delete("/devices/{name}", status_code=204, response_class=Response, tags=["devices"])
    def delete_device(
        name: str,
        t: Tenant,
        force: Annotated[bool, Query(description="Also a device in service (decommissioned first).")] = False,
    ) -> Response:
        """Delete a decommissioned device with its deployments and history; a device still in
        service is refused (409) unless ``force``.  A claimed device is released instead."""
        with db.session() as s:
            device_store.delete_device(s, t.id, name, force=force)
        notify.devices_withdrawn(t.slug, [name])
        return Response(status_code=204)

    @api.get("/devices/{name}/events", response_model=sc.DeviceEventPage, tags=["devices"])
    def device_events(
        name: str, t: Tenant, limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: sc.Offset = 0
    ) -> sc.DeviceEventPage:
        """Recent deployment state changes of one device, newest first."""
        with db.read() as s:
            total, rows = device_store.device_history(s, t.id, name, limit, offset)
            return sc.DeviceEventPage.of(total, limit, offset, [sc.DeviceEventOut.of(e) for e in rows])

    return api
