"""``fwcm conformance`` against simulated devices: a conformant one passes every scenario, the
``nonconformant`` fault profile fails exactly the scenarios its faults break, over a real
Mosquitto (or the embedded broker) and over CoAP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest
from devicekit import CLASS, TENANT, VENDOR, device_config, free_port, running

from device_sim.agent import DeviceAgent
from device_sim.faults import DeviceFaults, get_profile
from device_sim.transports import SharedClients
from fwcm import conformance, manifest
from fwcm.conformance import Device, KitSettings, Verdict
from fwcm.transport.accounts import Credentials
from fwcm.transport.broker import Broker

pytestmark = pytest.mark.timeout(120)

BROKEN = {"tampered-image", "rollback", "replayed-notice"}


async def check_device(broker: Broker, tmp_path: Path, transport: str, faults: DeviceFaults) -> list[Verdict]:
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
    settings = KitSettings(
        device=Device(TENANT, cfg.name, cfg.secret),
        transport="coap" if transport == "coap" else "mqtt",
        vendor_id=VENDOR,
        class_id=CLASS,
        signing_key=key,
        mqtt_url=broker.service_url,
        coap_bind=("127.0.0.1", coap_port),
        quiet=0.5,
        timeout=20.0,
        hello_timeout=20.0,
    )
    clients = SharedClients()
    kit = asyncio.create_task(conformance.run(settings))
    await asyncio.sleep(0.5)  # the kit listens before the device starts and says hello
    try:
        async with running([DeviceAgent(cfg, clients, faults=faults, backoff_max=1.0)]):
            return await kit
    finally:
        kit.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await kit
        await clients.aclose()


def failed(verdicts: list[Verdict]) -> set[str]:
    return {v.scenario for v in verdicts if not v.passed}


@pytest.mark.parametrize("transport", ["mqtt", "coap"])
async def test_a_conformant_device_passes_every_scenario(
    broker: Broker, tmp_path: Path, transport: str
) -> None:
    verdicts = await check_device(broker, tmp_path, transport, DeviceFaults())
    assert [v.scenario for v in verdicts] == list(conformance.SCENARIOS)
    assert failed(verdicts) == set(), [v for v in verdicts if not v.passed]
    assert conformance.all_passed(verdicts)


@pytest.mark.parametrize("transport", ["mqtt", "coap"])
async def test_the_nonconformant_profile_fails_what_it_breaks(
    broker: Broker, tmp_path: Path, transport: str
) -> None:
    verdicts = await check_device(broker, tmp_path, transport, get_profile("nonconformant").for_device(0))
    assert failed(verdicts) == BROKEN, [v for v in verdicts if not v.passed]
    assert not conformance.all_passed(verdicts)
