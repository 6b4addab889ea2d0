"""The signing service over the API, with keys in a real SoftHSM2 token, on SQLite and PostgreSQL:
a tenant CA held in the token and certified by an offline root, signers issued from it, releases
signed on request after a second key's approval, and the hash-chained audit log."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select, update

from fwcm import keystore, manifest, pki
from fwcm.config import Settings
from fwcm.store.models import AuditEntry

pytestmark = pytest.mark.skipif(
    shutil.which("softhsm2-util") is None or not Path(keystore.SOFTHSM2_MODULE).exists(),
    reason="SoftHSM2 is not installed",
)

PIN = "8642"
VENDOR = manifest.vendor_id_for_domain("example.com")
CLASS = manifest.class_id_for(VENDOR, "sensor-a")


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    conf = keystore.softhsm_config(tmp_path_factory.mktemp("softhsm"))
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return conf


@pytest.fixture
def root(tmp_path: Path) -> tuple[Any, Any, Path]:
    """The operator's offline root: its key never reaches the server, only its certificate."""
    key = manifest.generate_private_key()
    cert = pki.make_root(key, "operator root")
    path = tmp_path / "root.pem"
    path.write_bytes(pki.cert_pem(cert))
    return key, cert, path


@pytest.fixture
def settings(tmp_path: Path, database_url: str, softhsm: Path, root: tuple[Any, Any, Path]) -> Settings:
    label = f"fwcm-{uuid.uuid4().hex[:10]}"
    keystore.init_softhsm_token(softhsm, label, PIN, "97531")
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        pki_root=root[2],
        pkcs11_module=keystore.SOFTHSM2_MODULE,
        pkcs11_token=label,
        pkcs11_pin=PIN,
    )


def key_client(api: Any, name: str, role: str) -> TestClient:
    r = api.client.post("/api/v1/keys", json={"name": name, "role": role})
    assert r.status_code == 201, r.text
    c = TestClient(api.app, headers={"Authorization": f"Bearer {r.json()['key']}"})
    api._clients.append(c)
    return c


def set_up_ca(api: Any, client: TestClient, root: tuple[Any, Any, Path], slug: str) -> None:
    """`fwcm ca create`: the key is made in the token, the root certifies it offline."""
    r = client.post("/api/v1/signing/ca")
    assert r.status_code == 201, r.text
    assert r.json()["store"] == "pkcs11"
    ca_pub = manifest.load_public_key(r.json()["public_key_pem"].encode())
    ca_cert = pki.make_tenant_ca(root[0], root[1], ca_pub, slug)
    r = client.put("/api/v1/signing/ca/cert", json={"cert_pem": pki.cert_pem(ca_cert).decode()})
    assert r.status_code == 200, r.text
    assert r.json()["certified"] is True


def upload(client: TestClient, image: bytes) -> dict[str, Any]:
    r = client.post("/api/v1/payloads", content=image, headers={"content-type": "application/octet-stream"})
    assert r.status_code in (200, 201), r.text
    digest = hashlib.sha256(image).hexdigest()
    return {
        "sequence": 3,
        "vendor_id": str(VENDOR),
        "class_id": str(CLASS),
        "image_digest": digest,
        "image_size": len(image),
        "uris": [f"http://127.0.0.1/p/{digest}"],
    }


