"""Management API against the real app on SQLite and PostgreSQL: happy paths and bad input."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import cbor2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fwcm import manifest
from fwcm.api import create_app
from fwcm.store.models import Deployment, Device, Manifest, Payload, Signer

VENDOR = manifest.vendor_id_for_domain("example.com")
CLASS_A = manifest.class_id_for(VENDOR, "sensor-a")


def envelope(key: Any, image: bytes = b"firmware", sequence: int = 3) -> bytes:
    info = manifest.ManifestInfo(
        sequence=sequence,
        vendor_id=VENDOR,
        class_id=CLASS_A,
        image_digest=hashlib.sha256(image).digest(),
        image_size=len(image),
        uris=(f"http://127.0.0.1:8080/p/{hashlib.sha256(image).hexdigest()}",),
    )
    return manifest.build_envelope(info, key)


def add_signer(client: TestClient, name: str = "release", alg: str = "es256") -> Any:
    key = manifest.generate_private_key(alg)
    r = client.post(
        "/api/v1/signers", json={"name": name, "public_key_pem": manifest.public_key_pem(key).decode()}
    )
    assert r.status_code == 201, r.text
    return key


def upload_manifest(client: TestClient, data: bytes) -> Any:
    return client.post("/api/v1/manifests", content=data, headers={"Content-Type": "application/cbor"})


def device_json(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "vendor_id": str(VENDOR), "class_id": str(CLASS_A), **extra}


def count(api: Any, model: Any) -> int:
    with api.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


# -- auth and OpenAPI -------------------------------------------------------------------------


def test_auth_required(api: Any) -> None:
    anon = api.anonymous()
    r = anon.get("/api/v1/tenant")
    assert r.status_code == 401
    assert r.json() == {"detail": "missing API key: send Authorization: Bearer <key>"}
    assert r.headers["www-authenticate"] == "Bearer"
    r = anon.get("/api/v1/devices", headers={"Authorization": "Bearer fwcm_nope"})
    assert r.status_code == 401 and r.json()["detail"] == "invalid API key"
    r = anon.get("/api/v1/devices", headers={"Authorization": f"Basic {api.key}"})
    assert r.status_code == 401
    me = api.client.get("/api/v1/tenant").json()
    assert me["slug"] == "acme" and me["name"] == "Acme Corp"


def test_openapi_and_docs_served(api: Any) -> None:
    spec = api.anonymous().get("/api/v1/openapi.json").json()
    assert "/api/v1/campaigns/{campaign_id}/start" in spec["paths"]
    assert "application/cbor" in spec["paths"]["/api/v1/manifests"]["post"]["requestBody"]["content"]
    assert api.anonymous().get("/api/v1/docs").status_code == 200


def test_openapi_operation_ids_are_unique(api: Any) -> None:
    spec = api.anonymous().get("/api/v1/openapi.json").json()
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert sorted({i for i in ids if ids.count(i) > 1}) == []
    for path in ("/p/{sha256}", "/api/v1/payloads/{sha256}/content"):  # HEAD is documented beside GET
        assert {"get", "head"} <= spec["paths"][path].keys()


def test_unknown_route_is_json_404(api: Any) -> None:
    r = api.client.get("/api/v1/nothing-here")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


# -- payloads ---------------------------------------------------------------------------------


def test_payload_upload_dedupe_and_list(api: Any) -> None:
    data = os.urandom(200_000)
    sha = hashlib.sha256(data).hexdigest()
    r = api.client.post("/api/v1/payloads?name=fw-1.0.bin", content=data)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["sha256"], body["size"], body["created"], body["name"]) == (
        sha,
        len(data),
        True,
        "fw-1.0.bin",
    )
    r = api.client.post("/api/v1/payloads", content=data)
    assert r.status_code == 200 and r.json()["created"] is False
    assert [p["sha256"] for p in api.client.get("/api/v1/payloads").json()["items"]] == [sha]
    assert api.client.get(f"/api/v1/payloads/{sha}").json()["size"] == len(data)
    assert api.client.get(f"/api/v1/payloads/{sha.upper()}").status_code == 200
    assert api.client.get("/api/v1/payloads/" + "0" * 64).status_code == 404
    assert api.client.get("/api/v1/payloads/not-a-digest").status_code == 404


def test_payload_oversized_and_empty_refused(api: Any) -> None:
    api.settings.max_payload_bytes = 1000
    r = api.client.post("/api/v1/payloads", content=b"x" * 1001)
    assert r.status_code == 413 and "exceeds the limit of 1000 bytes" in r.json()["detail"]

    def chunks() -> Any:  # no Content-Length: the limit must bite while streaming
        for _ in range(5):
            yield b"y" * 400

    r = api.client.post("/api/v1/payloads", content=chunks())
    assert r.status_code == 413
    r = api.client.post("/api/v1/payloads", content=b"")
    assert r.status_code == 400 and r.json()["detail"] == "payload is empty"
    assert count(api, Payload) == 0
    tmp = api.settings.payload_dir / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


@pytest.mark.parametrize("route", ["api", "public"])
def test_payload_range_and_etag(api: Any, route: str) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    sha = api.client.post("/api/v1/payloads", content=data).json()["sha256"]
    client = api.client if route == "api" else api.anonymous()
    url = f"/api/v1/payloads/{sha}/content" if route == "api" else f"/p/{sha}"
    etag = f'"{sha}"'

    r = client.get(url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["etag"] == etag and r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-length"] == str(len(data))

    r = client.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"

    r = client.get(url, headers={"Range": "bytes=10000-"})
    assert r.status_code == 206 and r.content == data[10000:]
    r = client.get(url, headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:]
    assert r.headers["content-range"] == f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}"
    r = client.get(url, headers={"Range": "bytes=10200-99999"})
    assert r.status_code == 206 and r.content == data[10200:]

    r = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    r = client.get(url, headers={"Range": "bytes=0-1,5-6"})  # multi-range: whole file
    assert r.status_code == 200 and r.content == data

    r = client.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""
    r = client.get(url, headers={"Range": "bytes=0-3", "If-Range": '"other"'})
    assert r.status_code == 200 and r.content == data
    r = client.get(url, headers={"Range": "bytes=0-3", "If-Range": etag})
    assert r.status_code == 206 and r.content == data[:4]

    r = client.head(url)
    assert r.status_code == 200 and r.headers["content-length"] == str(len(data)) and r.content == b""
    missing = "f" * 64
    assert client.get(url.replace(sha, missing)).status_code == 404


def test_public_route_serves_only_recorded_payloads(api: Any) -> None:
    anon = api.anonymous()
    assert anon.get("/p/../../etc/passwd").status_code == 404
    assert anon.get("/p/" + "a" * 64).status_code == 404


# -- signers and manifests --------------------------------------------------------------------


def test_signer_add_list_and_bad_key(api: Any) -> None:
    key = add_signer(api.client, "release", "eddsa")
    signers = api.client.get("/api/v1/signers").json()["items"]
    assert [(s["name"], s["alg"], s["key_id"]) for s in signers] == [
        ("release", "eddsa", manifest.key_id(key).hex())
    ]
    r = api.client.post("/api/v1/signers", json={"name": "x", "public_key_pem": "not a key"})
    assert r.status_code == 422 and r.json()["detail"].startswith("public key refused:")
    r = api.client.post(
        "/api/v1/signers", json={"name": "release", "public_key_pem": manifest.public_key_pem(key).decode()}
    )
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    r = api.client.post("/api/v1/signers", json={"name": "x"})
    assert r.status_code == 422 and "public_key_pem" in r.json()["detail"]
    assert count(api, Signer) == 1


def test_manifest_upload_decoded_and_envelope_exact(api: Any) -> None:
    key = add_signer(api.client)
    env = envelope(key, sequence=7)
    r = upload_manifest(api.client, env)
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["sequence"] == 7 and m["class_id"] == str(CLASS_A) and m["vendor_id"] == str(VENDOR)
    assert m["image_digest"] == hashlib.sha256(b"firmware").hexdigest() and m["image_size"] == 8
    assert m["signer"] == "release" and m["size"] == len(env) and m["created"] is True
    assert m["digest"] == manifest.decode_envelope(env).digest.hex()
    r = upload_manifest(api.client, env)
    assert r.status_code == 200 and r.json()["id"] == m["id"] and r.json()["created"] is False
    r = api.client.get(f"/api/v1/manifests/{m['id']}/envelope")
    assert r.content == env and r.headers["content-type"] == "application/cbor"
    assert [x["id"] for x in api.client.get("/api/v1/manifests").json()["items"]] == [m["id"]]
    assert api.client.get(f"/api/v1/manifests/{m['id']}").json()["uris"] == m["uris"]


def test_manifest_bad_input_refused(api: Any) -> None:
    key = add_signer(api.client)
    stranger = manifest.generate_private_key()
    env = envelope(key)

    r = upload_manifest(api.client, b"\xff\x00 definitely not cbor")
    assert r.status_code == 400 and r.json()["detail"].startswith("manifest refused:")
    r = upload_manifest(api.client, cbor2.dumps({"hello": "world"}))
    assert r.status_code == 400 and r.json()["detail"].startswith("manifest refused:")
    r = upload_manifest(api.client, b"")
    assert r.status_code == 400 and r.json()["detail"] == "empty manifest"

    r = upload_manifest(api.client, envelope(stranger))
    assert r.status_code == 422 and "manifest refused:" in r.json()["detail"]

    # Flip one bit inside the signature bytes: decodes fine, fails verification.
    sig = manifest.decode_envelope(env).signatures[0].signature
    pos = env.index(sig) + len(sig) // 2
    tampered = env[:pos] + bytes([env[pos] ^ 0x01]) + env[pos + 1 :]
    r = upload_manifest(api.client, tampered)
    assert r.status_code == 422, r.text

    api.settings.max_manifest_bytes = 100
    r = upload_manifest(api.client, env)
    assert r.status_code == 413 and "exceeds the limit of 100 bytes" in r.json()["detail"]
    assert count(api, Manifest) == 0


def test_manifest_without_any_signer_names_the_fix(api: Any) -> None:
    r = upload_manifest(api.client, envelope(manifest.generate_private_key()))
    assert r.status_code == 422 and "no trusted signers" in r.json()["detail"]


# -- devices ----------------------------------------------------------------------------------


def test_device_register_show_and_secret_once(api: Any) -> None:
    r = api.client.post("/api/v1/devices", json=device_json("dev-1", tags={"region": "eu", "rack": 3}))
    assert r.status_code == 201, r.text
    d = r.json()
    assert len(bytes.fromhex(d["secret"])) == 32 and d["tags"] == {"region": "eu", "rack": "3"}
    shown = api.client.get("/api/v1/devices/dev-1").json()
    assert shown["secret"] is None and shown["transport"] == "mqtt" and shown["sequence"] == 0
    with api.db.session() as s:
        assert s.scalar(select(Device.secret)).hex() == d["secret"]
    r = api.client.post("/api/v1/devices", json=device_json("dev-1"))
    assert r.status_code == 409 and r.json()["detail"] == "device 'dev-1' already exists"
    secret = os.urandom(32).hex()
    r = api.client.post("/api/v1/devices", json=device_json("dev-2", secret=secret, transport="coap"))
    assert r.json()["secret"] == secret and r.json()["transport"] == "coap"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (device_json("bad name"), "device name 'bad name' is not valid"),
        (device_json("d", transport="sms"), "transport must be one of mqtt, coap"),
        ({**device_json("d"), "class_id": "nope"}, "class_id must be a UUID"),
        (device_json("d", sequence=-1), "sequence must be a non-negative integer"),
        (device_json("d", secret="00"), "secret must be 32 bytes"),
        (device_json("d", tags={"bad key": "x"}), "tag key 'bad key'"),
        ({"name": "d"}, "vendor_id: Field required"),
        (device_json("d", colour="red"), "colour: Extra inputs are not permitted"),
    ],
)
def test_device_bad_input(api: Any, body: dict[str, Any], needle: str) -> None:
    r = api.client.post("/api/v1/devices", json=body)
    assert r.status_code == 422
    assert needle in r.json()["detail"]
    assert count(api, Device) == 0


CSV_HEADER = "name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"


def test_device_import_and_filtered_list(api: Any) -> None:
    rows = [
        f"n{i:03d},{VENDOR},{CLASS_A},region={'eu' if i % 2 else 'us'};rack={i % 3},{i % 10},1.{i},"
        f"{'coap' if i % 5 == 0 else 'mqtt'},,"
        for i in range(100)
    ]
    r = api.client.post(
        "/api/v1/devices/import", content="\n".join([CSV_HEADER, *rows]), headers={"Content-Type": "text/csv"}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["imported"] == 100 and len(body["devices"]) == 100
    assert all(len(bytes.fromhex(d["secret"])) == 32 for d in body["devices"])
    page = api.client.get("/api/v1/devices", params={"filter": 'tag.region == "eu" and sequence < 5'}).json()
    expected = sorted(f"n{i:03d}" for i in range(100) if i % 2 and i % 10 < 5)
    assert page["total"] == len(expected) and [d["name"] for d in page["items"]] == expected
    page = api.client.get("/api/v1/devices", params={"limit": 10, "offset": 95}).json()
    assert page["total"] == 100 and [d["name"] for d in page["items"]] == [
        f"n{i:03d}" for i in range(95, 100)
    ]


def test_device_import_malformed_rows_nothing_stored(api: Any) -> None:
    csv_text = "\n".join(
        [
            CSV_HEADER,
            f"ok-1,{VENDOR},{CLASS_A},region=eu,1,,mqtt,,",
            f"ok-2,{VENDOR},nope,,1,,mqtt,,",
            f"ok-3,{VENDOR},{CLASS_A},,x,,mqtt,,",
            f"ok-4,{VENDOR},{CLASS_A},,1,,mqtt,,",
        ]
    )
    r = api.client.post("/api/v1/devices/import", content=csv_text, headers={"Content-Type": "text/csv"})
    assert r.status_code == 422
    body = r.json()
    assert body["errors"] == [
        "line 3: class_id must be a UUID, got 'nope'",
        "line 4: sequence must be an integer, got 'x'",
    ]
    assert "nothing imported" in body["detail"] and "line 3" in body["detail"]
    assert count(api, Device) == 0
    r = api.client.post("/api/v1/devices/import", content=b"\xff\xfe", headers={"Content-Type": "text/csv"})
    assert r.status_code == 400 and "not UTF-8" in r.json()["detail"]


def test_invalid_filter_is_422_naming_problem(api: Any) -> None:
    r = api.client.get("/api/v1/devices", params={"filter": 'tag.region = "eu"'})
    assert r.status_code == 422
    assert r.json()["detail"] == "invalid filter at column 12: use '==' to compare"


# -- campaigns --------------------------------------------------------------------------------


class RecordingHooks:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.device_changes = 0

    def campaign_changed(self, campaign_id: int) -> None:
        self.calls.append(campaign_id)

    def devices_changed(self) -> None:
        self.device_changes += 1


def test_campaign_lifecycle_freezes_subset(api: Any) -> None:
    hooks = RecordingHooks()
    client = TestClient(
        create_app(api.db, api.settings, hooks), headers={"Authorization": f"Bearer {api.key}"}
    )
    key = add_signer(client)
    mid = upload_manifest(client, envelope(key)).json()["id"]
    for i in range(10):
        client.post("/api/v1/devices", json=device_json(f"d{i}", tags={"region": "eu" if i < 6 else "us"}))

    r = client.post(
        "/api/v1/campaigns", json={"name": "eu", "manifest_id": mid, "filter": "tag.region == 'eu'"}
    )
    assert r.status_code == 201, r.text
    c = r.json()
    assert c["state"] == "draft" and c["filter"] == 'tag.region == "eu"' and c["total"] == 0
    cid = c["id"]

    r = client.post(f"/api/v1/campaigns/{cid}/pause")
    assert r.status_code == 409 and "is draft" in r.json()["detail"]
    r = client.post(f"/api/v1/campaigns/{cid}/start")
    assert r.status_code == 200 and r.json()["state"] == "running" and r.json()["total"] == 6
    assert hooks.calls == [cid]
    r = client.post(f"/api/v1/campaigns/{cid}/start")
    assert r.status_code == 409 and r.json()["detail"] == (
        f"campaign {cid} is running; only a draft or scheduled campaign can start"
    )

    client.post("/api/v1/devices", json=device_json("late", tags={"region": "eu"}))
    stats = client.get(f"/api/v1/campaigns/{cid}/stats").json()
    assert stats["total"] == 6 and stats["counts"]["pending"] == 6 and stats["state"] == "running"
    assert sum(stats["counts"].values()) == 6
    page = client.get(f"/api/v1/campaigns/{cid}/devices", params={"state": "pending"}).json()
    assert page["total"] == 6 and [d["device"] for d in page["items"]] == [f"d{i}" for i in range(6)]
    assert client.get(f"/api/v1/campaigns/{cid}/devices", params={"state": "failed"}).json()["total"] == 0
    r = client.get(f"/api/v1/campaigns/{cid}/devices", params={"state": "exploded"})
    assert r.status_code == 422 and "unknown state 'exploded'" in r.json()["detail"]

    assert client.post(f"/api/v1/campaigns/{cid}/pause").json()["state"] == "paused"
    assert client.post(f"/api/v1/campaigns/{cid}/resume").json()["state"] == "running"
    assert client.post(f"/api/v1/campaigns/{cid}/cancel").json()["state"] == "cancelled"
    assert client.post(f"/api/v1/campaigns/{cid}/resume").status_code == 409
    assert hooks.calls == [cid] * 4
    events = client.get(f"/api/v1/campaigns/{cid}/events").json()["items"]
    assert [e["state"] for e in events] == ["draft", "running", "paused", "running", "cancelled"]
    assert [x["id"] for x in client.get("/api/v1/campaigns").json()["items"]] == [cid]
    assert client.get("/api/v1/campaigns", params={"state": "cancelled"}).json()["items"][0]["id"] == cid
    with api.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Deployment)) == 6
    client.close()


def test_campaign_bad_input(api: Any) -> None:
    key = add_signer(api.client)
    mid = upload_manifest(api.client, envelope(key)).json()["id"]
    r = api.client.post(
        "/api/v1/campaigns", json={"name": "x", "manifest_id": mid, "filter": "sequence < 'a'"}
    )
    assert r.status_code == 422 and "sequence is an integer" in r.json()["detail"]
    r = api.client.post("/api/v1/campaigns", json={"name": "x", "manifest_id": 999, "filter": ""})
    assert r.status_code == 422 and r.json()["detail"] == "manifest 999 not found"
    r = api.client.post("/api/v1/campaigns", json={"name": "", "manifest_id": mid})
    assert r.status_code == 422 and "name" in r.json()["detail"]
    r = api.client.post("/api/v1/campaigns", json={"name": "x", "manifest_id": mid, "policy": [1]})
    assert r.status_code == 422
    assert api.client.get("/api/v1/campaigns").json()["items"] == []
    assert api.client.post("/api/v1/campaigns/12345/start").status_code == 404
