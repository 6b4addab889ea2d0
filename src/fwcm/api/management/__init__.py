"""The management API (``/api/v1``): what an operator calls with a tenant's API key, one router
per concept."""

from __future__ import annotations

from fastapi import APIRouter

from fwcm.api.deps import Notify
from fwcm.api.management import (
    audit,
    campaigns,
    deadletters,
    devices,
    inventory,
    keys,
    manifests,
    payloads,
    signers,
    signing,
    tenant,
    webhooks,
)
from fwcm.config import Settings
from fwcm.server.deltas import DeltaMaker
from fwcm.store.db import Database
from fwcm.store.payloads import PayloadStore


def routers(db: Database, settings: Settings, store: PayloadStore, notify: Notify) -> list[APIRouter]:
    """Every management router, in the order they must be included: ``inventory`` first, so
    ``GET /devices/outdated`` is matched before ``GET /devices/{name}``."""
    return [
        inventory.create_router(db, settings, notify.devices_changed),
        deadletters.create_router(db),
        tenant.create_router(db),
        payloads.create_router(db, settings, store),
        signers.create_router(db, settings, notify),
        manifests.create_router(db, settings),
        devices.create_router(db, settings, notify),
        campaigns.create_router(db, notify, DeltaMaker(db, settings, store)),
        webhooks.create_router(db),
        keys.create_router(db),
        audit.create_router(db),
        signing.create_router(db, settings),
    ]
