"""A real server (SQLite file or PostgreSQL, broker process, CoAP on UDP loopback, HTTP) per test."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from fwcm import manifest as mf
from fwcm.config import Settings
from fwcm.server.app import Server
from fwcm.store import tenants
from fwcm.transport.accounts import Credentials
from fwcm.transport.broker import Broker, free_port, start_broker

VENDOR = mf.vendor_id_for_domain("e2e.fwcm.example")
CLASS = mf.class_id_for(VENDOR, "sensor-v1")


@pytest.fixture
def broker() -> Iterator[Broker]:
    """Mosquitto on a free port when installed, else the embedded broker; the server keeps its
    accounts, and the devices log in with theirs."""
    with start_broker() as b:
        yield b


@dataclass
class Env:
    server: Server
    settings: Settings
    broker: Broker
    http: httpx.AsyncClient
    key: str
    signing_key: Any
    tenant: str = "acme"
    mqtt_accounts: dict[str, tuple[str, str]] = field(default_factory=dict)
    """MQTT username and password of each imported device, as the import returned them."""

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        r = await self.http.request(method, "/api/v1" + path, **kw)
        assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    async def manifest(self, image: bytes, sequence: int = 2) -> dict[str, Any]:
        """Upload payload and a signed manifest for it; return the manifest resource."""
        sha = hashlib.sha256(image).hexdigest()
        await self.call("POST", "/payloads", content=image)
        info = mf.ManifestInfo(
            sequence=sequence,
            vendor_id=VENDOR,
            class_id=CLASS,
            image_digest=bytes.fromhex(sha),
            image_size=len(image),
            uris=(f"{self.settings.public_http_url}/p/{sha}", f"{self.settings.public_coap_url}/p/{sha}"),
        )
        env = mf.build_envelope(info, self.signing_key)
        return dict(
            await self.call("POST", "/manifests", content=env, headers={"content-type": "application/cbor"})
        )

    async def devices(self, names_transports: list[tuple[str, str]]) -> dict[str, bytes]:
        rows = ["name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"]
        rows += [f"{n},{VENDOR},{CLASS},region=eu,1,1.0,{t},," for n, t in names_transports]
        out = await self.call(
            "POST", "/devices/import", content="\n".join(rows) + "\n", headers={"content-type": "text/csv"}
        )
        self.mqtt_accounts.update(
            {d["name"]: (d["mqtt_username"], d["mqtt_password"]) for d in out["devices"]}
        )
        return {d["name"]: bytes.fromhex(d["secret"]) for d in out["devices"]}

    async def admitted(self, name: str, timeout: float = 10.0) -> None:
        """Wait until the broker takes the device's account (written by the server after the import)."""
        account = Credentials(*self.mqtt_accounts[name])
        deadline = asyncio.get_running_loop().time() + timeout
        while not await asyncio.to_thread(self.broker.accepts, account):
            assert asyncio.get_running_loop().time() < deadline, (
                f"{name}'s account not admitted in {timeout} s"
            )
            await asyncio.sleep(0.1)

    async def campaign(
        self, manifest_id: int, filter_: str = "", policy: dict[str, Any] | None = None
    ) -> int:
        c = await self.call(
            "POST",
            "/campaigns",
            json={"name": "e2e", "manifest_id": manifest_id, "filter": filter_, "policy": policy or {}},
        )
        return int(c["id"])


def firmware(size: int = 32 * 1024, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
async def env(tmp_path: Path, broker: Broker, database_url: str) -> AsyncIterator[Env]:
    for attempt in range(3):  # a free port can be taken by someone else before the server binds it
        settings = Settings(
            data_dir=tmp_path / "server",
            database_url=database_url,
            **broker.server_settings(),  # type: ignore[arg-type]
            http_port=free_port(),
            coap_port=free_port(socket.SOCK_DGRAM),
            lwm2m_port=free_port(socket.SOCK_DGRAM),
        )
        server = Server(settings, replica="test")
        try:
            await server.start()
            break
        except RuntimeError as exc:
            if "in use" not in str(exc) or attempt == 2:
                raise
    with server.db.session() as s:
        _t, key = tenants.create_tenant(s, "acme", "Acme")
    signing_key = mf.generate_private_key("es256")
    http = httpx.AsyncClient(
        base_url=settings.public_http_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    e = Env(server, settings, broker, http, key, signing_key)
    await e.call(
        "POST",
        "/signers",
        json={"name": "release", "public_key_pem": mf.public_key_pem(signing_key).decode()},
    )
    try:
        yield e
    finally:
        await http.aclose()
        await server.stop()