def audit_ok(client: TestClient) -> dict[str, Any]:
    r = client.get("/api/v1/audit/verify")
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_production_release_needs_another_keys_approval(api: Any, root: tuple[Any, Any, Path]) -> None:
    admin = api.client
    set_up_ca(api, admin, root, api.slug)
    r = admin.post("/api/v1/signing/signers", json={"name": "production"})
    assert r.status_code == 201, r.text
    held = r.json()
    assert (held["approvals"], held["approver_role"], held["store"]) == (1, "admin", "pkcs11")
    operator = key_client(api, "ci", "operator")
    second = key_client(api, "release-manager", "admin")
    viewer = key_client(api, "auditor", "viewer")

    image = b"production firmware " * 100
    body = {"signer": "production", **upload(operator, image)}
    r = operator.post("/api/v1/releases", json=body)
    assert r.status_code == 201, r.text
    release = r.json()
    assert (release["state"], release["manifest_id"], release["requested_by"]) == ("pending", None, "ci")
    assert admin.get("/api/v1/manifests").json()["total"] == 0  # nothing signed without approval

    # the requester's own approval does not count, even with the admin role
    r = admin.post("/api/v1/releases", json={**body, "sequence": 4})
    own = r.json()
    r = admin.post(f"/api/v1/releases/{own['id']}/approve")
    assert r.status_code == 403 and "own approval does not count" in r.json()["detail"]
    assert admin.get(f"/api/v1/releases/{own['id']}").json()["state"] == "pending"
    r = key_client(api, "ops2", "operator").post(f"/api/v1/releases/{release['id']}/approve")
    assert r.status_code == 403 and "needs the admin role" in r.json()["detail"]
    assert viewer.post(f"/api/v1/releases/{release['id']}/approve").status_code == 403
    assert admin.get(f"/api/v1/releases/{release['id']}").json()["approvals"] == []

    r = second.post(f"/api/v1/releases/{release['id']}/approve")
    assert r.status_code == 200, r.text
    signed = r.json()
    assert signed["state"] == "signed" and signed["manifest_id"] is not None
    assert [a["key"] for a in signed["approvals"]] == ["release-manager"]
    assert second.post(f"/api/v1/releases/{release['id']}/approve").status_code == 409

    env_bytes = admin.get(f"/api/v1/manifests/{signed['manifest_id']}/envelope").content
    env = manifest.decode_envelope(env_bytes)
    info = pki.verify_manifest(env, root[1])  # the chain and signature a device checks
    assert (info.tenant, info.name, info.hardware_ids) == (api.slug, "production", None)
    assert env.info.image_digest == hashlib.sha256(image).digest() and env.info.sequence == 3
    assert info.key_id.hex() == admin.get("/api/v1/signers/production").json()["key_id"]
    # stored exactly as an uploaded manifest: uploading the same bytes finds it
    r = admin.post("/api/v1/manifests", content=env_bytes, headers={"content-type": "application/cbor"})
    assert r.status_code == 200 and r.json()["id"] == signed["manifest_id"]

    r = admin.post(f"/api/v1/releases/{own['id']}/reject", json={"reason": "wrong sequence"})
    assert r.json()["state"] == "rejected" and r.json()["reason"] == "wrong sequence"
    assert second.post(f"/api/v1/releases/{own['id']}/approve").status_code == 409
    listed = admin.get("/api/v1/releases", params={"state": "pending"}).json()
    assert listed["total"] == 0

    events = [
        (e["action"], e["key"], e["object"].get("digest"))
        for e in reversed(admin.get("/api/v1/audit", params={"limit": 1000}).json()["items"])
        if e["action"].startswith("EVENT ")
    ]
    kinds = [a for a, _, _ in events]
    assert kinds[:4] == [
        "EVENT key.generated",
        "EVENT certificate.installed",
        "EVENT key.generated",
        "EVENT certificate.issued",
    ]
    assert ("EVENT signature.requested", "ci", body["image_digest"]) in events
    assert ("EVENT signature.approved", "release-manager", body["image_digest"]) in events
    made = [e for e in events if e[0] == "EVENT signature.made"]
    assert made == [("EVENT signature.made", "release-manager", env.digest.hex())]
    assert ("EVENT signature.rejected", "initial", body["image_digest"]) in events
    report = audit_ok(admin)
    assert report["ok"] and report["problems"] == [] and report["checked"] >= 10


