"""The API contract tools rely on, against the real app on SQLite and PostgreSQL: a valid OpenAPI
document with a bearer scheme, one list shape, zoned timestamps, semantic version filters."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate
from sqlalchemy import select
from test_api import add_signer, device_json, envelope, upload_manifest

from fwcm.protocol import REPORT_FIRMWARE_VERSION, LwState, Report, Result
from fwcm.store import device_state
from fwcm.store.models import Device

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")
TIME_KEYS = ("at", "last_seen")


def spec(api: Any) -> dict[str, Any]:
    return dict(api.anonymous().get("/api/v1/openapi.json").json())


def test_openapi_document_is_valid(api: Any) -> None:
    validate(spec(api))  # raises on the first violation of the OpenAPI 3.1 schema


def test_every_management_operation_declares_the_bearer_scheme(api: Any) -> None:
    doc = spec(api)
    [(name, scheme)] = doc["components"]["securitySchemes"].items()
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path.startswith("/api/v1/"):
                assert op.get("security") == [{name: []}], (method, path)
            else:  # devices fetch payloads without a key
                assert "security" not in op, (method, path)


def _list_routes(doc: dict[str, Any]) -> list[str]:
    """Every GET whose answer holds ``items``: the lists."""
    schemas = doc["components"]["schemas"]
    out = []
    for path, item in doc["paths"].items():
        content = item.get("get", {}).get("responses", {}).get("200", {}).get("content", {})
        body = content.get("application/json", {}).get("schema", {})
        assert body.get("type") != "array", f"{path} answers a bare list"
        ref = body.get("$ref", "")
        if ref and "items" in schemas[ref.rsplit("/", 1)[1]].get("properties", {}):
            out.append(path)
    return out


def test_every_list_has_the_page_shape(api: Any) -> None:
    doc = spec(api)
    lists = _list_routes(doc)
    assert {"/api/v1/payloads", "/api/v1/signers", "/api/v1/manifests", "/api/v1/campaigns"} <= set(lists)
    assert {"/api/v1/devices/{name}/events", "/api/v1/campaigns/{campaign_id}/events"} <= set(lists)
    schemas = doc["components"]["schemas"]
    for path in lists:
        ref = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        page = schemas[ref.rsplit("/", 1)[1]]
        assert set(page["properties"]) == {"items", "total", "limit", "offset"}, path
        params = {p["name"] for p in doc["paths"][path]["get"].get("parameters", [])}
        assert {"limit", "offset"} <= params, path


def _seed(client: TestClient) -> tuple[int, int]:
    """Two signers, two manifests, three devices and a started campaign; its id and a manifest id."""
    key = add_signer(client, "release")
    add_signer(client, "spare")
    mid = upload_manifest(client, envelope(key, b"fw-1", 3)).json()["id"]
    upload_manifest(client, envelope(key, b"fw-2", 4))
    for i in range(3):
        assert client.post("/api/v1/devices", json=device_json(f"d{i}")).status_code == 201
    for i in range(2):
        client.post("/api/v1/payloads", content=f"image {i}".encode())
    cid = client.post("/api/v1/campaigns", json={"name": "all", "manifest_id": mid}).json()["id"]
    client.post("/api/v1/campaigns", json={"name": "other", "manifest_id": mid})
    assert client.post(f"/api/v1/campaigns/{cid}/start").status_code == 200
    client.post(f"/api/v1/campaigns/{cid}/pause")
    return cid, mid


def _seed_admin(client: TestClient) -> None:
    """Two more API keys (three with the first) and two webhooks."""
    for name in ("ci", "dash"):
        assert client.post("/api/v1/keys", json={"name": name, "role": "viewer"}).status_code == 201
    for port in (9, 10):
        assert client.post("/api/v1/webhooks", json={"url": f"http://127.0.0.1:{port}/"}).status_code == 201


def test_lists_page_with_limit_and_offset(api: Any) -> None:
    cid, _mid = _seed(api.client)
    _seed_admin(api.client)
    for path, total in [
        ("/api/v1/keys", 3),
        ("/api/v1/webhooks", 2),
        ("/api/v1/payloads", 2),
        ("/api/v1/signers", 2),
        ("/api/v1/manifests", 2),
        ("/api/v1/campaigns", 2),
        ("/api/v1/devices", 3),
        (f"/api/v1/campaigns/{cid}/events", 3),  # draft, running, paused
        (f"/api/v1/campaigns/{cid}/devices", 3),
    ]:
        whole = api.client.get(path).json()
        assert (whole["total"], whole["offset"], len(whole["items"])) == (total, 0, total), path
        second = api.client.get(path, params={"limit": 1, "offset": 1}).json()
        assert (second["total"], second["limit"], second["offset"]) == (total, 1, 1), path
        assert second["items"] == whole["items"][1:2], path
        assert api.client.get(path, params={"limit": 0}).status_code == 422, path


def _times(value: Any, key: str = "") -> list[str]:
    """Every timestamp in an answer: the values of keys ending in ``_at`` or named ``at``/``last_seen``."""
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _times(v, k)]
    if isinstance(value, list):
        return [t for v in value for t in _times(v, key)]
    if isinstance(value, str) and (key.endswith("_at") or key in TIME_KEYS):
        return [value]
    return []


def test_every_timestamp_is_rfc3339_with_a_zone(api: Any) -> None:
    cid, mid = _seed(api.client)
    _seed_admin(api.client)
    answers = [
        api.client.get(path).json()
        for path in (
            "/api/v1/tenant",
            "/api/v1/payloads",
            "/api/v1/signers",
            "/api/v1/manifests",
            f"/api/v1/manifests/{mid}",
            "/api/v1/devices",
            "/api/v1/devices/d0",
            "/api/v1/campaigns",
            f"/api/v1/campaigns/{cid}",
            f"/api/v1/campaigns/{cid}/stats",
            f"/api/v1/campaigns/{cid}/events",
            "/api/v1/keys",
            "/api/v1/audit",
            "/api/v1/webhooks",
        )
    ]
    times = _times(answers)
    assert len(times) > 20
    assert [t for t in times if not RFC3339_UTC.match(t)] == []


# -- semantic version filters -------------------------------------------------------------------

VERSIONS = {"v4": "1.0.4", "v10": "1.0.10", "rc": "1.2.0-rc.1", "rel": "1.2.0", "odd": "nightly"}


def _select(client: TestClient, text: str) -> list[str]:
    r = client.get("/api/v1/devices", params={"filter": text})
    assert r.status_code == 200, r.text
    return [d["name"] for d in r.json()["items"]]


def test_version_filters_compare_semantic_versions(api: Any) -> None:
    for name, version in VERSIONS.items():
        assert api.client.post("/api/v1/devices", json=device_json(name, version=version)).status_code == 201
    assert _select(api.client, 'version >= "1.0.10"') == ["rc", "rel", "v10"]
    assert _select(api.client, 'version < "1.0.10"') == ["v4"]
    assert _select(api.client, 'version < "1.2.0"') == ["rc", "v10", "v4"]
    assert _select(api.client, 'version > "1.2.0-rc.1" or version == "nightly"') == ["odd", "rel"]
    r = api.client.get("/api/v1/devices", params={"filter": 'version > "nightly"'})
    assert r.status_code == 422 and "semantic versions" in r.json()["detail"]


def test_a_hello_keeps_the_version_key_in_step(api: Any) -> None:
    api.client.post("/api/v1/devices", json=device_json("d", version="1.0.4"))
    assert _select(api.client, 'version >= "1.0.10"') == []

    def hello(seq: int, version: str) -> None:
        with api.db.session() as s:
            pk, secret = s.execute(select(Device.id, Device.secret).where(Device.name == "d")).one()
            report = Report(
                "d",
                0,
                0,
                seq,
                LwState.IDLE,
                Result.INITIAL,
                installed_sequence=3,
                extra={REPORT_FIRMWARE_VERSION: version},
            )
            key = device_state.DeviceKey(pk, api.tenant_id, secret)
            device_state.apply_hellos(s, [device_state.Verified(key, report)])

    hello(1, "1.0.12")
    assert _select(api.client, 'version >= "1.0.10"') == ["d"]
    hello(2, "custom-build")  # not a version: no ordering matches it any more
    assert _select(api.client, 'version >= "1.0.0"') == []
    assert _select(api.client, 'version == "custom-build"') == ["d"]


@pytest.mark.parametrize("version", ["1.0.4", "nightly", None])
def test_device_answers_keep_the_version_text(api: Any, version: str | None) -> None:
    r = api.client.post("/api/v1/devices", json=device_json("d", version=version))
    assert r.status_code == 201 and r.json()["version"] == version


def test_migration_fills_the_version_key_of_existing_devices(database_url: str) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from fwcm.store.db import MIGRATIONS, Database
    from fwcm.versions import version_key

    db = Database(database_url)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0008")
            conn.execute(text("INSERT INTO tenants (slug, name, kind) VALUES ('t', 'T', 'fleet')"))
            for i, version in enumerate(["1.0.10", "1.0.4", "nightly", None]):
                conn.execute(
                    text(
                        "INSERT INTO devices (tenant_id, name, vendor_id, class_id, tags, sequence, version,"
                        " transport, secret, online) SELECT id, :n, 'v', 'c', '{}', 0, :v, 'mqtt', :s, false"
                        " FROM tenants"
                    ),
                    {"n": f"d{i}", "v": version, "s": b"k" * 32},
                )
        db.migrate()
        with db.session() as s:
            rows = s.execute(select(Device.version, Device.version_key).order_by(Device.name)).all()
        assert [(v, k) for v, k in rows] == [
            (v, version_key(v)) for v in ["1.0.10", "1.0.4", "nightly", None]
        ]
        assert rows[0].version_key > rows[1].version_key  # 1.0.10 after 1.0.4
    finally:
        db.dispose()
