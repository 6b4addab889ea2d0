"""The counts the triggers keep (``store.counts``) against a fresh GROUP BY over the deployments,
after random mixes of every store function that changes a deployment (SQLite file and
PostgreSQL)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import random
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Row, func, select, update

from fwcm import manifest
from fwcm.devices import validate_device
from fwcm.errors import Conflict
from fwcm.rollout import launch
from fwcm.rollout.deployment import Applied, Expired, Reverted
from fwcm.rollout.states import DeviceState
from fwcm.store import campaigns, consent, counts, images, progress, tenants, trust
from fwcm.store import console as cq
from fwcm.store import deployments as dq
from fwcm.store import devices as device_store
from fwcm.store.db import Database, aware
from fwcm.store.models import CampaignCompletion, CampaignCount, Deployment, campaign_count_deltas

VENDOR = str(manifest.vendor_id_for_domain("example.com"))
CLASS = str(manifest.class_id_for(uuid.UUID(VENDOR), "sensor"))
POLICY = {"phases": [{"name": "a", "size": "30%"}, {"name": "b", "size": "30%"}, {"name": "c"}]}
_LATE = itertools.count()
OPS = (
    "take",
    "report",
    "expire",
    "revert",
    "cancel",
    "retry",
    "decommission",
    "delete_device",
    "join",
    "invite",
    "no_answer",
    "refuse",
    "sql",
    "fold",
)


def _fleet(db: Database, n: int) -> tuple[int, int]:
    """A tenant with ``n`` devices and a manifest for them."""
    key = manifest.generate_private_key()
    info = manifest.ManifestInfo(
        9, uuid.UUID(VENDOR), uuid.UUID(CLASS), hashlib.sha256(b"fw").digest(), 2, ("http://127.0.0.1/p/x",)
    )
    with db.session() as s:
        tid = tenants.create_tenant(s, f"t{next(_LATE)}")[0].id
        for i in range(n):
            device_store.register_device(s, tid, validate_device(f"d{i:03}", VENDOR, CLASS, {}))
        trust.add_signer(s, tid, "k", manifest.public_key_pem(key))
        mid = images.upload_manifest(s, tid, manifest.build_envelope(info, key))[0].id
    return tid, mid


def _started(db: Database, tid: int, mid: int, name: str) -> int:
    with db.session() as s:
        cid = campaigns.create_campaign(s, tid, mid, launch.draft(name, "", POLICY)).id
    with db.session() as s:
        campaigns.start_campaign(s, tid, cid, launch.start_plan)
    return cid


def _rows(db: Database, cid: int) -> list[Row[Any]]:
    with db.read() as s:
        return list(
            s.execute(
                select(
                    Deployment.device_id,
                    Deployment.phase,
                    Deployment.state,
                    Deployment.attempt,
                    Deployment.last_seq,
                    Deployment.updated_at,
                ).where(Deployment.campaign_id == cid)
            )
        )


def _expected(rows: list[Row[Any]]) -> tuple[list[tuple[int, str, int]], Counter[tuple[float, str]]]:
    by_phase = Counter((d.phase, d.state) for d in rows)
    minutes: Counter[tuple[float, str]] = Counter(
        (math.floor(aware(d.updated_at).timestamp() / 60) * 60.0, d.state)
        for d in rows
        if d.state in counts.CHARTED and d.updated_at is not None
    )
    return sorted((p, st, n) for (p, st), n in by_phase.items()), minutes


def _assert_kept(db: Database, cid: int) -> None:
    """What the maintained counts say equals what the deployments say, before and after a fold."""
    for _ in range(2):
        phases, minutes = _expected(_rows(db, cid))
        with db.read() as s:
            assert counts.phase_counts(s, cid) == phases
            done = counts.completions(s, cid, counts.CHARTED, datetime.fromtimestamp(0, UTC), 60)
            assert Counter({(start, state): n for start, state, n in done}) == minutes
            grouped = s.execute(
                select(Deployment.phase, Deployment.state, func.count())
                .where(Deployment.campaign_id == cid)
                .group_by(Deployment.phase, Deployment.state)
                .order_by(Deployment.phase, Deployment.state)
            ).all()
            assert [tuple(r) for r in grouped] == phases
        with db.session() as s:
            counts.fold(s)
    with db.read() as s:
        assert not s.scalar(select(func.count()).select_from(campaign_count_deltas))
        kept = s.execute(
            select(CampaignCount.phase, CampaignCount.state, CampaignCount.n)
            .where(CampaignCount.campaign_id == cid, CampaignCount.n != 0)
            .order_by(CampaignCount.phase, CampaignCount.state)
        ).all()
        assert [tuple(r) for r in kept] == phases  # on PostgreSQL: the totals alone, once folded


def _step(db: Database, tid: int, cid: int, op: str, rnd: random.Random, names: list[str]) -> None:
    """One change to the campaign's deployments through the store function that makes it."""
    rows = _rows(db, cid)
    now = time.time() - rnd.randrange(0, 3600)  # completions over the last hour's minutes
    in_progress = [d for d in rows if d.state in ("notified", "downloading", "downloaded", "installing")]
    with db.session() as s:
        if op == "take":
            dq.take_pending(s, cid, rnd.randrange(1, 8), max_phase=rnd.randrange(3), now=now)
        elif op == "report" and in_progress:
            d = rnd.choice(in_progress)
            to = rnd.choice(["downloading", "downloaded", "installing", "succeeded", "failed", "pending"])
            retry = now + 60 if to == "pending" else None
            applied = Applied(
                tid, cid, d.device_id, d.attempt, DeviceState(to), DeviceState(to), 0,
                d.last_seq + 1, retry, None, None, 9 if to == "succeeded" else None,
            )  # fmt: skip
            dq.write_reports(s, [applied])
        elif op == "expire" and in_progress:
            d = rnd.choice(in_progress)
            to = rnd.choice([DeviceState.TIMED_OUT, DeviceState.PENDING])
            retry = now + 60 if to == DeviceState.PENDING else None
            gone = Expired(tid, d.device_id, d.attempt, DeviceState(d.state), to, retry, "silent")
            dq.write_expired(s, cid, [gone], now)
        elif op == "revert":
            done = [d for d in rows if d.state == "succeeded"]
            if done:
                dq.write_reverted(s, [Reverted(tid, rnd.choice(done).device_id, cid, "fell back")])
        elif op == "cancel":
            dq.cancel_not_started(s, cid)
        elif op == "retry":
            with contextlib.suppress(Conflict):  # nothing to retry, or the campaign cannot run again
                campaigns.retry_failed(s, tid, cid)
        elif op == "decommission" and names:
            device_store.decommission_device(s, tid, rnd.choice(names))
        elif op == "delete_device" and names:
            device_store.delete_device(s, tid, names.pop(rnd.randrange(len(names))), force=True)
        elif op == "join":
            name = f"late{next(_LATE)}"
            device_store.register_device(s, tid, validate_device(name, VENDOR, CLASS, {}))
            names.append(name)
            campaigns.join_new_devices(s, cid, tid, rnd.randrange(3))
        elif op == "invite":
            consent.take_for_invite(s, cid, rnd.randrange(1, 5))
        elif op == "no_answer":
            consent.expire_invitations(s, cid)
        elif op == "refuse" and rnd.random() < 0.3:
            consent.refuse(s, cid, tid, "quorum not met")
        elif op == "sql":  # a statement over many rows at once, as an operator's SQL might be
            s.execute(
                update(Deployment)
                .where(Deployment.campaign_id == cid, Deployment.device_id % 3 == rnd.randrange(3))
                .values(updated_at=datetime.fromtimestamp(now, UTC) - timedelta(minutes=rnd.randrange(90)))
            )
        elif op == "fold":
            counts.fold(s)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 2**32)), min_size=10, max_size=60))