def test_developer_signer_signs_on_request_for_its_hardware(api: Any, root: tuple[Any, Any, Path]) -> None:
    set_up_ca(api, api.client, root, api.slug)
    r = api.client.post(
        "/api/v1/signing/signers", json={"name": "dev-anna", "hardware_ids": ["hw-7"], "alg": "eddsa"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["approvals"] == 0 and r.json()["hardware_ids"] == ["hw-7"]
    operator = key_client(api, "anna", "operator")
    r = operator.post("/api/v1/releases", json={"signer": "dev-anna", **upload(operator, b"dev build")})
    assert r.status_code == 201 and r.json()["state"] == "signed", r.text
    env = manifest.decode_envelope(
        api.client.get(f"/api/v1/manifests/{r.json()['manifest_id']}/envelope").content
    )
    assert env.signatures[0].alg_name == "Ed25519"  # fully-specified (RFC 9864) by default
    assert pki.verify_manifest(env, root[1]).hardware_ids == ("hw-7",)
    # refusals: unknown signer, an image never uploaded, a duplicate signer
    assert (
        operator.post("/api/v1/releases", json={"signer": "nobody", **upload(operator, b"x")}).status_code
        == 404
    )
    missing = {**upload(operator, b"y"), "image_digest": "ab" * 32}
    assert operator.post("/api/v1/releases", json={"signer": "dev-anna", **missing}).status_code == 422
    assert api.client.post("/api/v1/signing/signers", json={"name": "dev-anna"}).status_code == 409
    assert operator.post("/api/v1/signing/signers", json={"name": "x"}).status_code == 403


def test_releases_are_tenant_scoped(api: Any, root: tuple[Any, Any, Path]) -> None:
    set_up_ca(api, api.client, root, api.slug)
    assert api.client.post("/api/v1/signing/signers", json={"name": "production"}).status_code == 201
    rid = api.client.post(
        "/api/v1/releases", json={"signer": "production", **upload(api.client, b"a")}
    ).json()["id"]
    other = api.new_tenant("globex")
    assert other.get(f"/api/v1/releases/{rid}").status_code == 404
    assert other.post(f"/api/v1/releases/{rid}/approve").status_code == 404
    assert other.post(f"/api/v1/releases/{rid}/reject").status_code == 404
    assert other.get("/api/v1/releases").json()["total"] == 0
    assert other.get("/api/v1/signing/signers").json()["total"] == 0
    r = other.post("/api/v1/releases", json={"signer": "production", **upload(other, b"a")})
    assert r.status_code == 404
    assert api.client.get(f"/api/v1/releases/{rid}").json()["state"] == "pending"


def test_a_tampered_or_removed_audit_entry_is_detected(api: Any, root: tuple[Any, Any, Path]) -> None:
    set_up_ca(api, api.client, root, api.slug)
    api.client.post("/api/v1/signing/signers", json={"name": "production"})
    other = api.new_tenant("globex")
    other.post("/api/v1/devices", json={"name": "d1", "vendor_id": str(VENDOR), "class_id": str(CLASS)})
    assert audit_ok(api.client)["ok"] and audit_ok(other)["ok"]
    with api.db.session() as s:
        ids = list(
            s.scalars(
                select(AuditEntry.id).where(AuditEntry.tenant_id == api.tenant_id).order_by(AuditEntry.id)
            )
        )
        assert len(ids) >= 5
        s.execute(update(AuditEntry).where(AuditEntry.id == ids[2]).values(key_name="someone-else"))
    report = audit_ok(api.client)
    assert not report["ok"] and report["problems"] == [
        f"entry {ids[2]} was altered (its hash does not match its content)"
    ]
    assert audit_ok(other)["ok"]  # one tenant's chain is its own
    with api.db.session() as s:
        s.execute(update(AuditEntry).where(AuditEntry.id == ids[2]).values(key_name="initial"))
    assert audit_ok(api.client)["ok"]
    with api.db.session() as s:
        s.execute(delete(AuditEntry).where(AuditEntry.id == ids[3]))
    report = audit_ok(api.client)
    assert report["problems"] == [
        f"entry {ids[4]} does not follow the entry before it (removed or reordered)"
    ]


def test_cli_release_flow_and_audit_verify(
    api: Any, root: tuple[Any, Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fwcm ca create`, `fwcm signer issue`, `fwcm release create/approve/list` and
    `fwcm audit verify` against the app, each with its own key."""
    from typer.testing import CliRunner

    from fwcm.cli import common
    from fwcm.cli.client import ApiClient
    from fwcm.cli.main import app

    root_dir = tmp_path / "root"
    root_dir.mkdir()
    (root_dir / "root.key.pem").write_bytes(manifest.private_key_pem(root[0]))
    (root_dir / "root.pem").write_bytes(pki.cert_pem(root[1]))
    keys = {"admin": api.key}
    for name, role in (("ci", "operator"), ("boss", "admin")):
        keys[name] = api.client.post("/api/v1/keys", json={"name": name, "role": role}).json()["key"]
    runner = CliRunner()

    def run(who: str, *args: str) -> tuple[int, str]:
        monkeypatch.setattr(
            common, "make_client", lambda: ApiClient("http://testserver", keys[who], http=TestClient(api.app))
        )
        res = runner.invoke(app, list(args))
        return res.exit_code, res.output

    code, out = run("admin", "ca", "create", "--tenant", api.slug, "--root-dir", str(root_dir))
    assert code == 0 and "certified by the root" in out, out
    code, out = run("admin", "signer", "issue", "production")
    assert code == 0 and "need 1 approval(s) by admin" in out, out
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"cli firmware" * 50)
    code, out = run(
        "ci",
        "release",
        "create",
        str(firmware),
        "--signer",
        "production",
        "--sequence",
        "5",
        "--uri",
        "http://127.0.0.1/p/{sha256}",
        "--vendor-domain",
        "example.com",
        "--model",
        "sensor-a",
        "--json",
    )
    assert code == 0, out
    rid = json.loads(out)["id"]
    code, out = run("ci", "release", "approve", str(rid))
    assert code == 1 and "own approval does not count" in out
    code, out = run("boss", "release", "approve", str(rid), "--json")
    assert code == 0 and json.loads(out)["state"] == "signed"
    code, out = run("admin", "release", "list", "--json")
    assert [r["state"] for r in json.loads(out)] == ["signed"]
    code, out = run("admin", "audit", "verify")
    assert code == 0 and "audit chain intact" in out
    code, out = run("admin", "audit", "--json", "--limit", "3")
    newest = json.loads(out)["items"][0]
    assert code == 0 and newest["action"] == "POST /api/v1/releases/{release_id}/approve"
    with api.db.session() as s:
        entry = s.scalar(
            select(AuditEntry)
            .where(AuditEntry.tenant_id == api.tenant_id)
            .order_by(AuditEntry.id.desc())
            .limit(1)
            .offset(2)
        )
        assert entry is not None
        entry.object = {**entry.object, "digest": "0" * 64}
    code, out = run("admin", "audit", "verify")
    assert code == 1 and "was altered" in out


def test_an_unusable_token_answers_503(api: Any) -> None:
    api.settings.pkcs11_pin = "0000"  # a wrong PIN: the token refuses the login
    r = api.client.post("/api/v1/signing/ca")
    assert r.status_code == 503 and "cannot log in" in r.json()["detail"]
    assert api.client.get("/api/v1/signing/ca").status_code == 404  # nothing was recorded
