"""Consent campaigns end to end: real server, broker, CoAP over UDP, and simulated device owners."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from device_sim.agent import DeviceAgent, DeviceConfig
from device_sim.faults import DeviceFaults
from device_sim.flash import Flash
from device_sim.transports import SharedClients
from fwcm import manifest as mf
from fwcm.protocol import LwState

from .conftest import CLASS, VENDOR, Env, firmware
from .test_bad_input import wait_for

pytestmark = pytest.mark.timeout(240)

ACCEPT, DECLINE, IGNORE = "accept", "decline", "ignore"


@dataclass
class Owners:
    """Simulated devices whose owners answer invitations as told; each can be stopped and restarted."""

    env: Env
    tmp: Path
    secrets: dict[str, bytes]
    transports: dict[str, str]
    clients: SharedClients = field(default_factory=SharedClients)
    agents: dict[str, DeviceAgent] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def config(self, name: str) -> DeviceConfig:
        return DeviceConfig(
            name=name,
            tenant="acme",
            secret=self.secrets[name],
            vendor_id=VENDOR,
            class_id=CLASS,
            transport=self.transports[name],  # type: ignore[arg-type]
            trust_anchors=[mf.public_key_pem(self.env.signing_key)],
            state_dir=self.tmp / "devices",
            mqtt_url=self.env.broker.url,
            coap_url=self.env.settings.public_coap_url,
            installed_sequence=1,
        )

    def start(self, name: str, faults: DeviceFaults) -> DeviceAgent:
        agent = DeviceAgent(self.config(name), self.clients, faults=faults)
        self.agents[name] = agent
        self.tasks[name] = asyncio.create_task(agent.run())
        return agent

    async def stop(self, name: str) -> None:
        self.agents[name].stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.tasks.pop(name), 20)

    def image(self, name: str) -> bytes:
        return Flash(self.tmp / "devices" / name).active_image()

    async def close(self) -> None:
        for name in list(self.tasks):
            await self.stop(name)
        await self.clients.aclose()


@contextlib.asynccontextmanager
async def owners(env: Env, tmp: Path, answers: dict[str, DeviceFaults]) -> AsyncIterator[Owners]:
    transports = {n: ("mqtt" if i % 2 == 0 else "coap") for i, n in enumerate(answers)}
    secrets = await env.devices(list(transports.items()))
    o = Owners(env, tmp, secrets, transports)
    try:
        for name, faults in answers.items():
            o.start(name, faults)
        yield o
    finally:
        await o.close()


def answering(answer: str, **kw: Any) -> DeviceFaults:
    return DeviceFaults(consent=answer, **kw)


async def consent_campaign(env: Env, consent: dict[str, Any], manifest_id: int, filter_: str = "") -> int:
    c = await env.call(
        "POST",
        "/campaigns",
        json={"name": "consent", "manifest_id": manifest_id, "filter": filter_, "consent": consent},
    )
    await env.call("POST", f"/campaigns/{c['id']}/start")
    return int(c["id"])


async def until_ended(env: Env, cid: int, timeout: float = 90) -> dict[str, Any]:
    stats: dict[str, Any] = {}

    async def ended() -> bool:
        nonlocal stats
        stats = await env.call("GET", f"/campaigns/{cid}/stats")
        busy = sum(
            stats["counts"][s] for s in ("invited", "notified", "downloading", "downloaded", "installing")
        )
        return stats["state"] in ("completed", "stopped", "cancelled") and busy == 0

    await wait_for(ended, timeout)
    return stats


async def states(env: Env, cid: int) -> dict[str, str]:
    page = await env.call("GET", f"/campaigns/{cid}/devices", params={"limit": 100})
    return {d["device"]: d["state"] for d in page["items"]}


# -- quorum rules -----------------------------------------------------------------------------


async def test_quorum_all_grants_when_everyone_answered(env: Env, tmp_path: Path) -> None:
    image = firmware(8_000, seed=41)
    man = await env.manifest(image)
    answers = {"q1": answering(ACCEPT), "q2": answering(ACCEPT), "q3": answering(DECLINE)}
    async with owners(env, tmp_path, answers) as o:
        cid = await consent_campaign(env, {"deadline": "30s", "quorum": "all"}, man["id"])
        stats = await until_ended(env, cid)
        assert stats["state"] == "completed" and stats["consent"]["stage"] == "granted"
        assert await states(env, cid) == {"q1": "succeeded", "q2": "succeeded", "q3": "declined"}
        assert o.image("q1") == image and o.image("q3") != image


async def test_quorum_all_not_met_by_the_deadline_installs_nothing(env: Env, tmp_path: Path) -> None:
    man = await env.manifest(firmware(8_000, seed=42))
    answers = {"n1": answering(ACCEPT), "n2": answering(ACCEPT), "n3": answering(IGNORE)}
    async with owners(env, tmp_path, answers) as o:
        cid = await consent_campaign(env, {"deadline": "3s", "quorum": "all"}, man["id"])
        stats = await until_ended(env, cid)
        assert stats["state"] == "stopped" and stats["stop_reason"].startswith("quorum_not_met")
        assert set((await states(env, cid)).values()) == {"cancelled"}
        status = await env.call("GET", f"/campaigns/{cid}")
        assert status["consent_stage"] == "refused"
        await asyncio.sleep(1.0)
        for name in answers:
            assert o.image(name) == o.config(name).factory_image()  # nothing installed


async def test_quorum_minimum_percentage_and_late_silence(env: Env, tmp_path: Path) -> None:
    man = await env.manifest(firmware(8_000, seed=43))
    answers = {
        "m1": answering(ACCEPT),
        "m2": answering(ACCEPT),
        "m3": answering(ACCEPT),
        "m4": answering(DECLINE),
        "m5": answering(IGNORE),
        "m6": answering(IGNORE),
    }
    async with owners(env, tmp_path, answers):
        cid = await consent_campaign(env, {"deadline": "4s", "quorum": "50%"}, man["id"])
        stats = await until_ended(env, cid)
        assert stats["state"] == "completed"
        assert stats["consent"] | {"quorum": None} == {
            "stage": "granted",
            "invited": 0,
            "accepted": 3,
            "declined": 1,
            "no_answer": 2,
            "group_decision": None,
            "quorum": None,
        }
        got = await states(env, cid)
        assert sorted(n for n, s in got.items() if s == "succeeded") == ["m1", "m2", "m3"]


async def test_quorum_count_refused_as_soon_as_it_cannot_be_reached(env: Env, tmp_path: Path) -> None:
    man = await env.manifest(firmware(8_000, seed=44))
    answers = {"c1": answering(ACCEPT), "c2": answering(DECLINE), "c3": answering(DECLINE)}
    async with owners(env, tmp_path, answers):
        cid = await consent_campaign(env, {"deadline": "5m", "quorum": 2}, man["id"])
        stats = await until_ended(env, cid, timeout=30)  # long before the 5 minute deadline
        assert stats["state"] == "stopped" and "quorum_not_met" in stats["stop_reason"]


@pytest.mark.parametrize("someone_accepts", [True, False])
async def test_quorum_any_waits_for_the_deadline(env: Env, tmp_path: Path, someone_accepts: bool) -> None:
    man = await env.manifest(firmware(8_000, seed=45))
    answers = {"a1": answering(ACCEPT if someone_accepts else DECLINE), "a2": answering(IGNORE)}
    async with owners(env, tmp_path, answers):
        cid = await consent_campaign(env, {"deadline": "3s", "quorum": "any"}, man["id"])
        await asyncio.sleep(1.5)
        early = await env.call("GET", f"/campaigns/{cid}/stats")
        assert early["consent"]["stage"] == "asking"  # nothing decided before the deadline
        stats = await until_ended(env, cid)
        if someone_accepts:
            assert stats["state"] == "completed" and (await states(env, cid)) == {
                "a1": "succeeded",
                "a2": "no_answer",
            }
        else:
            assert stats["state"] == "stopped" and "quorum_not_met" in stats["stop_reason"]


# -- variants, peers --------------------------------------------------------------------------


async def test_each_device_gets_the_variant_it_chose(env: Env, tmp_path: Path) -> None:
    basic, pro = firmware(9_000, seed=51), firmware(9_500, seed=52)
    m_basic, m_pro = await env.manifest(basic), await env.manifest(pro)
    answers = {
        "v1": answering(ACCEPT, choice={"variant": "basic"}),
        "v2": answering(ACCEPT, choice={"variant": "pro"}),
        "v3": answering(ACCEPT, choice={"variant": "pro"}),
        "v4": answering(ACCEPT, choice={"variant": "basic"}),
    }
    consent = {
        "deadline": "20s",
        "options": {"variant": ["basic", "pro"]},
        "variant_option": "variant",
        "variants": {"basic": m_basic["id"], "pro": m_pro["id"]},
    }
    async with owners(env, tmp_path, answers) as o:
        cid = await consent_campaign(env, consent, m_basic["id"])
        stats = await until_ended(env, cid)
        assert stats["counts"]["succeeded"] == 4
        chosen = {"v1": basic, "v2": pro, "v3": pro, "v4": basic}
        for name, image in chosen.items():
            assert hashlib.sha256(o.image(name)).digest() == hashlib.sha256(image).digest(), name


async def test_initiator_names_its_peers_and_a_peer_may_decline(env: Env, tmp_path: Path) -> None:
    man = await env.manifest(firmware(8_000, seed=53))
    answers = {
        "gw": answering(ACCEPT),
        "p1": answering(ACCEPT),
        "p2": answering(DECLINE),
        "bystander": answering(ACCEPT),
    }
    async with owners(env, tmp_path, answers) as o:
        consent = {"deadline": "20s", "quorum": "all", "initiator": "gw", "peers": ["p1", "p2"]}
        c = await env.call(
            "POST", "/campaigns", json={"name": "peers", "manifest_id": man["id"], "consent": consent}
        )
        assert c["filter"] == 'name in ["gw", "p1", "p2"]'
        both = await env.http.post(
            "/api/v1/campaigns",
            json={"name": "x", "manifest_id": man["id"], "filter": "name == 'gw'", "consent": consent},
        )
        assert both.status_code == 422
        await env.call("POST", f"/campaigns/{c['id']}/start")
        await until_ended(env, c["id"])
        assert await states(env, c["id"]) == {"gw": "succeeded", "p1": "succeeded", "p2": "declined"}
        assert o.image("bystander") == o.config("bystander").factory_image()


# -- coordinated group install ----------------------------------------------------------------


GROUP = {"deadline": "20s", "quorum": "all", "group": True, "prepare_within": "6s"}


async def test_group_commits_when_every_member_prepared(env: Env, tmp_path: Path) -> None:
    image = firmware(12_000, seed=61)
    man = await env.manifest(image)
    answers = {f"g{i}": answering(ACCEPT, step_delay=0.2) for i in range(4)}
    async with owners(env, tmp_path, answers) as o:
        cid = await consent_campaign(env, GROUP, man["id"])
        stats = await until_ended(env, cid)
        assert stats["counts"]["succeeded"] == 4 and stats["consent"]["group_decision"] == "commit"
        assert all(o.image(n) == image for n in answers)
        events = (await env.call("GET", f"/campaigns/{cid}/events"))["items"]
        assert any("all 4 members prepared" in (e["reason"] or "") for e in events)


async def test_group_aborts_when_a_member_fails_to_prepare(env: Env, tmp_path: Path) -> None:
    image = firmware(12_000, seed=62)
    man = await env.manifest(image)
    answers = {"f0": answering(ACCEPT), "f1": answering(ACCEPT), "f2": answering(ACCEPT, corrupt=True)}
    async with owners(env, tmp_path, answers) as o:
        cid = await consent_campaign(env, GROUP, man["id"])
        stats = await until_ended(env, cid)
        assert stats["consent"]["group_decision"] == "abort"
        got = await states(env, cid)
        assert got["f2"] == "failed" and got["f0"] == got["f1"] == "cancelled"
        await asyncio.sleep(1.0)
        assert not any(o.image(n) == image for n in answers)  # nobody installed


async def test_group_aborts_when_a_member_is_lost_before_preparing(env: Env, tmp_path: Path) -> None:
    image = firmware(200_000, seed=63)
    man = await env.manifest(image)
    answers = {
        "l0": answering(ACCEPT),
        "l1": answering(ACCEPT),
        "l2": answering(ACCEPT, throttle_bps=20_000),  # still downloading when it goes away
    }
    async with owners(env, tmp_path, answers) as o:
        cid = await consent_campaign(env, GROUP, man["id"])

        async def downloading() -> bool:
            return (await states(env, cid)).get("l2") == "downloading"

        await wait_for(downloading, 30)
        await o.stop("l2")  # lost mid-download: the prepare deadline passes without it
        stats = await until_ended(env, cid, timeout=60)
        assert stats["consent"]["group_decision"] == "abort"
        got = await states(env, cid)
        assert got == {"l0": "cancelled", "l1": "cancelled", "l2": "cancelled"}
        await asyncio.sleep(1.0)
        assert o.image("l0") != image and o.image("l1") != image


async def test_group_commit_is_durable_for_a_member_offline_at_commit(env: Env, tmp_path: Path) -> None:
    image = firmware(150_000, seed=64)
    man = await env.manifest(image)
    answers = {
        "d0": answering(ACCEPT),  # prepares first, then goes offline
        "d1": answering(ACCEPT, throttle_bps=60_000),
        "d2": answering(ACCEPT, throttle_bps=60_000),
    }
    async with owners(env, tmp_path, answers) as o:
        cid = await consent_campaign(env, GROUP | {"prepare_within": "60s"}, man["id"])

        async def prepared() -> bool:
            return (await states(env, cid)).get("d0") == "downloaded"

        await wait_for(prepared, 30)
        await o.stop("d0")

        async def committed() -> bool:
            c = await env.call("GET", f"/campaigns/{cid}")
            return c["group_decision"] == "commit"

        await wait_for(committed, 60)
        assert (await states(env, cid))["d0"] == "downloaded"  # offline: not installed yet
        assert o.image("d0") != image
        o.start("d0", answering(ACCEPT))  # back: it finds the commit and installs
        stats = await until_ended(env, cid)
        assert stats["counts"]["succeeded"] == 3
        assert all(o.image(n) == image for n in answers)


# -- accounting and time-limited installs -----------------------------------------------------


@pytest.mark.parametrize("limit", [{"max_uses": 3}, {"expires_after": "3s"}])
async def test_accounting_and_removal_after_the_limit(
    env: Env, tmp_path: Path, limit: dict[str, Any]
) -> None:
    image = firmware(8_000, seed=71)
    man = await env.manifest(image)
    answers = {"u1": answering(ACCEPT), "u2": answering(ACCEPT)}
    consent = {"deadline": "20s", "accounting_every": "1s", **limit}
    async with owners(env, tmp_path, answers) as o:
        cid = await consent_campaign(env, consent, man["id"])
        await until_ended(env, cid)
        assert all(o.image(n) == image for n in answers)

        async def removed() -> bool:
            r = await env.call("GET", f"/campaigns/{cid}/accounting")
            return bool(r["removed"] == 2)

        await wait_for(removed, 30)
        report = await env.call("GET", f"/campaigns/{cid}/accounting")
        for row in report["devices"]:
            assert row["removed"] and row["ended"] and row["records"] >= 2  # interim, then removal
            assert row["uses"] >= 2 and row["detail"] in ("use limit reached", "time limit reached")
        for name in answers:
            assert o.image(name) == o.config(name).factory_image()  # back on the previous image
            device = await env.call("GET", f"/devices/{name}")
            assert device["sequence"] == 1
        deployments = await states(env, cid)
        assert set(deployments.values()) == {"succeeded"}  # installed, then removed as agreed
        agent = o.agents["u1"]
        assert agent.status.removed == 1 and agent.status.state == LwState.IDLE

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fwcm.cli",
        "accounting",
        "report",
        "--campaign",
        str(cid),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "FWCM_URL": env.settings.public_http_url, "FWCM_API_KEY": env.key},
    )  # the server runs on this event loop: the CLI must not block it
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    assert json.loads(stdout)["removed"] == 2


def test_demo_consent(tmp_path: Path) -> None:
    """`fwcm demo --devices 60 --consent --json`: accepted > 0, declined > 0, succeeded == accepted."""
    out = subprocess.run(
        [sys.executable, "-m", "fwcm.cli", "demo", "--devices", "60", "--consent", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["accepted"] > 0 and result["declined"] > 0
    assert result["succeeded"] == result["accepted"] == 36
    assert result["accounting"]["removed"] == 36
