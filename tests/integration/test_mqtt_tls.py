"""The server and the devices over MQTT with TLS (``mqtts://``) to Mosquitto: a campaign completes
with every device verifying the broker against the operator's CA; a client that trusts another CA
is refused, and the error says why."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import random
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sim.agent import DeviceConfig
from device_sim.faults import get_profile
from device_sim.fleet import run_fleet
from fwcm import manifest as mf
from fwcm.config import Settings
from fwcm.server.app import Server
from fwcm.store import repo
from fwcm.transport.broker import Broker, TlsFiles, free_port, mosquitto_available, start_mosquitto
from fwcm.transport.mqtt import MqttTransport

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="Mosquitto is not installed")

VENDOR = mf.vendor_id_for_domain("tls.fwcm.example")
CLASS = mf.class_id_for(VENDOR, "sensor-tls")
DEVICES = 6


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path, cn: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_broker_tls(directory: Path) -> TlsFiles:
    """An operator CA and a broker certificate for 127.0.0.1 signed by it."""
    ca_path, ca_key, ca_cert = make_ca(directory, "fwcm-test-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("broker"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "broker.pem", directory / "broker.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o644)  # mosquitto may run as another user and must read it
    return TlsFiles(ca=ca_path, cert=cert_path, key=key_path)


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[Broker]:
    # Mosquitto started as root reads the files as its own user: not under pytest's 0700 tmp dirs
    directory = Path(tempfile.mkdtemp(prefix="fwcm-tls-"))
    directory.chmod(0o755)
    try:
        with start_mosquitto(tls=make_broker_tls(directory)) as broker:
            yield broker
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def server(tmp_path: Path, tls_broker: Broker) -> AsyncIterator[Server]:
    assert tls_broker.url.startswith("mqtts://")
    settings = Settings(
        data_dir=tmp_path / "server",
        mqtt_url=tls_broker.url,
        http_port=free_port(),
        coap_port=free_port(socket.SOCK_DGRAM),
    )
    srv = Server(settings, replica="tls")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_campaign_completes_over_mqtts(server: Server, tls_broker: Broker, tmp_path: Path) -> None:
    settings = server.settings
    with server.db.session() as s:
        _t, key = repo.create_tenant(s, "acme", "Acme")
    signing = mf.generate_private_key("es256")
    async with httpx.AsyncClient(
        base_url=settings.public_http_url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as api:

        async def call(method: str, path: str, **kw: Any) -> Any:
            r = await api.request(method, path, **kw)
            assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
            return r.json()

        await call(
            "POST", "/signers", json={"name": "rel", "public_key_pem": mf.public_key_pem(signing).decode()}
        )
        image = random.Random(7).randbytes(8 * 1024)
        sha = hashlib.sha256(image).hexdigest()
        await call("POST", "/payloads", content=image)
        info = mf.ManifestInfo(
            2, VENDOR, CLASS, bytes.fromhex(sha), len(image), (f"{settings.public_http_url}/p/{sha}",)
        )
        man = await call(
            "POST",
            "/manifests",
            content=mf.build_envelope(info, signing),
            headers={"content-type": "application/cbor"},
        )
        names = [f"t{i:02d}" for i in range(DEVICES)]
        rows = ["name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"]
        rows += [f"{n},{VENDOR},{CLASS},,1,1.0,mqtt,," for n in names]
        imported = await call(
            "POST", "/devices/import", content="\n".join(rows) + "\n", headers={"content-type": "text/csv"}
        )
        secrets = {d["name"]: bytes.fromhex(d["secret"]) for d in imported["devices"]}
        configs = [
            DeviceConfig(
                name=name,
                tenant="acme",
                secret=secrets[name],
                vendor_id=VENDOR,
                class_id=CLASS,
                transport="mqtt",
                trust_anchors=[mf.public_key_pem(signing)],
                state_dir=tmp_path / "devices",
                mqtt_url=tls_broker.url,  # mqtts://…?ca=: the device checks the broker too
                coap_url=settings.public_coap_url,
                installed_sequence=1,
                index=i,
            )
            for i, name in enumerate(names)
        ]
        stop = asyncio.Event()
        fleet = asyncio.create_task(
            run_fleet(configs, get_profile("none"), until=lambda _r: stop.is_set(), timeout=120)
        )
        try:
            for _ in range(300):
                if server.ingest.ingested >= DEVICES:
                    break
                await asyncio.sleep(0.2)
            c = await call("POST", "/campaigns", json={"name": "tls", "manifest_id": man["id"], "filter": ""})
            await call("POST", f"/campaigns/{c['id']}/start")
            stats: dict[str, Any] = {}
            for _ in range(600):
                stats = await call("GET", f"/campaigns/{c['id']}/stats")
                if stats["state"] == "completed":
                    break
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            report = await fleet
    assert stats["state"] == "completed", stats
    assert stats["counts"]["succeeded"] == DEVICES, stats
    assert all(report.devices[n].installed_sequence == 2 for n in names)


async def test_a_broker_the_ca_did_not_sign_is_refused(tls_broker: Broker, tmp_path: Path) -> None:
    other_ca, _key, _cert = make_ca(tmp_path, "someone-else")
    url = f"mqtts://127.0.0.1:{tls_broker.port}?ca={other_ca}"
    transport = MqttTransport(url, "fwcm-server-untrusting", lambda _m: None)
    with pytest.raises(ConnectionError, match="TLS handshake failed"):
        await transport.start(timeout=3)
    await transport.stop()
    # and a plain-text client gets nowhere on the TLS port either
    plain = MqttTransport(f"mqtt://127.0.0.1:{tls_broker.port}", "fwcm-server-plain", lambda _m: None)
    with pytest.raises(ConnectionError, match="not the MQTT session"):
        await plain.start(timeout=3)
    await plain.stop()
