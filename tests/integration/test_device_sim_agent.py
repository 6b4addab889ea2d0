"""The simulated device against a real Mosquitto, a real aiocoap server and an HTTP payload server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from devicekit import (
    TENANT,
    VENDOR,
    CoapTestServer,
    MqttServerSide,
    PayloadHttpServer,
    ReportLog,
    Signer,
    cancel_notice,
    device_config,
    firmware,
    running,
    update_notice,
    wait_until,
)

from device_sim.agent import DeviceAgent, DeviceConfig
from device_sim.faults import DeviceFaults
from device_sim.flash import Flash, SlotInfo
from device_sim.transports import SharedClients
from device_sim.update import part_name
from fwcm import delta, manifest
from fwcm.protocol import LwState, Result
from fwcm.transport.broker import Broker

pytestmark = pytest.mark.timeout(90)

SUCCESS_FLOW = [
    (LwState.DOWNLOADING, Result.INITIAL),
    (LwState.DOWNLOADED, Result.INITIAL),
    (LwState.UPDATING, Result.INITIAL),
    (LwState.IDLE, Result.SUCCESS),
]


@dataclass
class World:
    """Server side of the wire for one test: reports, MQTT notices, HTTP and CoAP payloads."""

    log: ReportLog
    mqtt: MqttServerSide
    http: PayloadHttpServer
    coap: CoapTestServer
    clients: SharedClients
    signer: Signer
    broker_url: str
    state_dir: Path

    async def device(self, name: str, transport: str = "mqtt", **kw: object) -> DeviceConfig:
        cfg = device_config(
            name,
            transport=transport,
            trust=[self.signer.public_pem],
            state_dir=self.state_dir,
            mqtt_url=self.broker_url,
            coap_url=self.coap.url,
            **kw,  # type: ignore[arg-type]
        )
        self.log.secrets[name] = cfg.secret
        if transport == "mqtt":
            await self.mqtt.admit([cfg])
        return cfg

    def publish_payload(self, image: bytes) -> tuple[str, list[str]]:
        sha = self.http.add(image)
        return sha, [self.http.url(sha), self.coap.payload_url(sha)]

    async def notify(self, cfg: DeviceConfig, sealed: bytes) -> None:
        if cfg.transport == "coap":
            self.coap.notify(TENANT, cfg.name, sealed)
        else:
            await self.mqtt.notify(TENANT, cfg.name, sealed)

    async def final(self, cfg: DeviceConfig, campaign: int, timeout: float = 30) -> tuple[LwState, Result]:
        await wait_until(lambda: self.log.final(cfg.name, campaign) is not None, timeout, f"{cfg.name} final")
        report = self.log.final(cfg.name, campaign)
        assert report is not None
        return report.state, report.result

    def flow(self, cfg: DeviceConfig, campaign: int) -> list[tuple[LwState, Result]]:
        return [
            (r.state, r.result) for r in self.log.campaign(cfg.name, campaign) if r.progress in (None, 0, 100)
        ]


@pytest.fixture
async def world(broker: Broker, tmp_path: Path) -> AsyncIterator[World]:
    log = ReportLog({})
    payloads: dict[str, bytes] = {}
    clients = SharedClients()
    async with (
        PayloadHttpServer() as http,
        CoapTestServer(log, payloads) as coap,
        MqttServerSide(broker, log) as mqtt,
    ):
        http.payloads = payloads
        try:
            yield World(log, mqtt, http, coap, clients, Signer(), broker.url, tmp_path)
        finally:
            await clients.aclose()


def seqs(world: World, cfg: DeviceConfig, campaign: int) -> list[int]:
    return [r.seq for r in world.log.campaign(cfg.name, campaign)]


async def test_update_over_mqtt_and_http(world: World) -> None:
    cfg = await world.device("m1")
    agent = DeviceAgent(cfg, world.clients)
    image = firmware(150_000)
    sha, uris = world.publish_payload(image)
    envelope = world.signer.envelope(image, list(reversed(uris)))  # CoAP URI listed first
    async with running([agent]):
        await wait_until(lambda: bool(world.log.hellos("m1")), 15, "hello")
        await world.notify(cfg, update_notice(cfg, 7, envelope))
        assert await world.final(cfg, 7) == (LwState.IDLE, Result.SUCCESS)
        await wait_until(lambda: len(world.log.hellos("m1")) >= 2, 10, "hello after reboot")
    assert world.flow(cfg, 7) == SUCCESS_FLOW
    assert seqs(world, cfg, 7) == [1, 2, 3, 4]
    final = world.log.final("m1", 7)
    assert final is not None and final.installed_sequence == 2
    assert world.log.hellos("m1")[0].installed_sequence == 1
    assert world.log.hellos("m1")[-1].installed_sequence == 2
    assert world.http.requests == [(f"/p/{sha}", None)]  # an MQTT device prefers the HTTP URI
    assert world.coap.blocks == []
    flash = Flash(cfg.device_dir)
    assert flash.state.active == "b" and flash.state.installed_sequence == 2
    assert flash.active_image() == image
    assert flash.read_slot("a") == cfg.factory_image()
    assert agent.status.reports_sent >= 6


async def test_update_over_coap_block2_with_status_retries(world: World) -> None:
    cfg = await world.device("c1", transport="coap")
    agent = DeviceAgent(cfg, world.clients)
    image = firmware(20_000, seed=2)
    sha, uris = world.publish_payload(image)
    world.coap.notify(TENANT, "c1", update_notice(cfg, 8, world.signer.envelope(image, uris)))
    world.coap.status.unavailable = 2  # the first two POSTs get 5.03 and must be retried
    async with running([agent]):
        assert await world.final(cfg, 8) == (LwState.IDLE, Result.SUCCESS)
    assert world.flow(cfg, 8) == SUCCESS_FLOW
    assert seqs(world, cfg, 8) == [1, 2, 3, 4]
    assert world.http.requests == []  # a CoAP device prefers the coap:// URI
    offsets = [off for s, off in world.coap.blocks if s == sha]
    assert offsets == list(range(0, len(image), 1024))
    assert Flash(cfg.device_dir).active_image() == image
    assert world.coap.status.posts >= 2 + len(world.log.reports["c1"])


async def test_refusals_before_download(world: World) -> None:
    other_signer = Signer()
    image = firmware(5000, seed=3)
    _sha, uris = world.publish_payload(image)
    good = world.signer.envelope(image, uris)
    env = manifest.decode_envelope(good)
    sig = env.signatures[0].signature
    tampered = good.replace(sig, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert tampered != good
    cases = {
        "r-foreign": (other_signer.envelope(image, uris), Result.SIGNATURE_INVALID, {}),
        "r-tampered": (tampered, Result.SIGNATURE_INVALID, {}),
        "r-class": (
            world.signer.envelope(image, uris, cls=manifest.class_id_for(VENDOR, "other")),
            Result.CONDITION_MISMATCH,
            {},
        ),
        "r-rollback": (
            world.signer.envelope(image, uris, sequence=3),
            Result.ROLLBACK_REFUSED,
            {"installed_sequence": 5},
        ),
        "r-same": (
            world.signer.envelope(image, uris, sequence=5),
            Result.UP_TO_DATE,
            {"installed_sequence": 5},
        ),
        "r-garbage": (b"\x01\x02not a manifest", Result.UNSUPPORTED_PACKAGE, {}),
    }
    configs = {name: await world.device(name, **kw) for name, (_e, _r, kw) in cases.items()}
    agents = [DeviceAgent(cfg, world.clients) for cfg in configs.values()]
    async with running(agents):
        for name, (envelope, _r, _kw) in cases.items():
            await world.notify(configs[name], update_notice(configs[name], 9, envelope))
        for name, (_e, expected, _kw) in cases.items():
            assert await world.final(configs[name], 9) == (LwState.IDLE, expected), name
    for name, cfg in configs.items():
        assert world.flow(cfg, 9) == [(LwState.IDLE, cases[name][1])]
        flash = Flash(cfg.device_dir)
        assert flash.state.active == "a" and flash.active_image() == cfg.factory_image()
    assert world.http.requests == []  # nothing was fetched for a refused manifest


@pytest.mark.parametrize("transport", ["mqtt", "coap"])
async def test_corrupt_payload_is_refused_and_old_image_kept(world: World, transport: str) -> None:
    cfg = await world.device(f"bad-{transport}", transport=transport)
    agent = DeviceAgent(cfg, world.clients, faults=DeviceFaults(corrupt=True))
    image = firmware(40_000, seed=4)
    _sha, uris = world.publish_payload(image)
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 10, world.signer.envelope(image, uris)))
        assert await world.final(cfg, 10) == (LwState.IDLE, Result.INTEGRITY_FAILURE)
    assert world.flow(cfg, 10) == [
        (LwState.DOWNLOADING, Result.INITIAL),
        (LwState.IDLE, Result.INTEGRITY_FAILURE),
    ]
    flash = Flash(cfg.device_dir)
    assert flash.state.active == "a" and flash.state.installed_sequence == 1
    assert flash.active_image() == cfg.factory_image()
    assert flash.read_slot("b") == b"" and flash.state.slots["b"].digest is None


async def test_wrong_bytes_from_server_fail_integrity(world: World) -> None:
    cfg = await world.device("wrong-bytes")
    agent = DeviceAgent(cfg, world.clients)
    image = firmware(30_000, seed=5)
    sha, uris = world.publish_payload(image)
    world.http.payloads[sha] = image[:-1] + b"!"  # server serves altered bytes under the digest
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 11, world.signer.envelope(image, uris)))
        assert await world.final(cfg, 11) == (LwState.IDLE, Result.INTEGRITY_FAILURE)
    assert Flash(cfg.device_dir).active_image() == cfg.factory_image()


async def test_install_failure_keeps_old_image(world: World) -> None:
    cfg = await world.device("inst")
    agent = DeviceAgent(cfg, world.clients, faults=DeviceFaults(install_fail=True))
    image = firmware(10_000, seed=6)
    _sha, uris = world.publish_payload(image)
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 12, world.signer.envelope(image, uris)))
        assert await world.final(cfg, 12) == (LwState.IDLE, Result.UPDATE_FAILED)
    assert world.flow(cfg, 12)[-2:] == [
        (LwState.UPDATING, Result.INITIAL),
        (LwState.IDLE, Result.UPDATE_FAILED),
    ]
    flash = Flash(cfg.device_dir)
    assert flash.state.active == "a" and flash.active_image() == cfg.factory_image()


@pytest.mark.parametrize("transport", ["mqtt", "coap"])
async def test_flaky_connection_resumes_from_offset(world: World, transport: str) -> None:
    cfg = await world.device(f"flaky-{transport}", transport=transport)
    agent = DeviceAgent(cfg, world.clients, faults=DeviceFaults(drop_at=0.4))
    image = firmware(120_000, seed=7)
    sha, uris = world.publish_payload(image)
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 13, world.signer.envelope(image, uris)))
        assert await world.final(cfg, 13) == (LwState.IDLE, Result.SUCCESS)
    assert agent.status.connects >= 3  # first connect, the dropped one, the reboot
    if transport == "mqtt":
        starts = [start for path, start in world.http.requests if path.endswith(sha)]
        assert starts[0] is None
        assert len(starts) == 2 and starts[1] is not None and starts[1] >= 0.4 * len(image)
    else:
        # The drop happened after 40 %; afterwards the device asked for the next block, so every
        # block was fetched exactly once and none from 0 again.
        offsets = [off for s, off in world.coap.blocks if s == sha]
        assert offsets == list(range(0, len(image), 1024))
        assert len(world.coap.notices.registrations) >= 3
    assert Flash(cfg.device_dir).active_image() == image
    assert [r.seq for r in world.log.campaign(cfg.name, 13)] == list(
        range(1, len(world.log.campaign(cfg.name, 13)) + 1)
    )


async def test_restart_mid_download_continues_with_increasing_seq(world: World) -> None:
    cfg = await world.device("restart")
    image = firmware(200_000, seed=8)
    sha, uris = world.publish_payload(image)
    await world.notify(cfg, update_notice(cfg, 14, world.signer.envelope(image, uris)))
    slow = DeviceFaults(throttle_bps=200_000)
    first = DeviceAgent(cfg, world.clients, faults=slow)
    task = asyncio.create_task(first.run())
    try:
        await wait_until(
            lambda: first.flash.state.download is not None and first.flash.state.download.offset >= 64_000,
            20,
            "partial download",
        )
    finally:
        task.cancel()  # a crash: no graceful shutdown
        with contextlib.suppress(asyncio.CancelledError):
            await task
    before = list(world.log.campaign("restart", 14))
    assert [(r.state, r.seq) for r in before] == [(LwState.DOWNLOADING, 1)]
    second = DeviceAgent(cfg, world.clients)
    async with running([second]):
        assert await world.final(cfg, 14) == (LwState.IDLE, Result.SUCCESS)
    reports = world.log.campaign("restart", 14)
    assert [r.seq for r in reports] == list(range(1, len(reports) + 1))
    resumed = [r for r in reports if r.state == LwState.DOWNLOADING][1]
    assert resumed.progress is not None and resumed.progress > 0
    starts = [start for path, start in world.http.requests if path.endswith(sha)]
    assert starts[0] is None and starts[1] is not None and starts[1] >= 32_000
    assert Flash(cfg.device_dir).active_image() == image

    # Started again with the same state: the (retained) notice is recognised as done.
    third = DeviceAgent(cfg, world.clients)
    hellos = len(world.log.hellos("restart"))
    async with running([third]):
        await wait_until(lambda: len(world.log.hellos("restart")) > hellos, 10, "hello")
        await asyncio.sleep(0.5)
    assert world.log.campaign("restart", 14) == reports


async def test_cancel_before_install(world: World) -> None:
    cfg = await world.device("cancel-me")
    agent = DeviceAgent(cfg, world.clients, faults=DeviceFaults(throttle_bps=100_000))
    image = firmware(300_000, seed=9)
    _sha, uris = world.publish_payload(image)
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 15, world.signer.envelope(image, uris)))
        await wait_until(lambda: bool(world.log.campaign("cancel-me", 15)), 15, "downloading")
        await world.notify(cfg, cancel_notice(cfg, 15))
        assert await world.final(cfg, 15) == (LwState.IDLE, Result.CANCELLED)
    flash = Flash(cfg.device_dir)
    assert flash.state.active == "a" and flash.active_image() == cfg.factory_image()
    assert flash.read_slot("b") == b"" and flash.state.job is None
    assert flash.state.outcomes["15:1"] == Result.CANCELLED


async def test_install_waits_for_the_install_window(world: World) -> None:
    """A notice with an install window: download at once, install only once the window opens."""
    cfg = await world.device("w1")
    agent = DeviceAgent(cfg, world.clients)
    image = firmware(4_000, seed=5)
    _sha, uris = world.publish_payload(image)
    opens = int(time.time()) + 3
    async with running([agent]):
        await wait_until(lambda: bool(world.log.hellos("w1")), 15, "hello")
        notice = update_notice(cfg, 9, world.signer.envelope(image, uris), window=(opens, opens + 3600))
        await world.notify(cfg, notice)
        states = lambda: [st for st, _r in world.flow(cfg, 9)]  # noqa: E731
        await wait_until(lambda: LwState.DOWNLOADED in states(), 15, "downloaded")
        assert LwState.UPDATING not in states() and time.time() < opens
        assert await world.final(cfg, 9) == (LwState.IDLE, Result.SUCCESS)
        assert time.time() >= opens


@pytest.mark.parametrize("transport", ["mqtt", "coap"])
async def test_agent_survives_any_exception_from_its_link(
    world: World, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A link library that raises something unexpected (aiocoap: "ClientObservation cancelled
    twice") costs the device one connection, never the device: it logs, reconnects and updates."""
    cfg = await world.device(f"x-{transport}", transport)
    agent = DeviceAgent(cfg, world.clients, backoff_max=0.5)
    made = agent._make_link
    failures = []

    def flaky_link():  # type: ignore[no-untyped-def]
        link = made()
        if len(failures) < 2:
            failures.append(link)
            opened = link.open

            async def open_then_fail(on_notice):  # type: ignore[no-untyped-def]
                await opened(on_notice)
                raise RuntimeError("ClientObservation cancelled twice")

            link.open = open_then_fail  # type: ignore[method-assign]
        return link

    agent._make_link = flaky_link  # type: ignore[method-assign]
    image = firmware(20_000, seed=9)
    _sha, uris = world.publish_payload(image)
    async with running([agent]):
        await wait_until(lambda: bool(world.log.hellos(cfg.name)), 30, "hello after the failures")
        await world.notify(cfg, update_notice(cfg, 21, world.signer.envelope(image, uris)))
        assert await world.final(cfg, 21) == (LwState.IDLE, Result.SUCCESS)
    assert len(failures) == 2
    assert any("link failed" in r.getMessage() and r.exc_info for r in caplog.records)


