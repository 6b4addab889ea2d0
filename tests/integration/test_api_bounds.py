"""No API input gives a 500: integers beyond the database's columns, booleans for numbers, policies
outside their ranges, filters too long once stored, oversized manifests numbers and CSV headers
answer 4xx with a JSON detail, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_api import CLASS_A, VENDOR, add_signer, device_json, envelope, upload_manifest

from fwcm import manifest
from fwcm.devices import CSV_COLUMNS
from fwcm.store import tenants

HUGE = [2**63, 2**64, 10**30, -(2**63) - 1]
"""Just past a BIGINT column, past an unsigned one, far past, and below the signed range."""


def _schema(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def _is_int(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "integer" or any(s.get("type") == "integer" for s in schema.get("anyOf", []))


def _sample(spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A value of the schema's type, for the fields a test does not vary."""
    schema = _schema(spec, schema)
    options = schema.get("anyOf", [schema])
    kind = next((o.get("type") for o in options if o.get("type") != "null"), "string")
    return {"integer": 1, "number": 1, "boolean": False, "object": {}, "array": []}.get(kind, "x")


def _json_bodies(spec: dict[str, Any], op: dict[str, Any]) -> list[tuple[str, Any]]:
    """(field, body) pairs: a body of the operation with one integer field set to each HUGE value,
    to ``true``, and any ``filter`` field naming a huge sequence number."""
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" not in content:
        return []
    schema = _schema(spec, content["application/json"]["schema"])
    wrap = schema.get("type") == "array"
    if wrap:
        schema = _schema(spec, schema["items"])
    props = schema.get("properties", {})
    base = {k: _sample(spec, props[k]) for k in schema.get("required", [])}
    out: list[tuple[str, Any]] = []
    for name, prop in props.items():
        prop = _schema(spec, prop)
        values: list[Any] = []
        if _is_int(prop):
            values = [*HUGE, True]
        elif name == "filter":
            values = [f"sequence > {v}" for v in HUGE]
        for v in values:
            body = {**base, name: v}
            out.append((f"{name}={v!r}", [body] if wrap else body))
    return out


