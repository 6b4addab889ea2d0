"""Two ``fwcm server`` replicas on one PostgreSQL and one Mosquitto; the one holding the campaign
lease hangs (SIGSTOP) mid-campaign for a moment, is killed with ``kill -9`` and never comes back.
While it hangs the broker keeps handing it a share of the reports, which die with it. The other
replica takes the lease over, gets every new report through the shared subscription, recovers the
lost ones by repeating the notices of silent deployments (devices answer with their final report),
and finishes the campaign with every device counted once.

The fleet is MQTT only: a CoAP device talks to one replica's address and loses its server with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from device_sim.agent import DeviceAgent, DeviceConfig
from device_sim.faults import get_profile
from device_sim.fleet import run_fleet
from fwcm import manifest as mf
from fwcm.protocol import LwState, Report, Result
from fwcm.rollout import launch
from fwcm.store import campaigns, images, tenants, trust
from fwcm.store import leases as lq
from fwcm.store.db import Database
from fwcm.transport.broker import Broker, free_port

from .conftest import CLASS, VENDOR, firmware
from .test_crash import ServerProcess, wait_http

REPLICAS = ("r1", "r2")
N_DEVICES = 80


class Replica(ServerProcess):
    """One ``fwcm server --replica NAME`` child process with its own HTTP and CoAP ports."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        own = dict(env)
        own.update(
            FWCM_HTTP_BIND=f"127.0.0.1:{free_port()}",
            FWCM_COAP_BIND=f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
        )
        super().__init__(own, log, name)
        self.base = "http://" + own["FWCM_HTTP_BIND"]

    async def freeze_then_kill9(self, frozen_s: float) -> None:
        """SIGSTOP, then SIGKILL: while frozen the broker keeps handing this replica its share of
        reports, which it never acknowledges; its death takes them along."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(frozen_s)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@dataclass
class Cluster:
    replicas: list[Replica]
    key: str
    """API key of tenant "acme"."""


@pytest.fixture
def cluster(tmp_path: Path, broker: Broker, database_url: str) -> Iterator[Cluster]:
    if broker.kind != "mosquitto":
        pytest.skip("replicas share reports through MQTT 5 shared subscriptions: needs Mosquitto")
    env = dict(os.environ)
    env.update(
        FWCM_DATA_DIR=str(tmp_path / "server"),  # shared: both replicas serve the same payloads
        FWCM_DATABASE_URL=database_url,
        **broker.server_env(),  # both replicas keep the broker's accounts
    )
    out = subprocess.run(  # migrates the schema once, before two processes start on it
        [sys.executable, "-m", "fwcm.cli", "admin", "tenant-create", "acme", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    key = str(json.loads(out.stdout.strip().splitlines()[-1])["api_key"])
    rs = [Replica(name, env, tmp_path / f"{name}.log") for name in REPLICAS]
    try:
        yield Cluster(rs, key)
    finally:
        for r in rs:
            r.stop()


class Api:
    def __init__(self, base: str, key: str) -> None:
        self.http = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        r = await self.http.request(method, "/api/v1" + path, **kw)
        assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_replica_killed_mid_campaign(
    tmp_path: Path, broker: Broker, database_url: str, cluster: Cluster
) -> None:
    replicas, key = cluster.replicas, cluster.key
    for r in replicas:
        r.start()
    apis = {r.name: Api(r.base, key) for r in replicas}
    db = create_engine(database_url)
    stop = asyncio.Event()
    fleet_task = None
    reports: dict[str, list[Report]] = defaultdict(list)

    def on_report(agent: DeviceAgent, rep: Report) -> None:
        reports[agent.name].append(rep)

    def lease_owner(cid: int) -> str | None:
        with db.connect() as conn:
            owner = conn.execute(text("SELECT lease_owner FROM campaigns WHERE id = :c"), {"c": cid}).scalar()
        return None if owner is None else str(owner)

    try:
        for r in replicas:
            await wait_http(r.base)
        api = apis[REPLICAS[0]]
        signing_key = mf.generate_private_key("eddsa")
        await api.call(
            "POST",
            "/signers",
            json={"name": "rel", "public_key_pem": mf.public_key_pem(signing_key).decode()},
        )
        # the payload is on both replicas (shared data directory): a device whose first URI is
        # the dead replica downloads from the other
        image = firmware(96 * 1024)
        await api.call("POST", "/payloads", content=image)
        digest = hashlib.sha256(image).digest()
        info = mf.ManifestInfo(
            sequence=2,
            vendor_id=VENDOR,
            class_id=CLASS,
            image_digest=digest,
            image_size=len(image),
            uris=tuple(f"{r.base}/p/{digest.hex()}" for r in replicas),
        )
        man = await api.call(
            "POST",
            "/manifests",
            content=mf.build_envelope(info, signing_key),
            headers={"content-type": "application/cbor"},
        )
        names = [f"d{i:03d}" for i in range(N_DEVICES)]
        rows = ["name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"]
        rows += [f"{n},{VENDOR},{CLASS},region=eu,1,1.0,mqtt,," for n in names]
        out = await api.call(
            "POST", "/devices/import", content="\n".join(rows) + "\n", headers={"content-type": "text/csv"}
        )
        secrets = {d["name"]: bytes.fromhex(d["secret"]) for d in out["devices"]}
        configs = [
            DeviceConfig(
                name=name,
                tenant="acme",
                secret=secrets[name],
                vendor_id=VENDOR,
                class_id=CLASS,
                transport="mqtt",
                trust_anchors=[mf.public_key_pem(signing_key)],
                state_dir=tmp_path / "devices",
                mqtt_url=broker.url,
                coap_url="coap://127.0.0.1:9",  # unused: MQTT devices fetch over HTTP
                installed_sequence=1,
                index=i,
            )
            for i, name in enumerate(names)
        ]
        c = await api.call(
            "POST",
            "/campaigns",
            json={
                "name": "replicas",
                "manifest_id": man["id"],
                "filter": "",
                "policy": {"rate_per_minute": 900},
            },
        )
        cid = int(c["id"])
        fleet_task = asyncio.create_task(
            run_fleet(
                configs, get_profile("slow"), until=lambda _r: stop.is_set(), timeout=360, on_report=on_report
            )
        )
        await api.call("POST", f"/campaigns/{cid}/start")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while True:  # kill the lease holder once some, but not half, of the devices have succeeded
            stats = await api.call("GET", f"/campaigns/{cid}/stats")
            if 0 < stats["counts"].get("succeeded", 0) < N_DEVICES // 2:
                break
            assert stats["counts"].get("succeeded", 0) < N_DEVICES // 2, "campaign went too fast to interrupt"
            assert loop.time() < deadline, stats
            await asyncio.sleep(0.05)
        owner = lease_owner(cid)
        assert owner in REPLICAS, owner
        victim = next(r for r in replicas if r.name == owner)
        survivor = next(r for r in replicas if r.name != owner)
        await victim.freeze_then_kill9(2.0)
        killed_at = time.monotonic()
        succeeded_at_kill = stats["counts"].get("succeeded", 0)

        api = apis[survivor.name]
        taken_over = False
        deadline = loop.time() + 180
        while True:
            taken_over = taken_over or lease_owner(cid) == survivor.name
            stats = await api.call("GET", f"/campaigns/{cid}/stats")
            if stats["state"] == "completed":
                break
            assert loop.time() < deadline, (stats, lease_owner(cid))
            await asyncio.sleep(0.25)
        completed_after = time.monotonic() - killed_at
        stop.set()
        fleet = await fleet_task

        assert taken_over  # the survivor took the lease (and, being the only one left, finished)
        assert stats["total"] == N_DEVICES == stats["counts"]["succeeded"], stats
        assert sum(stats["counts"].values()) == N_DEVICES, stats

        with db.connect() as conn:
            deployments = conn.execute(
                text(
                    "SELECT d.name, p.state, p.attempt FROM deployments p "
                    "JOIN devices d ON d.id = p.device_id WHERE p.campaign_id = :c"
                ),
                {"c": cid},
            ).all()
            events = conn.execute(
                text(
                    "SELECT d.name, e.state FROM device_events e "
                    "JOIN devices d ON d.id = e.device_id WHERE e.campaign_id = :c"
                ),
                {"c": cid},
            ).all()
            sequences = dict(
                conn.execute(text("SELECT name, sequence FROM devices WHERE name LIKE 'd%'")).tuples().all()
            )
        assert sorted(r[0] for r in deployments) == names  # one deployment per device
        assert all(r[1] == "succeeded" for r in deployments), deployments
        assert all(r[2] == 1 for r in deployments), [r for r in deployments if r[2] != 1]  # no retry
        per_transition = Counter((r[0], r[1]) for r in events)
        assert [k for k, v in per_transition.items() if v > 1] == []  # no state entered twice
        assert sorted(n for (n, st) in per_transition if st == "succeeded") == names  # one each
        assert sequences == dict.fromkeys(names, 2)

        for name in names:  # the devices' own logs: one attempt, one install, now on sequence 2
            own = [r for r in reports[name] if r.campaign == cid]
            assert {r.attempt for r in own} == {1}, (name, own)
            assert sum(1 for r in own if r.state == LwState.UPDATING) == 1, (name, own)
            assert any(r.result == Result.SUCCESS for r in own), (name, own)
            assert fleet.devices[name].installed_sequence == 2, name
            assert fleet.devices[name].results[cid] == Result.SUCCESS, name
        repeats = sum(
            1 for rs in reports.values() for r in rs if r.campaign == cid and r.result == Result.SUCCESS
        ) - len(names)
        healed = survivor.log.read_text().count("notices of silent deployments")
        print(
            f"killed {victim.name} at {succeeded_at_kill}/{N_DEVICES} succeeded; {survivor.name} completed "
            f"the campaign {completed_after:.1f} s later; {repeats} final reports repeated on request "
            f"({healed} rounds of repeated notices)"
        )
    finally:
        stop.set()
        if fleet_task is not None and not fleet_task.done():
            await asyncio.wait_for(fleet_task, 30)
        for a in apis.values():
            await a.http.aclose()
        db.dispose()


def test_claims_skip_a_campaign_another_replica_is_claiming(db: Database) -> None:
    """Two replicas claiming at the same moment: one takes the campaign, the other skips it at
    once rather than waiting for the first one's row lock (PostgreSQL; SQLite has one writer)."""
    key = mf.generate_private_key("eddsa")
    info = mf.ManifestInfo(
        sequence=2,
        vendor_id=VENDOR,
        class_id=CLASS,
        image_digest=hashlib.sha256(b"fw").digest(),
        image_size=2,
        uris=("http://127.0.0.1/p/x",),
    )
    with db.session() as s:
        tenant, _key = tenants.create_tenant(s, "acme")
        trust.add_signer(s, tenant.id, "rel", mf.public_key_pem(key))
        man, _created = images.upload_manifest(s, tenant.id, mf.build_envelope(info, key))
        cid = campaigns.create_campaign(s, tenant.id, man.id, launch.draft("c", "", None)).id
    with db.session() as s:
        campaigns.start_campaign(s, tenant.id, cid, launch.start_plan, allow_empty=True)
        cancelled = campaigns.create_campaign(s, tenant.id, man.id, launch.draft("c2", "", None)).id
    with db.session() as s:
        campaigns.start_campaign(s, tenant.id, cancelled, launch.start_plan, allow_empty=True)
    with db.session() as s:
        campaigns.change_campaign(s, tenant.id, cancelled, "cancel")
    with db.session() as s:
        assert [c.id for c in lq.lease_campaigns(s, "r1", 15)] == [cid]
    with db.session() as s:
        assert lq.lease_campaigns(s, "r2", 15) == []  # r1 holds it
        assert [c[0] for c in lq.cancelled_unsettled(s, "r1", 15)] == [cancelled]
    with db.session() as s:
        assert lq.cancelled_unsettled(s, "r2", 15) == []
    if db.is_sqlite:
        return
    with db.session() as s:  # r1 died: its leases ran out
        s.execute(text("UPDATE campaigns SET lease_until = now() - interval '1 minute'"))
    with db.session() as s2:  # r2 is mid-claim, its transaction open: the rows are locked
        assert [c.id for c in lq.lease_campaigns(s2, "r2", 15)] == [cid]
        assert [c[0] for c in lq.cancelled_unsettled(s2, "r2", 15)] == [cancelled]
        started = time.monotonic()
        with db.session() as s3:
            s3.execute(text("SET LOCAL lock_timeout = '5s'"))  # a blocked claim fails instead
            assert lq.lease_campaigns(s3, "r3", 15) == []
            assert lq.cancelled_unsettled(s3, "r3", 15) == []
        assert time.monotonic() - started < 2
    with db.session() as s:
        owners = dict(s.execute(text("SELECT id, lease_owner FROM campaigns")).tuples().all())
    assert owners == {cid: "r2", cancelled: "r2"}