# -- several components: together or not at all ----------------------------------------------


def two_images(world: World, seed: int) -> tuple[bytes, bytes, bytes]:
    """An application and a radio image published, and one envelope for both."""
    app, radio = firmware(60_000, seed=seed), firmware(25_000, seed=seed + 1)
    _, app_uris = world.publish_payload(app)
    _, radio_uris = world.publish_payload(radio)
    envelope = world.signer.multi_envelope([(b"app", app, app_uris), (b"radio", radio, radio_uris)])
    return app, radio, envelope


async def test_two_components_install_together(world: World) -> None:
    cfg = await world.device("dual")
    agent = DeviceAgent(cfg, world.clients)
    app, radio, envelope = two_images(world, 40)
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 40, envelope))
        assert await world.final(cfg, 40) == (LwState.IDLE, Result.SUCCESS)
    assert world.flow(cfg, 40) == SUCCESS_FLOW
    flash = Flash(cfg.device_dir)
    assert flash.state.active == "b" and flash.state.installed_sequence == 2
    assert flash.active_image() == app
    radio_part = part_name((b"radio",))
    assert flash.read_slot("b", radio_part) == radio
    assert flash.state.slots["b"].components == {radio_part: hashlib.sha256(radio).hexdigest()}
    assert flash.read_slot("a") == cfg.factory_image()


