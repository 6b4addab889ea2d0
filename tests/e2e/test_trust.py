"""Trust end to end: certificate chains, developer builds, attestation, install tokens, credentials.

Real server, broker, CoAP over UDP and HTTP; devices are the simulator or hand-made messages.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, update

from device_sim.agent import DeviceConfig
from device_sim.faults import get_profile
from device_sim.fleet import FleetReport, run_fleet
from fwcm import attestation, pki, protocol
from fwcm import manifest as mf
from fwcm.protocol import LwState, Report, Result
from fwcm.server.metrics import REGISTRY
from fwcm.store import notices as nq
from fwcm.store import trust as trust_store
from fwcm.store.models import Deployment, Device

from .conftest import CLASS, VENDOR, Env, firmware
from .test_bad_input import publisher, wait_for

pytestmark = pytest.mark.timeout(240)


@dataclass
class Pki:
    """Operator root, the tenant's CA and a certified release signer, registered on the server."""

    root_key: Any
    root: Any
    ca_key: Any
    ca: Any
    signer_key: Any = field(default_factory=lambda: mf.generate_private_key("es256"))

    @property
    def root_pem(self) -> bytes:
        return pki.cert_pem(self.root)

    def signer_cert(self, key: Any, name: str, hardware_ids: list[str] | None = None) -> bytes:
        cert = pki.make_signer(self.ca_key, self.ca, mf.public_of(key), name, hardware_ids=hardware_ids)
        return pki.cert_pem(cert)

    def chain(self, key: Any, name: str, hardware_ids: list[str] | None = None) -> list[bytes]:
        cert = pki.make_signer(self.ca_key, self.ca, mf.public_of(key), name, hardware_ids=hardware_ids)
        return [pki.cert_der(cert), pki.cert_der(self.ca)]


def make_pki(tenant: str = "acme") -> Pki:
    root_key = mf.generate_private_key("es256")
    root = pki.make_root(root_key, "test operator root")
    ca_key = mf.generate_private_key("es256")
    ca = pki.make_tenant_ca(root_key, root, mf.public_of(ca_key), tenant)
    return Pki(root_key, root, ca_key, ca)


@pytest.fixture
async def trust(env: Env, tmp_path: Path) -> Pki:
    p = make_pki()
    (tmp_path / "root.pem").write_bytes(p.root_pem)
    env.settings.pki_root = tmp_path / "root.pem"
    with env.server.db.session() as s:
        trust_store.set_tenant_ca(s, "acme", pki.cert_pem(p.ca), p.root)
    cert = p.signer_cert(p.signer_key, "certified").decode()
    sg = await env.call("POST", "/signers", json={"name": "certified", "cert_pem": cert})
    assert sg["certified"] and sg["hardware_ids"] is None
    return p


async def upload(env: Env, image: bytes, key: Any, x5chain: list[bytes] | None, sequence: int = 2) -> Any:
    """Payload plus a manifest signed by ``key`` carrying ``x5chain``; returns the raw response."""
    sha = hashlib.sha256(image).hexdigest()
    await env.call("POST", "/payloads", content=image)
    info = mf.ManifestInfo(
        sequence=sequence,
        vendor_id=VENDOR,
        class_id=CLASS,
        image_digest=bytes.fromhex(sha),
        image_size=len(image),
        uris=(f"{env.settings.public_http_url}/p/{sha}", f"{env.settings.public_coap_url}/p/{sha}"),
    )
    envelope = mf.build_envelope(info, key, x5chain=x5chain)
    return await env.http.post(
        "/api/v1/manifests", content=envelope, headers={"content-type": "application/cbor"}
    )


def spki_b64(key: Any) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


async def register(
    env: Env, names: list[str], keys: dict[str, Any], transport: str = "mixed"
) -> dict[str, bytes]:
    rows = ["name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret,attest_key"]
    for i, n in enumerate(names):
        t = transport if transport != "mixed" else ("mqtt" if i % 2 else "coap")
        ak = spki_b64(keys[n]) if n in keys else ""
        rows.append(f"{n},{VENDOR},{CLASS},,1,1.0,{t},hw-{n},,{ak}")
    out = await env.call(
        "POST", "/devices/import", content="\n".join(rows) + "\n", headers={"content-type": "text/csv"}
    )
    return {d["name"]: bytes.fromhex(d["secret"]) for d in out["devices"]}


