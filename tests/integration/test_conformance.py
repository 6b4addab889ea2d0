"""``fwcm conformance`` against simulated devices: a conformant one passes every scenario, the
``nonconformant`` fault profile fails exactly the scenarios its faults break (and the command exits
1 naming them), over a real Mosquitto (or the embedded broker) and over CoAP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from devicekit import CLASS, TENANT, VENDOR, device_config, free_port, running

from device_sim.agent import DeviceAgent, DeviceConfig
from device_sim.faults import DeviceFaults, get_profile
from device_sim.transports import SharedClients
from fwcm import conformance, manifest
from fwcm.conformance import Device, KitSettings, Verdict
from fwcm.transport.accounts import Credentials
from fwcm.transport.broker import Broker

pytestmark = pytest.mark.timeout(120)

BROKEN = {"tampered-image", "rollback", "replayed-notice"}
"""What the nonconformant profile breaks: no digest check, no rollback protection, acts on replays."""


@dataclass
class Bench:
    """A device under test (not started yet) and the key it trusts."""

    cfg: DeviceConfig
    key: manifest.PrivateKey
    coap_port: int
    broker: Broker
    clients: SharedClients

    def settings(self) -> KitSettings:
        return KitSettings(
            device=Device(TENANT, self.cfg.name, self.cfg.secret),
            transport="coap" if self.cfg.transport == "coap" else "mqtt",
            vendor_id=VENDOR,
            class_id=CLASS,
            signing_key=self.key,
            mqtt_url=self.broker.service_url,
            coap_bind=("127.0.0.1", self.coap_port),
            quiet=0.5,
            timeout=20.0,
            hello_timeout=20.0,
        )

    def agent(self, faults: DeviceFaults) -> DeviceAgent:
        return DeviceAgent(self.cfg, self.clients, faults=faults, backoff_max=1.0)


@pytest.fixture(params=["mqtt", "coap"])
async def bench(request: pytest.FixtureRequest, broker: Broker, tmp_path: Path) -> AsyncIterator[Bench]:
    transport = request.param
    key = manifest.generate_private_key("eddsa")
    coap_port = free_port(socket.SOCK_DGRAM)
    cfg = device_config(
        f"dut-{transport}",
        transport=transport,
        trust=[manifest.public_key_pem(key)],
        state_dir=tmp_path,
        mqtt_url=broker.url,
        coap_url=f"coap://127.0.0.1:{coap_port}",
    )
    if transport == "mqtt":
        await asyncio.to_thread(broker.admit, [Credentials(*cfg.mqtt_credentials())])
    clients = SharedClients()
    try:
        yield Bench(cfg, key, coap_port, broker, clients)
    finally:
        await clients.aclose()


def failed(verdicts: list[Verdict]) -> set[str]:
    return {v.scenario for v in verdicts if not v.passed}


async def test_a_conformant_device_passes_every_scenario(bench: Bench) -> None:
    listening = asyncio.Event()
    kit = asyncio.create_task(conformance.run(bench.settings(), listening=listening.set))
    try:
        await asyncio.wait_for(listening.wait(), 10)
        async with running([bench.agent(DeviceFaults())]):
            verdicts = await kit
    finally:
        kit.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await kit
    assert [v.scenario for v in verdicts] == list(conformance.SCENARIOS)
    assert failed(verdicts) == set(), [v for v in verdicts if not v.passed]
    assert conformance.all_passed(verdicts)


async def run_cli(bench: Bench, faults: DeviceFaults, tmp_path: Path) -> tuple[int, str]:
    """``fwcm conformance --json`` in its own process against the device run here; exit code and output."""
    key_file = tmp_path / "signer.pem"
    key_file.write_bytes(manifest.private_key_pem(bench.key))
    s = bench.settings()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fwcm.cli",
        "conformance",
        "--transport",
        s.transport,
        "--tenant",
        TENANT,
        "--device",
        bench.cfg.name,
        "--signing-key",
        str(key_file),
        "--broker",
        s.mqtt_url,
        "--coap-bind",
        f"127.0.0.1:{bench.coap_port}",
        "--vendor-id",
        str(VENDOR),
        "--class-id",
        str(CLASS),
        "--quiet",
        "0.5",
        "--timeout",
        "20",
        "--hello-timeout",
        "20",
        "--json",
        env={"FWCM_DEVICE_SECRET": bench.cfg.secret.hex(), "PATH": ""},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert b"listening" in line, line
        async with running([bench.agent(faults)]):
            out, _err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_the_nonconformant_profile_fails_what_it_breaks(bench: Bench, tmp_path: Path) -> None:
    code, out = await run_cli(bench, get_profile("nonconformant").for_device(0), tmp_path)
    answer = json.loads(out)
    assert code == 1
    assert answer["passed"] is False
    assert set(answer["failed"]) == BROKEN, answer
    assert [v["scenario"] for v in answer["scenarios"]] == list(conformance.SCENARIOS)


async def test_the_command_exits_0_for_a_conformant_device(bench: Bench, tmp_path: Path) -> None:
    code, out = await run_cli(bench, DeviceFaults(), tmp_path)
    answer = json.loads(out)
    assert (code, answer["failed"], answer["passed"]) == (0, [], True)


async def test_a_silent_device_fails_every_scenario(bench: Bench) -> None:
    settings = bench.settings()
    silent = KitSettings(**{**settings.__dict__, "hello_timeout": 1.0})
    verdicts = await conformance.run(silent)
    assert failed(verdicts) == set(conformance.SCENARIOS)
    assert verdicts[0].detail.startswith("no hello within 1 s")
    assert all(v.detail == "not run: no hello" for v in verdicts[1:])


async def test_only_runs_what_a_scenario_needs(tmp_path: Path) -> None:
    """``--only trial-boot`` runs hello and valid-update with it (against nobody here: all fail)."""
    settings = KitSettings(
        device=Device(TENANT, "nobody", bytes(32)),
        transport="coap",
        vendor_id=VENDOR,
        class_id=CLASS,
        signing_key=manifest.generate_private_key("eddsa"),
        coap_bind=("127.0.0.1", free_port(socket.SOCK_DGRAM)),
        hello_timeout=0.5,
    )
    verdicts = await conformance.run(settings, ["trial-boot"])
    assert [v.scenario for v in verdicts] == ["hello", "valid-update", "trial-boot"]
    assert not any(v.passed for v in verdicts)