async def test_a_bad_second_component_installs_neither(world: World) -> None:
    cfg = await world.device("dual-bad")
    agent = DeviceAgent(cfg, world.clients)
    app, radio, envelope = two_images(world, 42)
    world.http.payloads[hashlib.sha256(radio).hexdigest()] = radio[:-1] + b"!"
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 41, envelope))
        assert await world.final(cfg, 41) == (LwState.IDLE, Result.INTEGRITY_FAILURE)
    final = world.log.final("dual-bad", 41)
    assert final is not None and "component c" + b"radio".hex() in (final.detail or "")
    assert (f"/p/{hashlib.sha256(app).hexdigest()}", None) in world.http.requests  # the app was fetched
    flash = Flash(cfg.device_dir)
    assert flash.state.active == "a" and flash.state.installed_sequence == 1
    assert flash.active_image() == cfg.factory_image()
    assert flash.read_slot("b") == b"" and flash.state.slots["b"] == SlotInfo()
    assert list(cfg.device_dir.glob("slot_b.*.bin")) == []


async def test_failed_trial_boot_reverts_both_components(world: World) -> None:
    cfg = await world.device("dual-boot")
    agent = DeviceAgent(cfg, world.clients, faults=DeviceFaults(boot_fail=True))
    _app, _radio, envelope = two_images(world, 44)
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 42, envelope))
        assert await world.final(cfg, 42) == (LwState.IDLE, Result.REVERTED)
    flash = Flash(cfg.device_dir)
    assert flash.state.active == "a" and flash.state.installed_sequence == 1
    assert flash.active_image() == cfg.factory_image()
    assert flash.state.slots["a"].components == {}  # the running slot has no radio image of the update