def fleet_configs(
    env: Env, p: Pki, secrets: dict[str, bytes], keys: dict[str, Any], tmp: Path
) -> list[DeviceConfig]:
    names = sorted(secrets)
    return [
        DeviceConfig(
            name=n,
            tenant="acme",
            secret=secrets[n],
            vendor_id=VENDOR,
            class_id=CLASS,
            transport="mqtt" if i % 2 else "coap",
            trust_anchors=[],
            state_dir=tmp / "devices",
            mqtt_url=env.broker.url,
            coap_url=env.settings.public_coap_url,
            installed_sequence=1,
            hardware_id=f"hw-{n}",
            trust_root=p.root_pem,
            attest_key=mf.private_key_pem(keys[n]) if n in keys else None,
            index=i,
        )
        for i, n in enumerate(names)
    ]


async def run_until_done(
    env: Env, cid: int, configs: list[DeviceConfig], faults: str = "none"
) -> tuple[dict[str, Any], FleetReport]:
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(configs, get_profile(faults), until=lambda _r: stop.is_set(), timeout=150)
    )
    await env.call("POST", f"/campaigns/{cid}/start")
    stats: dict[str, Any] = {}

    async def ended() -> bool:
        nonlocal stats
        stats = await env.call("GET", f"/campaigns/{cid}/stats")
        busy = sum(stats["counts"][s] for s in ("notified", "downloading", "downloaded", "installing"))
        return stats["state"] in ("completed", "stopped", "cancelled") and busy == 0

    await wait_for(ended, 120)
    await asyncio.sleep(1.0)  # credentials follow the last success
    stop.set()
    return stats, await fleet


