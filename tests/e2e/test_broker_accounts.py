"""The server keeps the broker's accounts in step with its devices: a device registered, imported or
claimed gets in within seconds with the credentials the API returned; a released or transferred one
no longer gets in under its old name; changes made by another replica reach the broker too."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import delete, select

from fwcm import inventory, protocol
from fwcm.devices import parse_devices_csv
from fwcm.server.accounts import CHECK_INTERVAL_S
from fwcm.store import devices as device_store
from fwcm.store import tenants
from fwcm.store.models import Device, Tenant
from fwcm.transport.accounts import Credentials

from .conftest import CLASS, VENDOR, Env

pytestmark = pytest.mark.timeout(120)

SOON_S = 10.0
"""'Within seconds': the API's own changes take well under one; another replica's one check interval."""


async def admitted(env: Env, account: Credentials) -> bool:
    return await asyncio.to_thread(env.broker.accepts, account)


async def until(env: Env, account: Credentials, want: bool, timeout: float = SOON_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await admitted(env, account) is not want:
        assert asyncio.get_running_loop().time() < deadline, (
            f"{account.username}: still {not want} after {timeout} s"
        )
        await asyncio.sleep(0.1)


def device_json(name: str) -> dict[str, object]:
    return {"name": name, "vendor_id": str(VENDOR), "class_id": str(CLASS), "transport": "mqtt"}


async def test_a_registered_device_gets_in_with_the_credentials_it_was_given(env: Env) -> None:
    d = await env.call("POST", "/devices", json=device_json("fresh"))
    secret = bytes.fromhex(d["secret"])
    assert d["mqtt_username"] == "acme/fresh"
    assert d["mqtt_password"] == protocol.device_password(secret, "acme", "fresh")
    await until(env, Credentials(d["mqtt_username"], d["mqtt_password"]), True)
    assert not await admitted(env, Credentials("acme/fresh", "not-the-password"))
    # reading the device later never shows the password again
    again = await env.call("GET", "/devices/fresh")
    assert again["secret"] is None and again["mqtt_password"] is None

    await env.devices([("imported-1", "mqtt"), ("imported-2", "coap")])
    for name in ("imported-1", "imported-2"):
        await until(env, Credentials(*env.mqtt_accounts[name]), True)


async def test_claim_release_and_transfer_move_the_account(env: Env) -> None:
    with env.server.db.session() as s:
        _m, maker_key = tenants.create_tenant(s, "maker", "Sensor Works", "manufacturer")
        _o, other_key = tenants.create_tenant(s, "other", "Other Fleet")
    units = inventory.make_batch(2, "e2e.fwcm.example", "sensor-v1")
    base = env.settings.public_http_url
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {maker_key}"}) as maker:
        r = await maker.post(
            "/api/v1/factory/devices",
            content=inventory.factory_csv(units),
            headers={"content-type": "text/csv"},
        )
        assert r.status_code == 201, r.text
    kept, moved = units
    claims = {}
    for u in units:
        claims[u.serial] = await env.call(
            "POST", "/devices/claim", json={"serial": u.serial, "claim_code": u.claim_code}
        )
    for u in units:
        c = claims[u.serial]
        assert "secret" not in c or c["secret"] is None  # the factory's secret is never shown
        assert c["mqtt_password"] == protocol.device_password(u.secret, "acme", u.serial)
        await until(env, Credentials(c["mqtt_username"], c["mqtt_password"]), True)

    released = await env.call("POST", f"/devices/{kept.serial}/release")
    assert released["serial"] == kept.serial
    await until(env, Credentials(f"acme/{kept.serial}", claims[kept.serial]["mqtt_password"]), False)

    t = await env.call("POST", f"/devices/{moved.serial}/transfer", json={"to": "other"})
    assert t["tenant"] == "other" and t["mqtt_password"] is None  # the giving tenant learns nothing
    old = Credentials(f"acme/{moved.serial}", claims[moved.serial]["mqtt_password"])
    new = Credentials(f"other/{moved.serial}", protocol.device_password(moved.secret, "other", moved.serial))
    await until(env, old, False)
    await until(env, new, True)
    # what the giving tenant knew does not open the new account
    assert not await admitted(env, Credentials(new.username, old.password))
    assert other_key  # the receiving tenant exists; its device derives its password from its secret


async def test_devices_added_and_removed_by_another_replica_reach_the_broker(env: Env) -> None:
    """Another replica's API calls are not this server's: only the periodic check sees them."""
    devices = parse_devices_csv(
        "name,vendor_id,class_id\n" + "".join(f"elsewhere-{i},{VENDOR},{CLASS}\n" for i in range(3))
    )
    with env.server.db.session() as s:
        tenant_id = s.scalar(select(Tenant.id).where(Tenant.slug == "acme"))
        assert tenant_id is not None
        device_store.import_devices(s, tenant_id, devices)
    accounts = [
        Credentials(f"acme/{d.name}", protocol.device_password(d.secret, "acme", d.name)) for d in devices
    ]
    for account in accounts:
        await until(env, account, True, timeout=CHECK_INTERVAL_S + SOON_S)
    with env.server.db.session() as s:
        s.execute(delete(Device).where(Device.name == "elsewhere-0"))
    await until(env, accounts[0], False, timeout=CHECK_INTERVAL_S + SOON_S)
    assert await admitted(env, accounts[1])