def test_kept_counts_equal_a_fresh_count_after_any_changes(db: Database, ops: list[tuple[str, int]]) -> None:
    tid, mid = _fleet(db, 16)  # a tenant of its own: what other examples deleted is not missed
    names = [f"d{i:03}" for i in range(16)]
    cid = _started(db, tid, mid, "c")
    _assert_kept(db, cid)
    for op, seed in ops:
        _step(db, tid, cid, op, random.Random(seed), names)
    _assert_kept(db, cid)
    with db.read() as s:  # the API's stats read the same counts
        stats = progress.campaign_stats(s, tid, cid, launch.phase_names, launch.pace)
    phases, _minutes = _expected(_rows(db, cid))
    assert sum(stats["counts"].values()) == sum(n for _p, _s, n in phases)
    assert {(int(p), st): n for p, c in stats["phases"].items() for st, n in c.items()} == {
        (p, st): n for p, st, n in phases
    }


def test_a_deleted_campaign_leaves_no_counts(db: Database) -> None:
    tid, mid = _fleet(db, 10)
    cid = _started(db, tid, mid, "gone")
    with db.session() as s:
        dq.take_pending(s, cid, 4, max_phase=2)
    with db.session() as s:
        campaigns.change_campaign(s, tid, cid, "cancel")
        dq.cancel_not_started(s, cid)
        campaigns.get_campaign(s, tid, cid).finished_at = datetime.now(UTC)
    _assert_kept(db, cid)
    with db.session() as s:
        campaigns.delete_campaign(s, tid, cid)
    with db.session() as s:
        counts.fold(s)
    with db.read() as s:
        for table in (CampaignCount, CampaignCompletion):
            assert not s.scalar(select(func.count()).select_from(table).where(table.campaign_id == cid))
        assert not s.scalar(select(func.count()).select_from(campaign_count_deltas))
        assert counts.phase_counts(s, cid) == []


