"""Claim-once ownership routes: factory registration (manufacturers) and claim, release, transfer,
outdated devices (fleet tenants).

Included by ``create_app`` before the device router, so ``GET /devices/outdated`` wins over
``GET /devices/{name}`` (a device literally named ``outdated`` is still listed, but not readable by
name).  A manufacturer tenant gets 403 on the fleet routes here and a fleet tenant 403 on the
factory routes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from fwcm.api import schemas as sc
from fwcm.api.deps import Maker, Tenant, read_body, router
from fwcm.config import Settings
from fwcm.inventory import parse_factory_body
from fwcm.store import factory
from fwcm.store.db import Database
from fwcm.store.models import Device, FactoryDevice

# -- schemas ----------------------------------------------------------------------------------


class FactoryDeviceIn(BaseModel):
    """One device in a factory upload (JSON list or CSV with these columns)."""

    serial: str = Field(description="Globally unique; also the default device name when claimed.")
    hardware_id: str
    vendor: str = Field(description="Vendor domain: vendor_id = uuid5(NAMESPACE_DNS, vendor).")
    model: str = Field(description="Device model: class_id = uuid5(vendor_id, model).")
    firmware_version: str | None = None
    sequence: StrictInt = Field(0, description="Manifest sequence number of the factory firmware.")
    claim_hash: str = Field(description="Hex SHA-256 of the claim code (UTF-8, surrounding spaces removed).")
    secret: str = Field(description="The device's message-MAC key flashed at the factory: 32 bytes, hex.")
    attest_key_pem: str | None = Field(None, description="Public attestation key (PEM), optional.")


class FactoryImportOut(BaseModel):
    registered: int


class FactoryDeviceOut(BaseModel):
    serial: str
    hardware_id: str
    vendor_id: str
    class_id: str
    firmware_version: str | None
    sequence: int
    attest_key: bool = Field(description="Whether a public attestation key was registered.")
    claimed: bool
    claimed_at: sc.Timestamp | None
    created_at: sc.Timestamp | None

    @classmethod
    def of(cls, f: FactoryDevice) -> FactoryDeviceOut:
        return cls(
            serial=f.serial,
            hardware_id=f.hardware_id,
            vendor_id=f.vendor_id,
            class_id=f.class_id,
            firmware_version=f.firmware_version,
            sequence=f.sequence,
            attest_key=f.attest_key_pem is not None,
            claimed=f.owner_id is not None,
            claimed_at=f.claimed_at,
            created_at=f.created_at,
        )


class FactoryPage(sc.Page[FactoryDeviceOut]):
    pass


class ClaimIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    serial: str = Field(max_length=64)
    claim_code: str = Field(max_length=200, description="As printed on the box.")
    name: str | None = Field(None, description="Device name in this tenant; defaults to the serial.")
    tags: dict[str, StrictStr | sc.BodyInt] = Field(default_factory=dict)
    transport: str = "mqtt"


class TransferIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(description="Slug of the receiving fleet tenant.")
    name: str | None = Field(
        None, description="Device name in the receiving tenant; defaults to the current."
    )


class OwnedDeviceOut(sc.DeviceOut):
    """A claimed device: the usual device fields plus where it came from and who owns it now."""

    tenant: str = Field(description="Slug of the owning tenant (the device's topic/path prefix).")
    serial: str | None
    attest_key: bool

    @classmethod
    def owned(
        cls, d: Device, tenant: str, serial: str | None, *, credentials: bool = False
    ) -> OwnedDeviceOut:
        """Never the secret; the MQTT credentials only for the tenant that now owns the device."""
        base: dict[str, Any] = sc.DeviceOut.of(d).model_dump(
            exclude={"secret", "mqtt_username", "mqtt_password"}
        )
        if credentials:
            base.update(sc.credentials(d.secret, tenant, d.name))
        return cls(**base, tenant=tenant, serial=serial, attest_key=d.attest_key_pem is not None)


class ReleaseOut(BaseModel):
    serial: str
    released: bool = True


class OutdatedOut(BaseModel):
    device: str
    class_id: str
    version: str | None
    sequence: int
    firmware_name: str | None
    newest_manifest_id: int
    newest_sequence: int
    newest_name: str | None


class OutdatedPage(sc.Page[OutdatedOut]):
    pass


# -- routes -----------------------------------------------------------------------------------


def create_router(db: Database, settings: Settings, devices_changed: Callable[[], None]) -> APIRouter:
    """The routes; ``devices_changed`` is called after a claim, release or transfer committed."""
    api = router(400, 401, 403, 404, 409, 413, 422)
    item_schema = FactoryDeviceIn.model_json_schema()

    @api.post(
        "/factory/devices",
        response_model=FactoryImportOut,
        status_code=201,
        tags=["factory"],
        responses={422: {"model": sc.ImportErrorOut}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"type": "array", "items": item_schema}},
                    "text/csv": {"schema": {"type": "string"}},
                },
            }
        },
    )
    async def register_factory_devices(request: Request, t: Maker) -> FactoryImportOut:
        """Register a batch of unclaimed devices, all or nothing (manufacturers only).

        Body: a JSON list, or CSV with header
        ``serial,hardware_id,vendor,model,firmware_version,sequence,claim_hash,secret,attest_key_pem``
        (firmware_version, sequence and attest_key_pem optional).  Bad entries refuse the whole
        batch with every problem listed (``line N`` / ``item N``); a serial registered before
        (by anyone) answers 409.
        """
        data = await read_body(request, settings.max_import_bytes, "factory upload")
        content_type = request.headers.get("content-type", "text/csv")

        def run() -> FactoryImportOut:
            entries = parse_factory_body(data, content_type)
            with db.session() as s:
                n = factory.register_factory_devices(s, t.id, entries)
            return FactoryImportOut(registered=n)

        return await run_in_threadpool(run)

    @api.get("/factory/devices", response_model=FactoryPage, tags=["factory"])
    def list_factory_devices(
        t: Maker,
        claimed: Annotated[bool | None, Query(description="Only claimed (true) or unclaimed (false)")] = None,
        limit: sc.Limit = 100,
        offset: sc.Offset = 0,
    ) -> FactoryPage:
        """The manufacturer's own devices and whether each is claimed (never secrets or owners)."""
        with db.read() as s:
            total, rows = factory.list_factory_devices(s, t.id, claimed, limit, offset)
            return FactoryPage.of(total, limit, offset, [FactoryDeviceOut.of(f) for f in rows])

    @api.post("/devices/claim", response_model=OwnedDeviceOut, status_code=201, tags=["devices"])
    def claim_device(body: ClaimIn, t: Tenant) -> OwnedDeviceOut:
        """Claim a manufacturer's device with its serial and the claim code from the box.

        404 when no unclaimed device has this serial and code (a wrong serial and a wrong code look
        the same); 409 when the device is already claimed.
        """
        with db.session() as s:
            device, fd = factory.claim_device(
                s, t.id, body.serial, body.claim_code, body.name, body.tags, body.transport
            )
            out = OwnedDeviceOut.owned(device, t.slug, fd.serial, credentials=True)
        devices_changed()
        return out

    @api.get("/devices/outdated", response_model=OutdatedPage, tags=["devices"])
    def outdated_devices(
        t: Tenant,
        filter: Annotated[str, Query(description="Device filter, as for GET /devices")] = "",
        limit: sc.Limit = 1000,
        offset: sc.Offset = 0,
    ) -> OutdatedPage:
        """Devices whose reported sequence is below the newest manifest of their vendor and class."""
        with db.read() as s:
            total, rows = factory.outdated_devices(s, t.id, filter, limit, offset)
            return OutdatedPage.of(total, limit, offset, [OutdatedOut(**r) for r in rows])

    @api.post("/devices/{name}/release", response_model=ReleaseOut, tags=["devices"])
    def release_device(name: str, t: Tenant) -> ReleaseOut:
        """Give up a claimed device: it leaves the tenant and its claim code works again.

        409 while it is in a campaign that has not finished, or when it was registered directly.
        """
        with db.session() as s:
            fd = factory.release_device(s, t.id, name)
            out = ReleaseOut(serial=fd.serial)
        devices_changed()
        return out

    @api.post("/devices/{name}/transfer", response_model=OwnedDeviceOut, tags=["devices"])
    def transfer_device(name: str, body: TransferIn, t: Tenant) -> OwnedDeviceOut:
        """Move a claimed device to another fleet tenant in one step (same restrictions as release).

        The answer (to the giving tenant) holds no MQTT password: the device derives the one for its
        new username from its secret (docs/protocol.md).
        """
        with db.session() as s:
            device, fd, target = factory.transfer_device(s, t.id, name, body.to, body.name)
            out = OwnedDeviceOut.owned(device, target.slug, fd.serial)
        devices_changed()
        return out

    return api
