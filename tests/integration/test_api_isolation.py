"""Tenant isolation: another tenant's objects answer 404 or are absent from lists, for every resource."""

from __future__ import annotations

import hashlib
from typing import Any

from test_api import add_signer, device_json, envelope, upload_manifest


def _populate(client: Any) -> dict[str, Any]:
    image = b"acme firmware image"
    sha = client.post("/api/v1/payloads?name=acme.bin", content=image).json()["sha256"]
    key = add_signer(client, "acme-release")
    mid = upload_manifest(client, envelope(key, image)).json()["id"]
    assert (
        client.post("/api/v1/devices", json=device_json("shared-name", tags={"region": "eu"})).status_code
        == 201
    )
    draft = client.post("/api/v1/campaigns", json={"name": "draft", "manifest_id": mid, "filter": ""}).json()[
        "id"
    ]
    running = client.post("/api/v1/campaigns", json={"name": "run", "manifest_id": mid, "filter": ""}).json()[
        "id"
    ]
    assert client.post(f"/api/v1/campaigns/{running}/start").json()["total"] == 1
    return {"sha": sha, "image": image, "key": key, "mid": mid, "draft": draft, "running": running}


def test_every_resource_is_invisible_to_another_tenant(api: Any) -> None:
    a = _populate(api.client)
    b = api.new_tenant("globex")
    sha, mid, draft, running = a["sha"], a["mid"], a["draft"], a["running"]

    assert b.get("/api/v1/tenant").json()["slug"] == "globex"
    # Lists are empty.
    assert b.get("/api/v1/payloads").json()["items"] == []
    assert b.get("/api/v1/signers").json()["items"] == []
    assert b.get("/api/v1/manifests").json()["items"] == []
    assert b.get("/api/v1/devices").json()["total"] == 0
    assert b.get("/api/v1/devices", params={"filter": "tag.region == 'eu'"}).json()["items"] == []
    assert b.get("/api/v1/campaigns").json()["items"] == []

    # Direct reads, actions and sub-resources answer 404 with the same message as a missing object.
    not_found = {
        ("GET", f"/api/v1/payloads/{sha}"): f"payload {sha} not found",
        ("GET", f"/api/v1/payloads/{sha}/content"): f"payload {sha} not found",
        ("GET", "/api/v1/signers/acme-release"): "signer 'acme-release' not found",
        ("POST", "/api/v1/signers/acme-release/revoke"): "signer 'acme-release' not found",
        ("GET", f"/api/v1/manifests/{mid}"): f"manifest {mid} not found",
        ("GET", f"/api/v1/manifests/{mid}/envelope"): f"manifest {mid} not found",
        ("GET", "/api/v1/devices/shared-name"): "device 'shared-name' not found",
        ("GET", "/api/v1/devices/shared-name/events"): "device 'shared-name' not found",
        ("GET", f"/api/v1/campaigns/{draft}"): f"campaign {draft} not found",
        ("GET", f"/api/v1/campaigns/{running}/stats"): f"campaign {running} not found",
        ("GET", f"/api/v1/campaigns/{running}/devices"): f"campaign {running} not found",
        ("GET", f"/api/v1/campaigns/{running}/events"): f"campaign {running} not found",
        ("POST", f"/api/v1/campaigns/{draft}/start"): f"campaign {draft} not found",
        ("POST", f"/api/v1/campaigns/{running}/pause"): f"campaign {running} not found",
        ("POST", f"/api/v1/campaigns/{running}/resume"): f"campaign {running} not found",
        ("POST", f"/api/v1/campaigns/{running}/cancel"): f"campaign {running} not found",
    }
    for (method, url), detail in not_found.items():
        r = b.request(method, url)
        assert (r.status_code, r.json()) == (404, {"detail": detail}), (method, url)

    # B cannot build a campaign on A's manifest, and its signers do not verify A's key.
    r = b.post("/api/v1/campaigns", json={"name": "steal", "manifest_id": mid, "filter": ""})
    assert r.status_code == 422 and r.json()["detail"] == f"manifest {mid} not found"
    add_signer(b, "globex-release")
    r = upload_manifest(b, envelope(a["key"], a["image"]))
    assert r.status_code == 422

    # B may register the same device name and upload the same image: separate records.
    assert b.post("/api/v1/devices", json=device_json("shared-name")).status_code == 201
    r = b.post("/api/v1/payloads", content=a["image"])
    assert r.status_code == 201 and r.json()["created"] is True and r.json()["sha256"] == sha
    assert b.get(f"/api/v1/payloads/{sha}/content").content == a["image"]

    # B's campaign over every device sees only B's device; A's state is untouched.
    key_b = add_signer(b, "globex-2")
    mid_b = upload_manifest(b, envelope(key_b, a["image"], sequence=4)).json()["id"]
    cid_b = b.post("/api/v1/campaigns", json={"name": "all", "manifest_id": mid_b, "filter": ""}).json()["id"]
    assert b.post(f"/api/v1/campaigns/{cid_b}/start").json()["total"] == 1
    assert api.client.get(f"/api/v1/campaigns/{cid_b}").status_code == 404
    assert api.client.get(f"/api/v1/campaigns/{running}/stats").json()["total"] == 1
    assert api.client.get(f"/api/v1/campaigns/{draft}").json()["state"] == "draft"
    assert [s["name"] for s in api.client.get("/api/v1/signers").json()["items"]] == ["acme-release"]
    assert len(api.client.get("/api/v1/devices").json()["items"]) == 1

    # Anyone may fetch a published image by digest (devices have no API key).
    assert api.anonymous().get(f"/p/{sha}").content == a["image"]
    assert hashlib.sha256(a["image"]).hexdigest() == sha
