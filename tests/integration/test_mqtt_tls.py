"""The server and the devices over MQTT with TLS (``mqtts://``) to Mosquitto: a campaign completes
with every device verifying the broker against the operator's CA; a client that trusts another CA
is refused, and the error says why."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from campaignkit import run_mqtt_campaign, running_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fwcm import manifest as mf
from fwcm.server.app import Server
from fwcm.transport.broker import Broker, TlsFiles, mosquitto_available, start_mosquitto
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
    async with running_server(tmp_path / "server", tls_broker, "tls") as srv:
        yield srv


async def test_campaign_completes_over_mqtts(server: Server, tls_broker: Broker, tmp_path: Path) -> None:
    # the devices connect to mqtts://…?ca= as well: they check the broker's certificate too
    run = await run_mqtt_campaign(
        server, [tls_broker.url], tmp_path / "devices", devices=DEVICES, vendor=VENDOR, klass=CLASS
    )
    assert run.stats["state"] == "completed", run.stats
    assert run.stats["counts"]["succeeded"] == DEVICES, run.stats
    assert all(run.report.devices[n].installed_sequence == 2 for n in run.names)


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
