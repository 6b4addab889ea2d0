"""Claim-once device ownership over the API (SQLite and PostgreSQL): factory registration, claim,
concurrent claims, release, transfer, campaign restrictions, outdated devices, tenant isolation."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import stat
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from fwcm import inventory, manifest
from fwcm.errors import Conflict, NotFound
from fwcm.store import factory as factory_store
from fwcm.store import tenants
from fwcm.store.models import Deployment, Device, DeviceEvent, FactoryDevice, utcnow

VENDOR = "example.com"
MODEL = "sensor-a"
VENDOR_ID = manifest.vendor_id_for_domain(VENDOR)
CLASS_A = manifest.class_id_for(VENDOR_ID, MODEL)
CLASS_B = manifest.class_id_for(VENDOR_ID, "sensor-b")
CLASS_C = manifest.class_id_for(VENDOR_ID, "sensor-c")
NO_MATCH = "no unclaimed device with this serial and claim code"


# -- helpers ----------------------------------------------------------------------------------


def new_client(api: Any, slug: str, kind: str = "fleet") -> TestClient:
    with api.db.session() as s:
        _tenant, key = tenants.create_tenant(s, slug, slug.title(), kind)
    c = TestClient(api.app, headers={"Authorization": f"Bearer {key}"})
    api._clients.append(c)
    return c


def maker(api: Any, slug: str = "maker") -> TestClient:
    return new_client(api, slug, "manufacturer")


def register(client: TestClient, units: list[inventory.FactoryUnit]) -> Any:
    return client.post(
        "/api/v1/factory/devices",
        content=inventory.factory_csv(units).encode(),
        headers={"Content-Type": "text/csv"},
    )


def batch(client: TestClient, count: int, **kw: Any) -> list[inventory.FactoryUnit]:
    units = inventory.make_batch(count, VENDOR, MODEL, **kw)
    r = register(client, units)
    assert r.status_code == 201, r.text
    assert r.json() == {"registered": count}
    return units


def claim(client: TestClient, serial: str, code: str, **extra: Any) -> Any:
    return client.post("/api/v1/devices/claim", json={"serial": serial, "claim_code": code, **extra})


def count(api: Any, model: Any, *where: Any) -> int:
    with api.db.read() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def owner_of(api: Any, serial: str) -> int | None:
    with api.db.read() as s:
        return s.scalar(select(FactoryDevice.owner_id).where(FactoryDevice.serial == serial))


def tenant_id(api: Any, slug: str) -> int:
    with api.db.read() as s:
        t = tenants.tenant_by_slug(s, slug)
        assert t is not None
        return t.id


def names(client: TestClient) -> list[str]:
    return [d["name"] for d in client.get("/api/v1/devices").json()["items"]]


def signer(client: TestClient) -> Any:
    key = manifest.generate_private_key("es256")
    r = client.post(
        "/api/v1/signers", json={"name": "release", "public_key_pem": manifest.public_key_pem(key).decode()}
    )
    assert r.status_code == 201, r.text
    return key


def add_manifest(client: TestClient, key: Any, class_id: Any, sequence: int, name: str) -> int:
    image = f"firmware {class_id} {sequence} {name}".encode()
    info = manifest.ManifestInfo(
        sequence=sequence,
        vendor_id=VENDOR_ID,
        class_id=class_id,
        image_digest=hashlib.sha256(image).digest(),
        image_size=len(image),
        uris=(f"http://127.0.0.1:8080/p/{hashlib.sha256(image).hexdigest()}",),
    )
    r = client.post(
        f"/api/v1/manifests?name={name}",
        content=manifest.build_envelope(info, key),
        headers={"Content-Type": "application/cbor"},
    )
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def start_campaign(client: TestClient, manifest_id: int, filter_text: str = "") -> dict[str, Any]:
    """Create and start a campaign; one over no device starts too (``allow_empty``), so a test can
    see that a filter reaches none."""
    r = client.post(
        "/api/v1/campaigns", json={"name": "c", "manifest_id": manifest_id, "filter": filter_text}
    )
    assert r.status_code == 201, r.text
    r = client.post(f"/api/v1/campaigns/{r.json()['id']}/start", json={"allow_empty": True})
    assert r.status_code == 200, r.text
    return dict(r.json())


# -- batch generation (pure) ------------------------------------------------------------------


def test_make_batch_keeps_codes_and_private_keys_out_of_the_upload(tmp_path: Path) -> None:
    units = inventory.make_batch(3, VENDOR, MODEL, firmware_version="1.2.0", sequence=4, serial_prefix="AB")
    assert len({u.serial for u in units}) == 3 and all(u.serial.startswith("AB-") for u in units)
    assert len({u.claim_code for u in units}) == 3
    paths = inventory.write_batch(units, tmp_path / "b")
    factory = paths["factory"].read_text()
    labels = paths["labels"].read_text()
    for u in units:
        assert u.claim_code not in factory and u.claim_code in labels
        assert inventory.claim_hash(u.claim_code) in factory
        assert inventory.claim_hash(f"  {u.claim_code}\n") == inventory.claim_hash(u.claim_code)
    assert "PRIVATE KEY" not in factory
    rows = list(csv.DictReader(io.StringIO(factory)))
    assert [r["serial"] for r in rows] == [u.serial for u in units]
    for u, row in zip(units, rows, strict=True):
        flashed = json.loads((paths["devices"] / f"{u.serial}.json").read_text())
        assert flashed["secret"] == row["secret"] and flashed["serial"] == u.serial
        assert flashed["class_id"] == str(CLASS_A) and flashed["sequence"] == 4
        private = manifest.load_private_key(flashed["attest_private_key_pem"].encode())
        assert manifest.public_key_pem(private).decode() == row["attest_key_pem"]
        assert stat.S_IMODE((paths["devices"] / f"{u.serial}.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(paths["factory"].stat().st_mode) == 0o600
    entries = inventory.parse_factory_csv(factory)
    assert [(e.vendor_id, e.class_id, e.sequence, e.firmware_version) for e in entries] == [
        (str(VENDOR_ID), str(CLASS_A), 4, "1.2.0")
    ] * 3


# -- factory registration ---------------------------------------------------------------------


def test_manufacturer_registers_and_lists_its_batch(api: Any) -> None:
    m = maker(api)
    units = batch(m, 3)
    page = m.get("/api/v1/factory/devices").json()
    assert page["total"] == 3
    assert sorted(f["serial"] for f in page["items"]) == sorted(u.serial for u in units)
    for f in page["items"]:
        assert f["claimed"] is False and f["class_id"] == str(CLASS_A) and f["attest_key"] is True
        assert not {"secret", "claim_hash", "owner_id", "attest_key_pem"} & set(f)

    # JSON list works too.
    more = inventory.make_batch(2, VENDOR, "sensor-b")
    r = m.post("/api/v1/factory/devices", json=[u.factory_row() for u in more])
    assert r.status_code == 201 and r.json() == {"registered": 2}
    assert m.get("/api/v1/factory/devices").json()["total"] == 5
    assert count(api, Device) == 0  # registered devices belong to nobody

    # A second manufacturer sees only its own devices and cannot reuse a serial (global unique).
    other = maker(api, "maker2")
    assert other.get("/api/v1/factory/devices").json()["total"] == 0
    dupe = [*inventory.make_batch(1, VENDOR, MODEL), units[0]]
    r = register(other, dupe)
    assert r.status_code == 409, r.text
    assert units[0].serial in r.json()["detail"] and "nothing registered" in r.json()["detail"]
    assert count(api, FactoryDevice) == 5


def test_factory_upload_is_all_or_nothing_with_line_numbers(api: Any) -> None:
    m = maker(api)
    units = inventory.make_batch(3, VENDOR, MODEL)
    rows = [u.factory_row() for u in units]
    rows[1]["secret"] = "abcd"
    rows[2]["serial"] = rows[0]["serial"]
    text = inventory._csv(inventory.FACTORY_CSV_COLUMNS, rows)
    r = m.post("/api/v1/factory/devices", content=text.encode(), headers={"Content-Type": "text/csv"})
    assert r.status_code == 422, r.text
    record_lines = 1 + rows[0]["attest_key_pem"].count("\n")  # a quoted PEM spans several lines
    second, third = 2 + record_lines, 2 + 2 * record_lines
    assert r.json()["errors"] == [
        f"line {second}: secret must be 64 hex digits (32 bytes)",
        f"line {third}: serial {rows[0]['serial']!r} already appears on line 2",
    ]
    assert count(api, FactoryDevice) == 0

    r = m.post("/api/v1/factory/devices", json=[{"serial": "x"}, {**rows[0], "claim_hash": "zz"}])
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert errors[0].startswith("item 1: missing field(s) hardware_id")
    assert errors[1] == "item 2: claim_hash must be 64 hex digits (32 bytes)"
    r = m.post("/api/v1/factory/devices", json=[{**rows[0], "attest_key_pem": "not a key"}])
    assert r.status_code == 422 and r.json()["errors"][0].startswith("item 1: attest_key_pem refused")
    assert count(api, FactoryDevice) == 0


def test_roles_are_enforced(api: Any) -> None:
    units = inventory.make_batch(1, VENDOR, MODEL)
    r = register(api.client, units)
    assert r.status_code == 403
    assert r.json()["detail"] == "only manufacturer tenants can register or list factory devices"
    assert api.client.get("/api/v1/factory/devices").status_code == 403
    assert count(api, FactoryDevice) == 0

    m = maker(api)
    batch(m, 1)
    fleet_only = "manufacturer tenants can only use the /factory endpoints; claiming needs a fleet tenant"
    for method, path, body in [
        ("POST", "/api/v1/devices/claim", {"serial": units[0].serial, "claim_code": units[0].claim_code}),
        ("GET", "/api/v1/devices/outdated", None),
        ("POST", "/api/v1/devices/x/release", None),
        ("POST", "/api/v1/devices/x/transfer", {"to": "acme"}),
        ("GET", "/api/v1/devices", None),
        (
            "POST",
            "/api/v1/devices",
            {"name": "d", "vendor_id": str(uuid.uuid4()), "class_id": str(uuid.uuid4())},
        ),
        ("GET", "/api/v1/campaigns", None),
        ("GET", "/api/v1/manifests", None),
        ("GET", "/api/v1/signers", None),
    ]:
        r = m.request(method, path, json=body)
        assert r.status_code == 403 and r.json()["detail"] == fleet_only, (path, r.text)


# -- claim ------------------------------------------------------------------------------------


def test_claim_needs_the_right_code_and_happens_once(api: Any) -> None:
    m = maker(api)
    unit, other_unit = batch(m, 2, firmware_version="1.0.3", sequence=2)
    # Wrong code and unknown serial: the same answer, so serials cannot be probed.
    for serial, code in [(unit.serial, "WRONG-CODE"), ("NO-SUCH-SERIAL", unit.claim_code)]:
        r = claim(api.client, serial, code)
        assert r.status_code == 404 and r.json()["detail"] == NO_MATCH
    # Another device's code does not open this one.
    assert claim(api.client, unit.serial, other_unit.claim_code).status_code == 404
    assert count(api, Device) == 0 and owner_of(api, unit.serial) is None

    r = claim(api.client, unit.serial, f" {unit.claim_code} ", tags={"region": "eu"})
    assert r.status_code == 201, r.text
    d = r.json()
    assert (d["name"], d["serial"], d["tenant"]) == (unit.serial, unit.serial, "acme")
    assert (d["class_id"], d["vendor_id"], d["version"], d["sequence"]) == (
        str(CLASS_A),
        str(VENDOR_ID),
        "1.0.3",
        2,
    )
    assert d["hardware_id"] == unit.hardware_id and d["attest_key"] is True
    assert d["secret"] is None and d["tags"] == {"region": "eu"}
    assert names(api.client) == [unit.serial]
    assert api.client.get(f"/api/v1/devices/{unit.serial}").status_code == 200
    with api.db.read() as s:
        row = s.scalar(select(Device))
        assert row is not None and row.secret == unit.secret and row.factory_id is not None
    assert owner_of(api, unit.serial) == api.tenant_id

    # Claimed: the owner, another tenant with the right code -> 409; a wrong code -> still 404.
    r = claim(api.client, unit.serial, unit.claim_code, name="again")
    assert r.status_code == 409 and r.json()["detail"].startswith("device already claimed by this tenant")
    b = new_client(api, "globex")
    r = claim(b, unit.serial, unit.claim_code)
    assert r.status_code == 409 and r.json()["detail"] == "device already claimed"
    assert claim(b, unit.serial, "WRONG").json()["detail"] == NO_MATCH
    assert count(api, Device) == 1
    listed = {f["serial"]: f["claimed"] for f in m.get("/api/v1/factory/devices").json()["items"]}
    assert listed == {unit.serial: True, other_unit.serial: False}
    assert m.get("/api/v1/factory/devices?claimed=false").json()["items"][0]["serial"] == other_unit.serial


def test_claim_name_clash_rolls_the_claim_back(api: Any) -> None:
    m = maker(api)
    (unit,) = batch(m, 1)
    r = api.client.post(
        "/api/v1/devices", json={"name": "taken", "vendor_id": str(VENDOR_ID), "class_id": str(CLASS_A)}
    )
    assert r.status_code == 201
    r = claim(api.client, unit.serial, unit.claim_code, name="taken")
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    assert owner_of(api, unit.serial) is None  # the ownership update was undone with the insert
    assert claim(api.client, unit.serial, unit.claim_code, name="fresh").status_code == 201


def test_only_claimed_devices_are_targeted(api: Any) -> None:
    m = maker(api)
    claimed, unclaimed = batch(m, 2)
    assert claim(api.client, claimed.serial, claimed.claim_code).status_code == 201
    mid = add_manifest(api.client, signer(api.client), CLASS_A, 5, "v5")
    everything = start_campaign(api.client, mid)
    assert everything["total"] == 1
    by_name = start_campaign(api.client, mid, f'name in ["{claimed.serial}", "{unclaimed.serial}"]')
    assert by_name["total"] == 1
    assert start_campaign(api.client, mid, f'name == "{unclaimed.serial}"')["total"] == 0
    assert start_campaign(api.client, mid, f'hardware_id == "{unclaimed.hardware_id}"')["total"] == 0
    with api.db.read() as s:
        targeted = s.scalars(
            select(Device.name).join(Deployment, Deployment.device_id == Device.id).distinct()
        ).all()
    assert list(targeted) == [claimed.serial]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("via", ["api", "store"])
def test_concurrent_claims_have_exactly_one_winner(api: Any, via: str) -> None:
    m = maker(api)
    (unit,) = batch(m, 1)
    slugs = ["acme", "globex", "initech", "umbrella"]
    keys = {"acme": api.key}
    for slug in slugs[1:]:
        with api.db.session() as s:
            _t, keys[slug] = tenants.create_tenant(s, slug)
    ids = {slug: tenant_id(api, slug) for slug in slugs}
    n = 20
    barrier = threading.Barrier(n)
    results: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        slug = slugs[i % len(slugs)]
        name = f"dev-{i}"
        if via == "api":
            with TestClient(api.app, headers={"Authorization": f"Bearer {keys[slug]}"}) as c:
                barrier.wait()
                r = claim(c, unit.serial, unit.claim_code, name=name)
                outcome = (slug, r.status_code, r.json().get("detail") or r.json()["name"])
        else:
            barrier.wait()
            try:
                with api.db.session() as s:
                    device, _fd = factory_store.claim_device(s, ids[slug], unit.serial, unit.claim_code, name)
                    outcome = (slug, 201, device.name)
            except Conflict as exc:
                outcome = (slug, 409, str(exc))
            except NotFound as exc:
                outcome = (slug, 404, str(exc))
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert len(results) == n, results
    wins = [r for r in results if r[1] == 201]
    losses = [r for r in results if r[1] != 201]
    assert len(wins) == 1, results
    assert len(losses) == n - 1
    winner_slug, _code, winner_name = wins[0]
    # Every loser is stopped by the conditional UPDATE (the unique factory_id is only a backstop).
    expected = {"device already claimed", f"device already claimed by this tenant as device {winner_name!r}"}
    assert all(code == 409 and detail in expected for _s, code, detail in losses), losses
    assert count(api, Device) == 1
    with api.db.read() as s:
        row = s.scalar(select(Device))
        assert row is not None and row.name == winner_name and row.tenant_id == ids[winner_slug]
    assert owner_of(api, unit.serial) == ids[winner_slug]


def test_unique_factory_id_is_a_second_guard(api: Any) -> None:
    """Even with the factory record wrongly unowned, a second Device for it cannot be created."""
    m = maker(api)
    (unit,) = batch(m, 1)
    assert claim(api.client, unit.serial, unit.claim_code, name="first").status_code == 201
    with api.db.session() as s:  # corrupt the first guard's state on purpose
        fd = s.scalar(select(FactoryDevice))
        assert fd is not None
        fd.owner_id = None
    b = new_client(api, "globex")
    r = claim(b, unit.serial, unit.claim_code)
    assert r.status_code == 409 and r.json()["detail"] == "device already claimed (concurrently)"
    assert count(api, Device) == 1 and owner_of(api, unit.serial) is None
    assert names(b) == [] and names(api.client) == ["first"]


# -- release and transfer ---------------------------------------------------------------------


def test_release_then_another_tenant_claims(api: Any) -> None:
    m = maker(api)
    (unit,) = batch(m, 1)
    assert (
        claim(api.client, unit.serial, unit.claim_code, name="kitchen", tags={"site": "a"}).status_code == 201
    )
    b = new_client(api, "globex")
    assert b.post("/api/v1/devices/kitchen/release").status_code == 404  # not B's device
    r = api.client.post("/api/v1/devices/kitchen/release")
    assert r.status_code == 200 and r.json() == {"serial": unit.serial, "released": True}
    assert names(api.client) == [] and count(api, Device) == 0
    assert owner_of(api, unit.serial) is None
    assert m.get("/api/v1/factory/devices").json()["items"][0]["claimed"] is False
    assert api.client.post("/api/v1/devices/kitchen/release").status_code == 404

    r = claim(b, unit.serial, unit.claim_code)
    assert r.status_code == 201, r.text
    assert r.json()["tenant"] == "globex" and r.json()["tags"] == {}
    assert names(b) == [unit.serial] and names(api.client) == []
    assert owner_of(api, unit.serial) == tenant_id(api, "globex")


def test_directly_registered_devices_are_not_released(api: Any) -> None:
    r = api.client.post(
        "/api/v1/devices", json={"name": "direct", "vendor_id": str(VENDOR_ID), "class_id": str(CLASS_A)}
    )
    assert r.status_code == 201
    new_client(api, "globex")
    for path, body in [("release", None), ("transfer", {"to": "globex"})]:
        r = api.client.post(f"/api/v1/devices/direct/{path}", json=body)
        assert r.status_code == 409 and "registered directly" in r.json()["detail"], r.text
    assert names(api.client) == ["direct"]


def test_transfer_moves_the_device_atomically(api: Any) -> None:
    m = maker(api)
    (unit,) = batch(m, 1)
    assert claim(api.client, unit.serial, unit.claim_code, name="pump", tags={"site": "a"}).status_code == 201
    b = new_client(api, "globex")
    maker(api, "maker2")
    assert api.client.post("/api/v1/devices/pump/transfer", json={"to": "nobody"}).status_code == 404
    r = api.client.post("/api/v1/devices/pump/transfer", json={"to": "maker2"})
    assert r.status_code == 422 and "fleet tenant" in r.json()["detail"]
    assert api.client.post("/api/v1/devices/pump/transfer", json={"to": "acme"}).status_code == 422
    # A name clash in the receiving tenant refuses the move and leaves everything as it was.
    assert (
        b.post(
            "/api/v1/devices", json={"name": "pump", "vendor_id": str(VENDOR_ID), "class_id": str(CLASS_A)}
        ).status_code
        == 201
    )
    r = api.client.post("/api/v1/devices/pump/transfer", json={"to": "globex"})
    assert r.status_code == 409 and "already has a device named 'pump'" in r.json()["detail"]
    assert names(api.client) == ["pump"] and owner_of(api, unit.serial) == api.tenant_id

    r = api.client.post("/api/v1/devices/pump/transfer", json={"to": "globex", "name": "pump-2"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert (d["tenant"], d["name"], d["serial"], d["tags"]) == ("globex", "pump-2", unit.serial, {})
    assert names(api.client) == [] and sorted(names(b)) == ["pump", "pump-2"]
    assert owner_of(api, unit.serial) == tenant_id(api, "globex")
    with api.db.read() as s:
        moved = s.scalar(select(Device).where(Device.name == "pump-2"))
        assert moved is not None and moved.secret == unit.secret and moved.attest_key_pem is not None
    # The new owner can release it, and the box's code works again.
    assert b.post("/api/v1/devices/pump-2/release").status_code == 200
    assert claim(api.client, unit.serial, unit.claim_code).status_code == 201


def test_release_and_transfer_refused_while_in_unfinished_campaign(api: Any) -> None:
    m = maker(api)
    (unit,) = batch(m, 1)
    assert claim(api.client, unit.serial, unit.claim_code, name="busy").status_code == 201
    new_client(api, "globex")
    mid = add_manifest(api.client, signer(api.client), CLASS_A, 5, "v5")
    draft = api.client.post("/api/v1/campaigns", json={"name": "d", "manifest_id": mid, "filter": ""})
    assert draft.status_code == 201
    campaign = start_campaign(api.client, mid)
    assert campaign["total"] == 1 and campaign["state"] == "running"
    r = api.client.post("/api/v1/devices/busy/release")
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        f"device 'busy' is in campaign {campaign['id']}, which is running; it can be released once the "
        "campaign has finished or been cancelled"
    )
    r = api.client.post("/api/v1/devices/busy/transfer", json={"to": "globex"})
    assert r.status_code == 409 and "which is running" in r.json()["detail"]
    assert api.client.post(f"/api/v1/campaigns/{campaign['id']}/pause").status_code == 200
    assert api.client.post("/api/v1/devices/busy/release").status_code == 409
    assert owner_of(api, unit.serial) == api.tenant_id and names(api.client) == ["busy"]

    assert api.client.post(f"/api/v1/campaigns/{campaign['id']}/cancel").status_code == 200
    with api.db.session() as s:  # some history, which must not survive the release
        device = s.scalar(select(Device))
        assert device is not None
        s.add(
            DeviceEvent(
                tenant_id=api.tenant_id,
                campaign_id=campaign["id"],
                device_id=device.id,
                at=utcnow(),
                state="cancelled",
            )
        )
    r = api.client.post("/api/v1/devices/busy/release")
    assert r.status_code == 200, r.text
    assert count(api, Deployment) == 0 and count(api, DeviceEvent) == 0
    assert owner_of(api, unit.serial) is None


# -- outdated ---------------------------------------------------------------------------------


def test_outdated_lists_devices_behind_the_newest_manifest_of_their_class(api: Any) -> None:
    c = api.client

    def dev(name: str, class_id: Any, sequence: int, version: str | None = None) -> None:
        body = {
            "name": name,
            "vendor_id": str(VENDOR_ID),
            "class_id": str(class_id),
            "sequence": sequence,
            "version": version,
        }
        assert c.post("/api/v1/devices", json=body).status_code == 201

    dev("a-old", CLASS_A, 1, "1.0")
    dev("a-mid", CLASS_A, 3, "3.0")
    dev("a-new", CLASS_A, 5, "5.0")
    dev("a-ahead", CLASS_A, 7, "7.0")
    dev("b-current", CLASS_B, 2)
    dev("c-none", CLASS_C, 0)
    key = signer(c)
    m5 = add_manifest(c, key, CLASS_A, 5, "a-v5")  # uploaded before the older one: newest by sequence
    add_manifest(c, key, CLASS_A, 3, "a-v3")
    add_manifest(c, key, CLASS_B, 2, "b-v2")
    add_manifest(c, key, CLASS_B, 1, "b-v1")
    # Another tenant's newer manifests say nothing about this tenant's devices.
    other = new_client(api, "globex")
    okey = signer(other)
    add_manifest(other, okey, CLASS_C, 9, "c-v9")
    add_manifest(other, okey, CLASS_B, 9, "b-v9")
    other_dev = {"name": "a-old", "vendor_id": str(VENDOR_ID), "class_id": str(CLASS_A), "sequence": 0}
    assert other.post("/api/v1/devices", json=other_dev).status_code == 201

    page = c.get("/api/v1/devices/outdated").json()
    assert page["total"] == 2
    assert page["items"] == [
        {
            "device": "a-mid",
            "class_id": str(CLASS_A),
            "version": "3.0",
            "sequence": 3,
            "firmware_name": None,
            "newest_manifest_id": m5,
            "newest_sequence": 5,
            "newest_name": "a-v5",
        },
        {
            "device": "a-old",
            "class_id": str(CLASS_A),
            "version": "1.0",
            "sequence": 1,
            "firmware_name": None,
            "newest_manifest_id": m5,
            "newest_sequence": 5,
            "newest_name": "a-v5",
        },
    ]
    assert [r["device"] for r in c.get("/api/v1/devices/outdated?filter=sequence < 2").json()["items"]] == [
        "a-old"
    ]
    assert [r["device"] for r in other.get("/api/v1/devices/outdated").json()["items"]] == []
    # A tie on sequence: the newest upload is the one offered.
    m5b = add_manifest(c, key, CLASS_A, 5, "a-v5-rebuild")
    assert {r["newest_manifest_id"] for r in c.get("/api/v1/devices/outdated").json()["items"]} == {m5b}
    # A device that reports the newest sequence drops out.
    with api.db.session() as s:
        row = s.scalar(select(Device).where(Device.tenant_id == api.tenant_id, Device.name == "a-mid"))
        assert row is not None
        row.sequence, row.firmware_name = 5, "app.bin"
    assert [r["device"] for r in c.get("/api/v1/devices/outdated").json()["items"]] == ["a-old"]
    assert c.get("/api/v1/devices/outdated?filter=nonsense ==").status_code == 422


# -- isolation --------------------------------------------------------------------------------


def test_other_tenants_cannot_see_or_move_a_claimed_device(api: Any) -> None:
    m = maker(api)
    (unit,) = batch(m, 1)
    assert claim(api.client, unit.serial, unit.claim_code, name="mine").status_code == 201
    key = signer(api.client)
    add_manifest(api.client, key, CLASS_A, 9, "a-v9")
    b = new_client(api, "globex")
    assert b.get("/api/v1/devices/mine").status_code == 404
    assert names(b) == []
    assert b.get("/api/v1/devices/outdated").json()["total"] == 0
    assert api.client.get("/api/v1/devices/outdated").json()["total"] == 1
    assert b.post("/api/v1/devices/mine/release").json()["detail"] == "device 'mine' not found"
    r = b.post("/api/v1/devices/mine/transfer", json={"to": "globex"})
    assert r.status_code == 404 and r.json()["detail"] == "device 'mine' not found"
    r = b.post("/api/v1/devices/mine/transfer", json={"to": "acme"})
    assert r.status_code == 404
    # The manufacturer learns only "claimed", never by whom.
    f = m.get("/api/v1/factory/devices").json()["items"][0]
    assert f["claimed"] is True and "acme" not in json.dumps(f)
    assert names(api.client) == ["mine"] and owner_of(api, unit.serial) == api.tenant_id


# -- CLI --------------------------------------------------------------------------------------


@pytest.fixture
def server(live_api: str) -> str:
    return live_api


def test_cli_factory_and_claim_commands(api: Any, server: str, tmp_path: Path) -> None:
    from fwcm.cli.main import app

    runner = CliRunner()
    with api.db.session() as s:
        _m, maker_key = tenants.create_tenant(s, "maker", kind="manufacturer")
        _g, globex_key = tenants.create_tenant(s, "globex")
    base = {"FWCM_URL": server, "FWCM_CONFIG": str(tmp_path / "none.toml")}

    def run(key: str, *args: Any) -> tuple[int, str, str]:
        r = runner.invoke(app, [str(a) for a in args], env={**base, "FWCM_API_KEY": key})
        return r.exit_code, r.stdout, r.stderr

    def ok(key: str, *args: Any) -> Any:
        code, out, err = run(key, *args, "--json")
        assert code == 0, err
        return json.loads(out)

    out = tmp_path / "batch"
    made = ok(
        maker_key, "factory", "make-batch", "--count", 2, "--vendor", VENDOR, "--model", MODEL, "--out", out
    )
    assert made["count"] == 2
    labels = list(csv.DictReader(io.StringIO((out / "labels.csv").read_text())))
    assert ok(maker_key, "factory", "register", out / "factory.csv") == {"registered": 2}
    assert ok(maker_key, "factory", "list", "--unclaimed")["total"] == 2

    code, _out, err = run(api.key, "factory", "register", out / "factory.csv")
    assert (
        code == 1 and err.strip() == "error: only manufacturer tenants can register or list factory devices"
    )
    code, _out, err = run(api.key, "device", "claim", labels[0]["serial"], "WRONG")
    assert code == 1 and err.strip() == f"error: {NO_MATCH}"

    d = ok(api.key, "device", "claim", labels[0]["serial"], labels[0]["claim_code"], "--name", "one")
    assert (d["name"], d["tenant"], d["serial"]) == ("one", "acme", labels[0]["serial"])
    assert ok(maker_key, "factory", "list", "--claimed")["total"] == 1
    add_manifest(api.client, signer(api.client), CLASS_A, 3, "v3")
    outdated = ok(api.key, "device", "outdated")
    assert [r["device"] for r in outdated["items"]] == ["one"]
    t = ok(api.key, "device", "transfer", "one", "--to", "globex")
    assert t["tenant"] == "globex" and t["name"] == "one"
    assert ok(globex_key, "device", "release", "one") == {"serial": labels[0]["serial"], "released": True}
    code, text, _err = run(api.key, "device", "claim", labels[0]["serial"], labels[0]["claim_code"])
    assert (
        code == 0
        and text.strip() == f"claimed {labels[0]['serial']} as device {labels[0]['serial']} of tenant acme"
    )