def test_completions_are_counted_for_charted_ends_only(db: Database) -> None:
    tid, mid = _fleet(db, 3)
    cid = _started(db, tid, mid, "c")
    with db.read() as s, pytest.raises(ValueError, match="per minute"):
        counts.completions(s, cid, ["pending"], datetime.now(UTC), 60)


def test_concurrent_reports_and_folds_keep_the_counts(db: Database) -> None:
    """Writers moving the same campaign's deployments through different states at once (several
    ingest replicas) while folds run: no deadlock, no delta lost or counted twice."""
    tid, mid = _fleet(db, 40)
    cid = _started(db, tid, mid, "busy")
    with db.session() as s:
        dq.take_pending(s, cid, 40, max_phase=2)
    devices = [r.device_id for r in _rows(db, cid)]
    seqs = itertools.count()
    errors: list[BaseException] = []

    def report(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(15):
                batch = rnd.sample(devices, 12)
                states = ["downloading", "downloaded", "installing", "failed", "succeeded"]
                applied = [
                    Applied(
                        tid,
                        cid,
                        d,
                        1,
                        DeviceState(to),
                        DeviceState(to),
                        0,
                        next(seqs),
                        None,
                        None,
                        None,
                        None,
                    )
                    for d, to in ((d, rnd.choice(states)) for d in batch)
                ]
                with db.session() as s:
                    dq.write_reports(s, applied)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def fold() -> None:
        try:
            for _ in range(20):
                with db.session() as s:
                    counts.fold(s)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=report, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=fold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _assert_kept(db, cid)


def test_failure_breakdowns_count_the_failed_devices_by_attribute(db: Database) -> None:
    key = manifest.generate_private_key()
    info = manifest.ManifestInfo(
        9, uuid.UUID(VENDOR), uuid.UUID(CLASS), hashlib.sha256(b"fw").digest(), 2, ("http://127.0.0.1/p/x",)
    )
    fleet = [(f"d{i}", f"hw-{i % 3}" if i % 4 else None, f"1.{i % 2}") for i in range(12)]
    with db.session() as s:
        tid = tenants.create_tenant(s, "acme")[0].id
        for name, hw, version in fleet:
            device_store.register_device(
                s, tid, validate_device(name, VENDOR, CLASS, {}, 1, version, "mqtt", hw)
            )
        trust.add_signer(s, tid, "k", manifest.public_key_pem(key))
        mid = images.upload_manifest(s, tid, manifest.build_envelope(info, key))[0].id
    cid = _started(db, tid, mid, "c")
    failing = {"d1", "d2", "d3", "d5", "d8", "d9", "d11"}
    with db.session() as s:
        dq.take_pending(s, cid, 12, max_phase=2)
        for name in failing:
            device = device_store.get_device(s, tid, name)
            s.execute(
                update(Deployment)
                .where(Deployment.campaign_id == cid, Deployment.device_id == device.id)
                .values(state="failed" if name != "d11" else "timed_out")
            )
    with db.read() as s:
        by = cq.failures_by(s, tid, cid, {"failed", "timed_out"})
        assert cq.failures_by(s, tid + 1, cid, {"failed"}) == {c: [] for c in cq.BREAKDOWNS}  # not theirs
    rows = [(hw, version) for name, hw, version in fleet if name in failing]
    hardware = Counter(hw for hw, _v in rows)
    versions = Counter(v for _hw, v in rows)
    assert by["class_id"] == [{"value": CLASS, "count": len(failing)}]
    assert {r["value"]: r["count"] for r in by["hardware_id"]} == hardware
    assert {r["value"]: r["count"] for r in by["version"]} == versions
    assert [r["count"] for r in by["hardware_id"]] == sorted(hardware.values(), reverse=True)


def test_sqlite_keeps_counts_with_one_update_trigger_and_goes_back_to_two(tmp_path: Any) -> None:
    """Revision 0018 replaces SQLite's two update triggers by one; its downgrade restores them."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from fwcm.store.db import MIGRATIONS

    db = Database(f"sqlite:///{tmp_path / 'fwcm.db'}")
    db.migrate()

    def triggers() -> set[str]:
        with db.engine.connect() as conn:
            rows = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
            return {r.name for r in rows if r.name.endswith("_update")}

    assert triggers() == {"deployments_counts_update"}
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0017")
    assert triggers() == {"deployments_count_update", "deployments_completion_update"}
    db.migrate()
    assert triggers() == {"deployments_counts_update"}
    db.dispose()