def counter(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_attested_campaign_genuine_devices_install_rogue_ones_are_refused(
    env: Env, trust: Pki, tmp_path: Path
) -> None:
    names = [f"a{i:03d}" for i in range(20)]
    keys = {n: mf.generate_private_key("es256") for n in names}
    secrets = await register(env, names, keys)
    r = await upload(env, firmware(20_000), trust.signer_key, trust.chain(trust.signer_key, "certified"))
    assert r.status_code == 201, r.text
    c = await env.call(
        "POST", "/campaigns", json={"name": "att", "manifest_id": r.json()["id"], "attestation": True}
    )
    assert c["attestation"] is True
    accepted_before = counter("fwcm_attestations_total", {"outcome": "accepted"})
    stats, report = await run_until_done(
        env, c["id"], fleet_configs(env, trust, secrets, keys, tmp_path), "rogue"
    )

    rogue = {n for i, n in enumerate(names) if get_profile("rogue").affected(i)}
    assert len(rogue) == 2
    assert stats["counts"]["succeeded"] == 18 and stats["counts"]["failed"] == 2
    failed = await env.call("GET", f"/campaigns/{c['id']}/devices", params={"state": "failed"})
    assert {d["device"] for d in failed["items"]} == rogue
    assert {d["result"] for d in failed["items"]} == {int(Result.ATTESTATION_REFUSED)}
    reasons = sorted(d["detail"].split(":")[1].strip() for d in failed["items"])
    assert reasons == ["bad_signature", "stale_nonce"]  # the forged key; the replayed attestation
    assert counter("fwcm_attestations_total", {"outcome": "accepted"}) - accepted_before == 18
    for n in rogue:
        assert report.devices[n].installed_sequence == 1 and report.devices[n].credentials == 0

    with env.server.db.read() as s:
        server_keys = [mf.public_of(mf.load_private_key(k)) for k in nq.server_signing_keys(s)]
    from device_sim.flash import Flash

    for n in set(names) - rogue:
        assert report.devices[n].installed_sequence == 2
        creds = Flash(tmp_path / "devices" / n).state.credentials
        assert list(creds) == [str(c["id"])], n
        grant = attestation.read_credential(bytes.fromhex(creds[str(c["id"])]), server_keys)
        assert (grant.tenant, grant.device, grant.sequence) == ("acme", n, 2)
        assert grant.image_digest == hashlib.sha256(firmware(20_000)).digest()


async def test_payload_endpoints_refuse_fetches_without_a_valid_install_token(
    env: Env, trust: Pki, tmp_path: Path
) -> None:
    keys = {n: mf.generate_private_key("es256") for n in ("t0", "t1")}
    await register(env, ["t0", "t1"], keys, transport="mqtt")
    image = firmware(5_000, seed=11)
    open_image = firmware(3_000, seed=12)
    sha, open_sha = hashlib.sha256(image).hexdigest(), hashlib.sha256(open_image).hexdigest()
    r = await upload(env, image, trust.signer_key, trust.chain(trust.signer_key, "certified"))
    await env.call("POST", "/payloads", content=open_image)
    c = await env.call(
        "POST", "/campaigns", json={"name": "att", "manifest_id": r.json()["id"], "attestation": True}
    )
    await env.call("POST", f"/campaigns/{c['id']}/start")

    with env.server.db.read() as s:
        server_key = mf.load_private_key(nq.server_signing_keys(s)[0])
    now = int(datetime.now(UTC).timestamp())

    def token(
        device: str = "t0", *, image_sha: str = sha, expires: int = now + 60, key: Any = server_key
    ) -> str:
        g = attestation.Grant("acme", device, b"\0" * 32, bytes.fromhex(image_sha), c["id"], expires=expires)
        return attestation.b64(attestation.issue_token(attestation.token_key(key), g))

    async def http(query: dict[str, str], digest: str = sha) -> int:
        return (await env.http.get(f"/p/{digest}", params=query)).status_code

    assert await http({}) == 401
    assert await http({"d": "acme/t0", "t": token()}) == 200
    assert (await env.http.get(f"/p/{sha}", params={"d": "acme/t0", "t": token()})).content == image
    assert await http({"d": "acme/t1", "t": token("t0")}) == 401  # another device's token
    assert await http({"d": "acme/t0", "t": token(expires=now - 1)}) == 401
    assert await http({"d": "acme/t0", "t": token(key=mf.generate_private_key("eddsa"))}) == 401
    assert await http({"d": "acme/t0", "t": token(image_sha=open_sha)}) == 401  # for another image
    assert await http({"d": "acme/t0", "t": "not base64 !"}) == 401
    assert await http({}, open_sha) == 200  # images of campaigns without attestation stay open
    assert counter("fwcm_install_tokens_refused_total", {"transport": "http", "reason": "expired"}) >= 1
    assert counter("fwcm_install_tokens_refused_total", {"transport": "http", "reason": "wrong_device"}) >= 1

    ctx = await aiocoap.Context.create_client_context()
    try:
        base = f"{env.settings.public_coap_url}/p/{sha}"

        async def coap(uri: str) -> aiocoap.Message:
            return await asyncio.wait_for(ctx.request(aiocoap.Message(code=Code.GET, uri=uri)).response, 20)

        assert (await coap(base)).code == Code.UNAUTHORIZED
        assert (await coap(f"{base}?d=acme/t0&t={token(expires=now - 5)}")).code == Code.UNAUTHORIZED
        ok = await coap(f"{base}?d=acme/t0&t={token()}")
        assert ok.code == Code.CONTENT and ok.payload == image
    finally:
        await ctx.shutdown()

    if shutil.which("coap-client-notls"):  # libcoap keeps each Uri-Query option within 255 bytes
        out = tmp_path / "image.bin"
        proc = await asyncio.create_subprocess_exec(
            "coap-client-notls",
            "-m",
            "get",
            "-b",
            "1024",
            "-o",
            str(out),
            f"{base}?d=acme/t0&t={token()}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        said, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert out.exists() and out.read_bytes() == image, said.decode()


def evidence_report(name: str, campaign: int, seq: int, evidence: bytes) -> Report:
    return Report(
        name, campaign, 1, seq, LwState.IDLE, Result.INITIAL, extra={protocol.REPORT_EVIDENCE: evidence}
    )


async def test_server_refuses_forged_replayed_misnamed_expired_and_keyless_evidence(
    env: Env, trust: Pki
) -> None:
    names = ["e-forged", "e-named", "e-replay", "e-expired", "e-nokey"]
    keys = {n: mf.generate_private_key("es256") for n in names if n != "e-nokey"}
    secrets = await register(env, names, keys, transport="mqtt")
    r = await upload(
        env, firmware(4_000, seed=5), trust.signer_key, trust.chain(trust.signer_key, "certified")
    )
    man = r.json()
    c = await env.call(
        "POST", "/campaigns", json={"name": "att", "manifest_id": man["id"], "attestation": True}
    )
    await env.call("POST", f"/campaigns/{c['id']}/start")
    cid = c["id"]

    def nonces() -> dict[str, bytes | None]:
        with env.server.db.read() as s:
            rows = s.execute(
                select(Device.name, Deployment.nonce)
                .join(Device, Device.id == Deployment.device_id)
                .where(Deployment.campaign_id == cid)
            ).all()
        return {n: v for n, v in rows}

    async def all_notified() -> bool:
        return all(v is not None for v in nonces().values())

    await wait_for(all_notified, 20)
    n = nonces()
    with env.server.db.session() as s:  # one nonce was issued long ago
        s.execute(
            update(Deployment)
            .where(Deployment.device_id.in_(select(Device.id).where(Device.name == "e-expired")))
            .values(nonce_at=datetime.now(UTC) - timedelta(seconds=attestation.NONCE_TTL_S + 60))
        )
    digest = bytes.fromhex(man["digest"])

    def ev(name: str, *, key: Any = None, device: str | None = None) -> bytes:
        k = key or keys.get(name) or mf.generate_private_key("es256")
        return attestation.make_evidence(
            k,
            attestation.Evidence(n[name] or b"", device or name, b"\1" * 32, digest),  # type: ignore[arg-type]
        )

    genuine = ev("e-replay")
    sends = [
        ("e-forged", 1, ev("e-forged", key=mf.generate_private_key("es256"))),
        ("e-named", 1, ev("e-named", device="e-forged")),
        ("e-replay", 1, genuine),
        ("e-expired", 1, ev("e-expired")),
        ("e-nokey", 1, ev("e-nokey")),
    ]
    client = publisher(env)
    try:
        for name, seq, data in sends:
            sealed = protocol.encode_report(secrets[name], evidence_report(name, cid, seq, data))
            client.publish(protocol.status_topic("acme", name), sealed, qos=1).wait_for_publish(5)

        async def judged() -> bool:
            devs = await env.call("GET", f"/campaigns/{cid}/devices", params={"state": "failed"})
            return devs["total"] == 4

        await wait_for(judged, 20)
        # the genuine evidence was accepted once; sent again it is a replay
        sealed = protocol.encode_report(secrets["e-replay"], evidence_report("e-replay", cid, 2, genuine))
        client.publish(protocol.status_topic("acme", "e-replay"), sealed, qos=1).wait_for_publish(5)

        async def replay_judged() -> bool:
            devs = await env.call("GET", f"/campaigns/{cid}/devices", params={"state": "failed"})
            return devs["total"] == 5

        await wait_for(replay_judged, 20)
    finally:
        client.loop_stop()
        client.disconnect()
    devs = await env.call("GET", f"/campaigns/{cid}/devices", params={"state": "failed"})
    reasons = {d["device"]: d["detail"].split(":")[1].strip() for d in devs["items"]}
    assert reasons == {
        "e-forged": "bad_signature",
        "e-named": "wrong_device",
        "e-replay": "replayed",
        "e-expired": "expired",
        "e-nokey": "no_key",
    }
    assert {d["result"] for d in devs["items"]} == {int(Result.ATTESTATION_REFUSED)}


async def test_certificate_chains_are_checked_on_upload_and_revocation_cancels(env: Env, trust: Pki) -> None:
    other = make_pki("acme")  # same tenant name, another operator's root
    other_tenant = make_pki("globex")
    rogue_key = mf.generate_private_key("es256")

    async def add(name: str, cert: bytes) -> Any:
        return await env.http.post("/api/v1/signers", json={"name": name, "cert_pem": cert.decode()})

    r = await add("foreign", other.signer_cert(rogue_key, "foreign"))
    assert r.status_code == 422 and "certificate chain refused" in r.json()["detail"]
    r = await add("globex", other_tenant.signer_cert(rogue_key, "globex"))
    assert r.status_code == 422
    ca_as_signer = pki.cert_pem(trust.ca)
    r = await add("ca", ca_as_signer)
    assert r.status_code == 422

    image = firmware(6_000, seed=21)
    r = await upload(env, image, trust.signer_key, trust.chain(trust.signer_key, "certified"))
    assert r.status_code == 201, r.text
    r = await upload(env, image, rogue_key, other.chain(rogue_key, "x"), sequence=3)
    assert r.status_code == 422 and "unknown_root" in r.text
    r = await upload(env, image, rogue_key, trust.chain(rogue_key, "unregistered"), sequence=4)
    assert r.status_code == 422 and "unknown key" in r.text  # certified, but not a registered signer
    r = await upload(env, image, rogue_key, trust.chain(trust.signer_key, "certified"), sequence=5)
    assert r.status_code == 422  # the chain names one key, another one signed

    second_key = mf.generate_private_key("es256")
    await env.call(
        "POST",
        "/signers",
        json={"name": "second", "cert_pem": trust.signer_cert(second_key, "second").decode()},
    )
    r = await upload(env, image, second_key, trust.chain(second_key, "second"), sequence=6)
    assert r.status_code == 201
    await env.devices([("rv0", "mqtt")])
    c = await env.call("POST", "/campaigns", json={"name": "rv", "manifest_id": r.json()["id"]})
    await env.call("POST", f"/campaigns/{c['id']}/start")
    revoked = await env.call("POST", "/signers/second/revoke")
    assert revoked["revoked_at"] is not None
    campaign = await env.call("GET", f"/campaigns/{c['id']}")
    assert campaign["state"] == "cancelled" and "revoked" in campaign["stop_reason"]
    r = await upload(env, image, second_key, trust.chain(second_key, "second"), sequence=7)
    assert r.status_code == 422 and "revoked" in r.text
    c2 = await env.call(
        "POST", "/campaigns", json={"name": "rv2", "manifest_id": r.json().get("id", c["manifest_id"])}
    )
    r = await env.http.post(f"/api/v1/campaigns/{c2['id']}/start")
    assert r.status_code == 409 and "revoked" in r.text


async def test_developer_build_targets_listed_hardware_only(env: Env, trust: Pki, tmp_path: Path) -> None:
    names = [f"dv{i}" for i in range(4)]
    secrets = await register(env, names, {})
    dev_key = mf.generate_private_key("es256")
    listed = ["hw-dv0", "hw-dv2"]
    sg = await env.call(
        "POST",
        "/signers",
        json={"name": "dev", "cert_pem": trust.signer_cert(dev_key, "dev", listed).decode()},
    )
    assert sg["hardware_ids"] == listed
    r = await upload(env, firmware(5_000, seed=31), dev_key, trust.chain(dev_key, "dev", listed))
    assert r.status_code == 201, r.text
    everyone = await env.call("POST", "/campaigns", json={"name": "dev-all", "manifest_id": r.json()["id"]})
    refused = await env.http.post(f"/api/v1/campaigns/{everyone['id']}/start")
    assert refused.status_code == 409 and "2 targeted devices are not listed" in refused.text
    c = await env.call(
        "POST",
        "/campaigns",
        json={"name": "dev", "manifest_id": r.json()["id"], "filter": 'hardware_id in ["hw-dv0", "hw-dv2"]'},
    )
    stats, report = await run_until_done(env, c["id"], fleet_configs(env, trust, secrets, {}, tmp_path))
    assert stats["total"] == 2 and stats["counts"]["succeeded"] == 2
    assert {n: report.devices[n].installed_sequence for n in names} == {
        "dv0": 2,
        "dv1": 1,
        "dv2": 2,
        "dv3": 1,
    }


@pytest.mark.parametrize("faults", ["none", "rogue"])
def test_demo_with_attestation(tmp_path: Path, faults: str) -> None:
    """`fwcm demo --attestation` as a user runs it: genuine devices install, rogue ones are refused."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fwcm.cli",
            "demo",
            "--devices",
            "30",
            "--attestation",
            "--faults",
            faults,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rogue = get_profile(faults).count_affected(30)
    assert result["succeeded"] == 30 - rogue and result["failed"] == rogue
    assert result["credentials"] == 30 - rogue
    assert result["failure_reasons"] == ({"attestation_refused": rogue} if rogue else {})


def test_demo_revoked_signer_and_developer_build(tmp_path: Path) -> None:
    """Revoked mid-campaign: no device installs afterwards (over MQTT and CoAP); a developer build
    is refused by the server for unlisted hardware and installs on the listed devices."""

    def demo(faults: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "fwcm.cli", "demo", "--devices", "20", "--faults", faults, "--json"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    revoked = demo("revoked")
    assert revoked["campaign_state"] == "cancelled" and "revoked" in revoked["stop_reason"]
    refused = revoked["device_results"].get("signer_revoked", 0)
    withdrawn = revoked["device_results"].get("cancelled", 0)  # not yet notified when it was revoked
    assert refused > 0 and refused + withdrawn + revoked["succeeded"] == 20
    dev = demo("dev-build")
    assert "not listed" in dev["server_refused"] and dev["not_targeted"] == 10
    assert dev["succeeded"] == 10 and dev["failed"] == 0
