"""API keys with roles, expiry and revocation, the audit log and refused-key counting, over real
HTTP (uvicorn on loopback) on SQLite and PostgreSQL, and through the ``fwcm key``/``fwcm audit``
commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import typer
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from fwcm import manifest
from fwcm.cli.apikeys import audit, key_app
from fwcm.server.metrics import REGISTRY
from fwcm.store import audit as audit_store
from fwcm.store import tenants
from fwcm.store.db import MIGRATIONS, normalize_url, utcnow

cli = typer.Typer()
cli.add_typer(key_app, name="key")
cli.command("audit")(audit)
runner = CliRunner()


@pytest.fixture
def server(live_api: str) -> str:
    return live_api + "/api/v1"


class Clients:
    """httpx clients on the live server, one per key, closed at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.open: list[httpx.Client] = []

    def __call__(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=10)
        self.open.append(c)
        return c


@pytest.fixture
def http(server: str) -> Iterator[Clients]:
    clients = Clients(server)
    try:
        yield clients
    finally:
        for c in clients.open:
            c.close()


def new_key(admin: httpx.Client, name: str, role: str, **extra: Any) -> str:
    r = admin.post("/keys", json={"name": name, "role": role, **extra})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


VENDOR = manifest.vendor_id_for_domain("example.com")
CLASS_A = manifest.class_id_for(VENDOR, "sensor-a")


def device(name: str) -> dict[str, str]:
    return {"name": name, "vendor_id": str(VENDOR), "class_id": str(CLASS_A)}


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("fwcm_api_auth_failures_total", {"reason": reason}) or 0.0


def test_each_role_may_do_what_it_allows_and_is_told_what_it_lacks(api: Any, http: Clients) -> None:
    admin = http(api.key)
    viewer = http(new_key(admin, "dashboard", "viewer"))
    operator = http(new_key(admin, "ci", "operator"))

    assert viewer.get("/devices").status_code == 200
    r = viewer.post("/devices", json=device("d1"))
    assert r.status_code == 403
    assert r.json() == {
        "detail": "POST /api/v1/devices needs the operator role; this key has the viewer role",
        "role_needed": "operator",
    }
    assert operator.post("/devices", json=device("d1")).status_code == 201
    r = operator.post("/keys", json={"name": "mine", "role": "admin"})
    assert r.status_code == 403
    assert "needs the admin role" in r.json()["detail"]
    assert operator.get("/keys").status_code == 403
    assert viewer.get("/devices/d1").json()["name"] == "d1"


def test_a_new_tenant_holds_one_admin_key_named_initial(api: Any, http: Clients) -> None:
    keys = http(api.key).get("/keys").json()
    assert [(k["name"], k["role"], k["revoked_at"]) for k in keys["items"]] == [("initial", "admin", None)]
    assert "key" not in keys["items"][0]


def test_key_creation_is_checked(api: Any, http: Clients) -> None:
    admin = http(api.key)
    new_key(admin, "ci", "operator")
    assert admin.post("/keys", json={"name": "ci", "role": "viewer"}).status_code == 409
    assert admin.post("/keys", json={"name": "x", "role": "root"}).json()["detail"].startswith("unknown role")
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    r = admin.post("/keys", json={"name": "x", "role": "viewer", "expires_at": past})
    assert r.status_code == 422
    assert "in the past" in r.json()["detail"]
    assert admin.post("/keys", json={"name": "bad name", "role": "viewer"}).status_code == 422