def _requests(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every operation of the API, with each integer path or query parameter set to each HUGE
    value, and each integer body field likewise."""
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            params = op.get("parameters", [])
            path_values = {p["name"]: 1 if _is_int(p["schema"]) else "x" for p in params if p["in"] == "path"}
            for p in params:
                if _is_int(p["schema"]):
                    for v in HUGE:
                        values = {**path_values, p["name"]: v} if p["in"] == "path" else path_values
                        query = {p["name"]: v} if p["in"] == "query" else {}
                        cases.append((method, path.format(**values), {"params": query}))
                elif p["in"] == "query" and p["name"] == "filter":
                    for v in HUGE:
                        query = {"filter": f"sequence < {v}"}
                        cases.append((method, path.format(**path_values), {"params": query}))
            for _field, body in _json_bodies(spec, op):
                cases.append((method, path.format(**path_values), {"json": body}))
    return cases


def test_every_route_answers_4xx_to_integers_beyond_the_columns(api: Any) -> None:
    _populate(api.client)
    maker = _manufacturer(api)
    spec = api.anonymous().get("/api/v1/openapi.json").json()
    cases = _requests(spec)
    routes = {(m, p) for m, p, _ in cases}
    assert len(routes) >= 20  # the walk reaches the API, not an empty spec
    for client in (api.client, maker):
        for method, path, kw in cases:
            r = client.request(method.upper(), path, **kw)
            assert 400 <= r.status_code < 500, (method, path, kw, r.status_code, r.text)
            assert isinstance(r.json()["detail"], str), (method, path, kw, r.text)


def test_ids_beyond_the_column_answer_422_naming_the_parameter(api: Any) -> None:
    for path in (f"/api/v1/campaigns/{2**63}", f"/api/v1/manifests/{2**63}/envelope"):
        r = api.client.get(path)
        assert r.status_code == 422 and "less than or equal to 9223372036854775807" in r.json()["detail"]
    r = api.client.get("/api/v1/devices", params={"offset": 2**63})
    assert r.status_code == 422 and r.json()["detail"].startswith("invalid request: query.offset:")
    r = api.client.get("/api/v1/campaigns/9223372036854775807")  # the largest id is merely absent
    assert r.status_code == 404


def test_booleans_are_not_numbers(api: Any) -> None:
    mid = _populate(api.client)["mid"]
    r = api.client.post("/api/v1/campaigns", json={"name": "c", "manifest_id": True})
    assert r.status_code == 422 and "manifest_id: Input should be a valid integer" in r.json()["detail"]
    r = api.client.post("/api/v1/campaigns", json={"name": "c", "manifest_id": str(mid)})
    assert r.status_code == 422
    r = api.client.post("/api/v1/devices", json=device_json("d", sequence=True))
    assert r.status_code == 422 and "sequence" in r.json()["detail"]
    r = api.client.post("/api/v1/devices", json=device_json("d", tags={"ring": True}))
    assert r.status_code == 422 and "tags.ring" in r.json()["detail"]
    r = api.client.post("/api/v1/devices", json=device_json("d", sequence=2**63))
    assert r.status_code == 422 and "sequence must be a non-negative integer" in r.json()["detail"]
    assert api.client.post("/api/v1/devices", json=device_json("d", tags={"ring": 3})).status_code == 201


# -- campaign policies --------------------------------------------------------------------------

BAD_POLICIES = [
    ({"retries": {"backoff": "100000000d"}}, "retries.backoff: must be at least 0s and at most 365d"),
    ({"retries": {"factor": 1e308}}, "retries.factor: must be at least 1 and at most 100"),
    ({"device_timeout": "100000000d"}, "device_timeout: must be at least 1s and at most 365d"),
    ({"device_timeout": 0}, "device_timeout: must be at least 1s and at most 365d"),
    ({"rate_per_minute": 1e308}, "rate_per_minute: must be at least 1 and at most 1,000,000"),
    ({"batch_max": 10**28}, "batch_max: must be at least 1 and at most 100,000"),
    ({"phases": [{"size": 1}] * 20_000 + [{}]}, "phases: at most 100 phases, not 20,001"),
]


@pytest.mark.parametrize(("policy", "message"), BAD_POLICIES)
def test_policy_values_outside_their_range_are_refused(
    api: Any, policy: dict[str, Any], message: str
) -> None:
    mid = _populate(api.client)["mid"]
    r = api.client.post("/api/v1/campaigns", json={"name": "c", "manifest_id": mid, "policy": policy})
    assert r.status_code == 422 and r.json()["detail"].startswith(f"invalid rollout policy: {message}")
    assert api.client.get("/api/v1/campaigns").json()["items"] == []


@pytest.mark.parametrize(
    ("consent", "message"),
    [
        ({"deadline": "400d"}, "consent.deadline: must be at least 1s and at most 365d"),
        ({"deadline": "1h", "max_uses": 10**12}, "consent.max_uses: must be at least 1 and at most"),
        ({"deadline": "1h", "accounting_every": 0.5}, "consent.accounting_every: must be at least 1s"),
    ],
)
def test_consent_values_outside_their_range_are_refused(
    api: Any, consent: dict[str, Any], message: str
) -> None:
    mid = _populate(api.client)["mid"]
    r = api.client.post("/api/v1/campaigns", json={"name": "c", "manifest_id": mid, "consent": consent})
    assert r.status_code == 422 and r.json()["detail"].startswith(message), r.text


# -- filters are checked as stored --------------------------------------------------------------


def test_a_filter_whose_stored_form_is_too_long_is_refused_at_create(api: Any) -> None:
    mid = _populate(api.client)["mid"]
    compact = " or ".join(["name=='a'"] * 300)  # 3,896 characters; 4,496 once canonical
    assert len(compact) <= 4096
    r = api.client.post("/api/v1/campaigns", json={"name": "c", "manifest_id": mid, "filter": compact})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "filter: its canonical form is 4,496 characters; a campaign stores at most 4,096"
    )
    fits = " or ".join(["name=='a'"] * 273)  # 4,091 characters once canonical
    ok = api.client.post("/api/v1/campaigns", json={"name": "c", "manifest_id": mid, "filter": fits})
    assert ok.status_code == 201 and len(ok.json()["filter"]) == 4091
    started = api.client.post(f"/api/v1/campaigns/{ok.json()['id']}/start")
    assert started.status_code == 200, started.text  # what create accepted can start


def test_a_consent_campaign_naming_too_many_peers_is_refused_at_create(api: Any) -> None:
    mid = _populate(api.client)["mid"]
    peers = [f"sensor-{i:04d}" for i in range(5000)]
    r = api.client.post(
        "/api/v1/campaigns",
        json={"name": "c", "manifest_id": mid, "consent": {"deadline": "1h", "peers": peers}},
    )
    assert r.status_code == 422 and r.json()["detail"] == "consent.peers: at most 1,000 devices, not 5,000"
    long_names = [f"{'p' * 60}{i:04d}" for i in range(100)]
    r = api.client.post(
        "/api/v1/campaigns",
        json={"name": "c", "manifest_id": mid, "consent": {"deadline": "1h", "peers": long_names}},
    )
    assert r.status_code == 422 and r.json()["detail"].startswith("consent.peers: the 100 device names make")
    assert api.client.get("/api/v1/campaigns").json()["items"] == []


# -- manifests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("sequence", 2**63), ("sequence", 2**64 - 1), ("size", 2**63)])
def test_manifest_numbers_beyond_the_store_are_refused(api: Any, field: str, value: int) -> None:
    key = add_signer(api.client)
    image = b"firmware"
    info = manifest.ManifestInfo(
        sequence=value if field == "sequence" else 3,
        vendor_id=VENDOR,
        class_id=CLASS_A,
        image_digest=hashlib.sha256(image).digest(),
        image_size=value if field == "size" else len(image),
        uris=("http://127.0.0.1:8080/p/x",),
    )
    r = upload_manifest(api.client, manifest.build_envelope(info, key))
    what = "sequence number" if field == "sequence" else "image size"
    assert r.status_code == 422
    assert r.json()["detail"] == (
        f"manifest refused: its {what} {value} exceeds the largest storable, {2**63 - 1}"
    )
    assert api.client.get("/api/v1/manifests").json()["items"] == []
    ok = upload_manifest(api.client, envelope(key, image, sequence=2**63 - 1))
    assert ok.status_code == 201 and ok.json()["sequence"] == 2**63 - 1


# -- CSV headers --------------------------------------------------------------------------------


def test_a_100000_column_header_is_refused_naming_the_repeated_columns(api: Any) -> None:
    header = ",".join(list(CSV_COLUMNS) * 10_000)  # 100,000 columns
    r = api.client.post("/api/v1/devices/import", content=header + "\n", headers={"content-type": "text/csv"})
    assert r.status_code == 422
    listed = ", ".join(sorted(CSV_COLUMNS))
    assert r.json()["errors"] == [f"line 1: repeated column(s) {listed} (columns: {','.join(CSV_COLUMNS)})"]
    unknown = ",".join(f"c{i}" for i in range(100_000))
    r = api.client.post(
        "/api/v1/devices/import", content=unknown + "\n", headers={"content-type": "text/csv"}
    )
    assert r.status_code == 422
    assert r.json()["errors"][0].startswith(
        "line 1: unknown column(s) c0, c1, c2, c3, c4, c5, c6, c7, c8, c9 and 99,990 more; missing column(s)"
    )


# -- helpers ------------------------------------------------------------------------------------


def _populate(client: TestClient) -> dict[str, Any]:
    image = b"firmware"
    client.post("/api/v1/payloads", content=image)
    key = add_signer(client, "bounds")
    r = upload_manifest(client, envelope(key, image))
    assert r.status_code in (200, 201), r.text
    client.post("/api/v1/devices", json=device_json("a"))
    return {"mid": r.json()["id"]}


def _manufacturer(api: Any) -> TestClient:
    with api.db.session() as s:
        _t, key = tenants.create_tenant(s, "maker", "Maker", kind="manufacturer")
    c = TestClient(api.app, headers={"Authorization": f"Bearer {key}"})
    api._clients.append(c)
    return c