# -- deltas ----------------------------------------------------------------------------------


def changed(image: bytes, seed: int, insert: int) -> bytes:
    """``image`` with ``insert`` new bytes at a third of it and a small edit near the end."""
    at = len(image) // 3
    extra = firmware(insert, seed=seed)
    new = image[:at] + extra + image[at:]
    return new[:-100] + b"version 2" + new[-91:]


async def test_delta_update_applies_the_patch(world: World) -> None:
    cfg = await world.device("delta")
    agent = DeviceAgent(cfg, world.clients)
    base = cfg.factory_image()
    new = changed(base, seed=50, insert=64)
    patch = delta.make_patch(base, new)
    assert len(patch) < len(new) // 4
    sha, uris = world.publish_payload(patch)
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 50, world.signer.delta_envelope(base, new, patch, uris)))
        assert await world.final(cfg, 50) == (LwState.IDLE, Result.SUCCESS)
    assert world.flow(cfg, 50) == SUCCESS_FLOW
    assert world.http.requests == [(f"/p/{sha}", None)]  # only the patch travelled
    flash = Flash(cfg.device_dir)
    assert flash.state.active == "b" and flash.active_image() == new
    assert list(cfg.device_dir.glob("slot_*.patch.bin")) == []


async def test_delta_for_another_base_is_refused_before_fetching(world: World) -> None:
    cfg = await world.device("delta-other")
    agent = DeviceAgent(cfg, world.clients)
    other = firmware(len(cfg.factory_image()), seed=51)
    new = changed(other, seed=52, insert=64)
    patch = delta.make_patch(other, new)
    _sha, uris = world.publish_payload(patch)
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 51, world.signer.delta_envelope(other, new, patch, uris)))
        assert await world.final(cfg, 51) == (LwState.IDLE, Result.BASE_MISMATCH)
    assert world.http.requests == []
    assert Flash(cfg.device_dir).active_image() == cfg.factory_image()


@pytest.mark.parametrize("transport", ["mqtt", "coap"])
async def test_interrupted_patch_download_resumes(world: World, transport: str) -> None:
    cfg = await world.device(f"delta-flaky-{transport}", transport=transport)
    agent = DeviceAgent(cfg, world.clients, faults=DeviceFaults(drop_at=0.4))
    base = cfg.factory_image()
    new = changed(base, seed=53, insert=40_000)  # a patch large enough to be cut mid-way
    patch = delta.make_patch(base, new)
    sha, uris = world.publish_payload(patch)
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 52, world.signer.delta_envelope(base, new, patch, uris)))
        assert await world.final(cfg, 52) == (LwState.IDLE, Result.SUCCESS)
    if transport == "mqtt":
        starts = [start for path, start in world.http.requests if path == f"/p/{sha}"]
        assert starts[0] is None and starts[-1] is not None and 0 < starts[-1] < len(patch)
    else:
        offsets = [off for s, off in world.coap.blocks if s == sha]
        assert offsets[0] == 0 and sorted(set(offsets)) == list(range(0, len(patch), 1024))
    assert Flash(cfg.device_dir).active_image() == new