def test_expired_revoked_and_unknown_keys_get_401_and_are_counted(
    api: Any, http: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    admin = http(api.key)
    with api.db.session() as s:
        _row, expired = tenants.create_key(
            s, api.tenant_id, "old", "operator", utcnow() - timedelta(seconds=1)
        )
    revoked = new_key(admin, "gone", "operator")
    assert admin.delete("/keys/gone").status_code == 200
    before = {reason: refused(reason) for reason in ("unknown", "expired", "revoked")}

    r = http(expired).get("/devices")
    assert (r.status_code, r.json()["detail"]) == (401, "API key expired")
    assert r.headers["www-authenticate"] == "Bearer"
    r = http(revoked).post("/devices", json=device("d1"))
    assert (r.status_code, r.json()["detail"]) == (401, "API key revoked")
    assert http("fwcm_" + "A" * 43).get("/devices").json()["detail"] == "invalid API key"
    assert http("not-even-a-key").get("/devices").status_code == 401

    assert refused("expired") == before["expired"] + 1
    assert refused("revoked") == before["revoked"] + 1
    assert refused("unknown") == before["unknown"] + 2
    logged = [r.getMessage() for r in caplog.records if r.name == "fwcm.api.deps"]
    assert logged == [
        "API key refused (expired): key old of tenant acme from 127.0.0.1",
        "API key refused (revoked): key gone of tenant acme from 127.0.0.1",
        "API key refused (unknown) from 127.0.0.1",
        "API key refused (unknown) from 127.0.0.1",
    ]
    assert http(api.key).get("/devices/d1").status_code == 404  # the revoked key's POST did nothing


def test_rotation_keeps_service_and_the_last_admin_key_stays(api: Any, http: Clients) -> None:
    admin = http(api.key)
    old = http(new_key(admin, "deploy-2026a", "operator"))
    assert old.post("/devices", json=device("d1")).status_code == 201
    new = http(new_key(admin, "deploy-2026b", "operator"))
    # both work while the clients switch over
    assert old.post("/devices", json=device("d2")).status_code == 201
    assert new.post("/devices", json=device("d3")).status_code == 201
    assert admin.delete("/keys/deploy-2026a").status_code == 200
    assert old.get("/devices").status_code == 401
    assert new.post("/devices", json=device("d4")).status_code == 201
    assert admin.delete("/keys/deploy-2026a").status_code == 404
    # a revoked name may be given to a new key
    new_key(admin, "deploy-2026a", "viewer")

    r = admin.delete("/keys/initial")
    assert r.status_code == 409
    assert "last admin key" in r.json()["detail"]
    successor = http(new_key(admin, "admin-2", "admin"))
    assert successor.delete("/keys/initial").status_code == 200
    assert admin.get("/keys").status_code == 401
    names = [k["name"] for k in successor.get("/keys", params={"revoked": "true"}).json()["items"]]
    assert names.count("deploy-2026a") == 2
    assert "initial" in names


def test_last_use_is_recorded(api: Any, http: Clients) -> None:
    admin = http(api.key)
    viewer = http(new_key(admin, "dashboard", "viewer"))
    assert {k["name"]: k["last_used_at"] for k in admin.get("/keys").json()["items"]}["dashboard"] is None
    assert viewer.get("/devices").status_code == 200
    used = {k["name"]: k["last_used_at"] for k in admin.get("/keys").json()["items"]}["dashboard"]
    assert used is not None
    assert abs(datetime.fromisoformat(used) - datetime.now(UTC)) < timedelta(minutes=1)
    assert viewer.get("/devices").status_code == 200  # within the minute: not written again
    again = {k["name"]: k["last_used_at"] for k in admin.get("/keys").json()["items"]}["dashboard"]
    assert again == used


def test_the_audit_log_says_who_did_what(api: Any, http: Clients) -> None:
    admin = http(api.key)
    start = datetime.now(UTC) - timedelta(seconds=1)
    viewer = http(new_key(admin, "dashboard", "viewer"))
    operator = http(new_key(admin, "ci", "operator"))
    operator.post("/devices", json=device("d1"))
    operator.post("/devices", json=device("d1"))  # 409: audited as well
    viewer.post("/campaigns/7/cancel")
    viewer.get("/devices")  # reads are not audited
    http(None).post("/devices", json=device("d2"))  # no key: nobody to name

    page = viewer.get("/audit", params={"since": start.isoformat()}).json()
    got = [(e["key"], e["role"], e["action"], e["object"], e["status"]) for e in page["items"]]
    assert got == [
        ("dashboard", "viewer", "POST /api/v1/campaigns/{campaign_id}/cancel", {"campaign_id": "7"}, 403),
        ("ci", "operator", "POST /api/v1/devices", {}, 409),
        ("ci", "operator", "POST /api/v1/devices", {}, 201),
        ("initial", "admin", "POST /api/v1/keys", {}, 201),
        ("initial", "admin", "POST /api/v1/keys", {}, 201),
    ]
    assert page["total"] == 5
    assert {e["source"] for e in page["items"]} == {"127.0.0.1"}
    assert all(datetime.fromisoformat(e["at"]) >= start for e in page["items"])
    assert [e["status"] for e in admin.get("/audit", params={"limit": 2}).json()["items"]] == [403, 409]
    second = admin.get("/audit", params={"limit": 2, "offset": 2}).json()
    assert (second["total"], second["limit"], second["offset"]) == (5, 2, 2)
    assert second["items"] == page["items"][2:4]
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    empty = {"items": [], "total": 0, "limit": 100, "offset": 0}
    assert admin.get("/audit", params={"since": later}).json() == empty
    assert admin.get("/audit", params={"limit": 0}).status_code == 422


def test_another_tenant_sees_none_of_it(api: Any, http: Clients) -> None:
    admin = http(api.key)
    new_key(admin, "ci", "operator")
    admin.delete("/keys/ci")
    with api.db.session() as s:
        _tenant, other_key = tenants.create_tenant(s, "globex")
    other = http(other_key)
    assert [k["name"] for k in other.get("/keys", params={"revoked": "true"}).json()["items"]] == ["initial"]
    assert other.get("/audit").json()["items"] == []
    r = other.delete("/keys/ci")
    assert (r.status_code, r.json()["detail"]) == (404, "no key named 'ci'")
    assert other.post("/keys", json={"name": "ci", "role": "viewer"}).status_code == 201
    assert [e["key"] for e in admin.get("/audit").json()["items"]] == ["initial", "initial"]
    assert [(e["action"], e["status"]) for e in other.get("/audit").json()["items"]] == [
        ("POST /api/v1/keys", 201),
        ("DELETE /api/v1/keys/{name}", 404),
    ]


def audit_failures() -> float:
    return REGISTRY.get_sample_value("fwcm_audit_write_failures_total") or 0.0


def test_a_failed_audit_write_does_not_fail_the_request(
    api: Any, http: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    with api.db.engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_log"))
    before = audit_failures()
    r = http(api.key).post("/devices", json=device("d1"))
    assert r.status_code == 201
    assert http(api.key).get("/devices/d1").status_code == 200
    assert audit_failures() == before + 1
    assert "audit entry for POST /api/v1/devices (key initial) not written" in caplog.text


def test_the_audit_log_stays_bounded(api: Any) -> None:
    with api.db.session() as s:
        other, _key = tenants.create_tenant(s, "globex")
        for tenant_id in (api.tenant_id, other.id):
            for i in range(5):
                e = audit_store.Entry(tenant_id, "initial", "admin", "POST", "/api/v1/devices", 201, "::1")
                at = utcnow() - timedelta(days=100) if i == 0 else None
                audit_store.record(s, e, at=at)
    with api.db.session() as s:
        assert audit_store.trim(s, keep=3) == 4
    with api.db.read() as s:
        assert audit_store.list_entries(s, api.tenant_id, 100, 0)[0] == 3
        assert audit_store.list_entries(s, other.id, 100, 0)[0] == 3


def test_revoked_keys_stay_bounded(api: Any) -> None:
    with api.db.session() as s:
        other, _key = tenants.create_tenant(s, "globex")
        for tenant_id in (api.tenant_id, other.id):
            for i in range(4):
                tenants.create_key(s, tenant_id, f"k{i}", "viewer")
                tenants.revoke_key(s, tenant_id, f"k{i}")
    with api.db.session() as s:
        assert tenants.trim_revoked(s, keep=1) == 6
    with api.db.read() as s:
        for tenant_id in (api.tenant_id, other.id):
            _total, left = tenants.list_keys(s, tenant_id, 100, 0, include_revoked=True)
            assert [(k.name, k.revoked_at is None) for k in left] == [("initial", True), ("k3", False)]


def test_the_key_and_audit_commands(
    api: Any, server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("FWCM_CONFIG", str(tmp_path / "cfg" / "config.toml"))
    monkeypatch.setenv("FWCM_URL", server.removesuffix("/api/v1"))
    monkeypatch.setenv("FWCM_API_KEY", api.key)

    def run(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(cli, list(args))
        return result.exit_code, result.stdout, result.stderr

    code, out, err = run("key", "create", "ci", "--role", "operator", "--expires", "30d", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert made["key"].startswith("fwcm_")
    assert (
        timedelta(days=29)
        < datetime.fromisoformat(made["expires_at"]) - datetime.now(UTC)
        <= timedelta(days=30)
    )
    code, out, _ = run("key", "create", "dash", "--role", "viewer")
    assert code == 0
    assert out.startswith("key dash created (viewer); store it now")
    assert out.strip().splitlines()[-1].startswith("fwcm_")
    assert (
        run("key", "create", "x", "--role", "root")[2].strip()
        == "error: unknown role 'root': use viewer, operator or admin"
    )
    assert "invalid duration" in run("key", "create", "x", "--role", "viewer", "--expires", "soon")[2]

    listed = json.loads(run("key", "list", "--json")[1])
    assert [(k["name"], k["role"]) for k in listed] == [
        ("initial", "admin"),
        ("ci", "operator"),
        ("dash", "viewer"),
    ]
    code, out, _ = run("key", "list")
    assert code == 0 and "operator" in out and "fwcm_" not in out
    assert run("key", "revoke", "ci") == (0, "key ci revoked\n", "")
    assert run("key", "revoke", "ci")[2].strip() == "error: no key named 'ci'"

    monkeypatch.setenv("FWCM_API_KEY", made["key"])
    assert run("key", "list")[2].strip() == "error: API key revoked"
    monkeypatch.setenv("FWCM_API_KEY", api.key)
    entries = json.loads(run("audit", "--json")[1])["items"]
    assert [(e["action"], e["status"]) for e in entries][:2] == [
        ("DELETE /api/v1/keys/{name}", 404),
        ("DELETE /api/v1/keys/{name}", 200),
    ]
    code, out, _ = run("audit", "--limit", "3")
    assert code == 0 and "name=ci" in out


def test_the_tenants_existing_key_becomes_an_admin_key_named_initial(database_url: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(normalize_url(database_url))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0008")
            conn.execute(text("INSERT INTO tenants (slug, name, kind) VALUES ('acme', 'Acme', 'fleet')"))
            for h in ("a" * 64, "b" * 64):
                conn.execute(
                    text(
                        "INSERT INTO api_keys (tenant_id, key_hash, label) "
                        "SELECT id, :h, 'default' FROM tenants"
                    ),
                    {"h": h},
                )
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            rows = conn.execute(
                text("SELECT key_hash, name, role, revoked_at FROM api_keys ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    assert [(r.key_hash[0], r.name[:4], r.role, r.revoked_at) for r in rows] == [
        ("a", "init", "admin", None),
        ("b", "key-", "admin", None),
    ]
    assert rows[0].name == "initial"


def test_an_operator_makes_a_new_admin_key_when_every_admin_key_expired(
    api: Any, http: Clients, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from fwcm.cli.main import app as fwcm

    with api.db.session() as s:
        s.execute(text("UPDATE api_keys SET expires_at = :t"), {"t": utcnow() - timedelta(minutes=1)})
    assert http(api.key).get("/keys").status_code == 401
    monkeypatch.setenv("FWCM_DATABASE_URL", api.settings.database_url)
    monkeypatch.setenv("FWCM_DATA_DIR", str(tmp_path / "data"))
    result = runner.invoke(fwcm, ["admin", "tenant-key", "acme", "rescue", "--json"])
    assert result.exit_code == 0, result.stderr
    made = json.loads(result.stdout)
    assert (made["tenant"], made["name"], made["role"]) == ("acme", "rescue", "admin")
    keys = http(made["api_key"]).get("/keys").json()["items"]
    assert [(k["name"], k["role"]) for k in keys] == [("initial", "admin"), ("rescue", "admin")]
    result = runner.invoke(fwcm, ["admin", "tenant-key", "nobody", "rescue"])
    assert (result.exit_code, result.stderr.strip()) == (1, "error: no tenant 'nobody'")
