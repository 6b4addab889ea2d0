"""Ingest isolation on real databases (SQLite file, PostgreSQL when configured).

One device's message never holds up another's: a field out of range is refused when it is
decoded; a message that passes every check but still fails in the database is found by halving
its batch, kept as a dead letter and acknowledged while the rest of the batch commits; and a
database that does not work at all is an outage, during which nothing is acknowledged and
nothing is set aside.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from fwcm import manifest, protocol
from fwcm.devices import validate_device
from fwcm.protocol import ProtocolError
from fwcm.rollout import launch
from fwcm.server.ingest import Ingest
from fwcm.server.metrics import REGISTRY
from fwcm.store import campaigns, images, tenants, trust
from fwcm.store import deadletters as dl
from fwcm.store import deployments as dq
from fwcm.store import devices as device_store
from fwcm.store.db import Database
from fwcm.store.models import DeadLetter, Deployment, Device
from fwcm.transport.inbound import Inbound

VENDOR = str(manifest.vendor_id_for_domain("example.com"))
CLASS = str(manifest.class_id_for(uuid.UUID(VENDOR), "sensor-a"))
BIG = 2**63
DOWNLOADING, DOWNLOADED = 1, 2
NAMES = ("d0", "d1", "d2", "d3")


@dataclass
class Fleet:
    """Tenant ``acme`` with devices d0-d3, all notified (attempt 1) in one running campaign."""

    api: Any
    """The ``api`` fixture: its database, tenant ``acme`` and an API client of that tenant."""
    campaign: int
    secrets: dict[str, bytes]
    pks: dict[str, int]

    @property
    def db(self) -> Database:
        return self.api.db

    def seal(self, device: str, body: dict[Any, Any]) -> bytes:
        return protocol.seal(self.secrets[device], device, body)

    def report(self, device: str, seq: int, state: int = DOWNLOADING, **more: Any) -> bytes:
        """A campaign report with raw field values (nothing checked on the way out)."""
        body = {1: device, 2: self.campaign, 3: 1, 4: seq, 5: state, 6: 0}
        body.update({int(k[1:]): v for k, v in more.items()})
        return self.seal(device, body)

    def hello(self, device: str, seq: int, installed: int) -> bytes:
        return self.seal(device, {1: device, 2: 0, 3: 0, 4: seq, 5: 0, 6: 0, 9: installed})

    def deployment(self, device: str) -> tuple[str, int, int | None]:
        with self.db.read() as s:
            row = s.execute(
                select(Deployment.state, Deployment.last_seq, Deployment.progress).where(
                    Deployment.campaign_id == self.campaign, Deployment.device_id == self.pks[device]
                )
            ).one()
            return row.state, row.last_seq, row.progress

    def sequence(self, device: str) -> int:
        with self.db.read() as s:
            return int(s.scalar(select(Device.sequence).where(Device.id == self.pks[device])) or 0)

    def dead_letters(self) -> list[Letter]:
        with self.db.read() as s:
            rows = dl.page(s, self.api.tenant_id, 100, 0)[1]
            return [Letter(r.device, r.transport, r.payload, r.reason, r.error) for r in rows]


@dataclass(frozen=True)
class Letter:
    device: str
    transport: str
    payload: bytes
    reason: str
    error: str


@pytest.fixture
def fleet(api: Any) -> Fleet:
    db, tid = api.db, api.tenant_id
    key = manifest.generate_private_key()
    info = manifest.ManifestInfo(
        sequence=9,
        vendor_id=uuid.UUID(VENDOR),
        class_id=uuid.UUID(CLASS),
        image_digest=hashlib.sha256(b"fw").digest(),
        image_size=2,
        uris=("http://127.0.0.1/p/x",),
    )
    with db.session() as s:
        devices = [device_store.register_device(s, tid, validate_device(n, VENDOR, CLASS)) for n in NAMES]
        secrets = {d.name: d.secret for d in devices}
        pks = {d.name: d.id for d in devices}
        trust.add_signer(s, tid, "release", manifest.public_key_pem(key))
        m, _created = images.upload_manifest(s, tid, manifest.build_envelope(info, key))
        cid = campaigns.create_campaign(s, tid, m.id, launch.draft("c", "", {})).id
    with db.session() as s:
        campaigns.start_campaign(s, tid, cid, launch.start_plan)
    with db.session() as s:
        assert len(dq.take_pending(s, cid, 100)) == len(NAMES)
    return Fleet(api, cid, secrets, pks)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def batches() -> float:
    return sample("fwcm_ingest_batch_size_count")


class Feed:
    """An Ingest running on the test's event loop. ``send`` queues messages together, so they
    form one batch, and returns what each was answered (None: durable)."""

    def __init__(self, db: Database) -> None:
        self.ingest = Ingest(db)
        self.task = asyncio.create_task(self.ingest.run())

    def submit(self, *messages: tuple[str, bytes]) -> list[asyncio.Future[ProtocolError | None]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ProtocolError | None]] = []
        for device, payload in messages:
            fut: asyncio.Future[ProtocolError | None] = loop.create_future()
            futures.append(fut)
            self.ingest.submit(Inbound("mqtt", "status", "acme", device, payload, partial(_resolve, fut)))
        return futures

    async def send(self, *messages: tuple[str, bytes]) -> list[ProtocolError | None]:
        before = batches()
        outcomes = await asyncio.wait_for(asyncio.gather(*self.submit(*messages)), 60)
        assert batches() == before + 1, "the messages were not answered as one batch"
        assert not self.task.done()
        return outcomes

    async def close(self) -> None:
        assert not self.task.done(), "ingest stopped"
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


def _resolve(fut: asyncio.Future[ProtocolError | None], outcome: ProtocolError | None) -> None:
    if not fut.done():
        fut.set_result(outcome)


def reasons(outcomes: list[ProtocolError | None]) -> list[str | None]:
    return [None if o is None else o.reason for o in outcomes]


# -- out of range: refused where decoded -------------------------------------------------------

POISON = {
    "hello sequence": lambda f: f.hello("d0", 1, BIG),
    "campaign": lambda f: f.seal("d0", {1: "d0", 2: BIG, 3: 1, 4: 1, 5: DOWNLOADING, 6: 0}),
    "seq": lambda f: f.report("d0", BIG),
    "progress": lambda f: f.report("d0", 1, k7=BIG),
    "accounting uses": lambda f: f.report("d0", 1, 0, k14={1: "interim", 2: BIG, 3: 1}),
    "accounting attempt": lambda f: f.seal(
        "d0", {1: "d0", 2: f.campaign, 3: 2**31, 4: 1, 5: 0, 6: 0, 14: {1: "interim", 2: 1, 3: 1}}
    ),
    "detail": lambda f: f.report("d0", 1, k8="x" * 300),
    "detail with NUL": lambda f: f.report("d0", 1, k8="nul\x00"),
}


@pytest.mark.parametrize("case", list(POISON))
async def test_out_of_range_reports_are_refused_and_their_batch_commits(fleet: Fleet, case: str) -> None:
    feed = Feed(fleet.db)
    refused_before = sample("fwcm_messages_rejected_total", transport="mqtt", reason="shape")
    try:
        outcomes = await feed.send(
            ("d0", POISON[case](fleet)),
            ("d1", fleet.report("d1", 1, k7=4096)),
            ("d2", fleet.hello("d2", 1, 7)),
        )
        assert reasons(outcomes) == ["shape", None, None]  # answered: the transport acknowledges
        assert sample("fwcm_messages_rejected_total", transport="mqtt", reason="shape") == refused_before + 1
        assert fleet.deployment("d1") == ("downloading", 1, 4096)
        assert fleet.sequence("d2") == 7
        assert fleet.deployment("d0") == ("notified", -1, None)
        # the device's next good report is applied in the next batch
        assert await feed.send(("d0", fleet.report("d0", 2, k7=10))) == [None]
        assert fleet.deployment("d0") == ("downloading", 2, 10)
        assert fleet.dead_letters() == []  # refused, not set aside
    finally:
        await feed.close()


# -- passes every check, fails in the database: a dead letter ----------------------------------


@contextmanager
def poisoned(db: Database, device_pk: int) -> Iterator[None]:
    """A trigger that makes every update of one device's deployments fail."""
    if db.is_sqlite:
        create = [
            f"CREATE TRIGGER poison BEFORE UPDATE ON deployments WHEN NEW.device_id = {device_pk} "
            "BEGIN SELECT RAISE(ABORT, 'poisoned deployment'); END"
        ]
        drop = ["DROP TRIGGER poison"]
    else:
        create = [
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.device_id = {device_pk} THEN RAISE EXCEPTION 'poisoned deployment'; END IF; "
            "RETURN NEW; END $$",
            "CREATE TRIGGER poison BEFORE UPDATE ON deployments FOR EACH ROW EXECUTE FUNCTION poison()",
        ]
        drop = ["DROP TRIGGER poison ON deployments", "DROP FUNCTION poison()"]
    with db.engine.begin() as conn:
        for sql in create:
            conn.execute(text(sql))
    try:
        yield
    finally:
        with db.engine.begin() as conn:
            for sql in drop:
                conn.execute(text(sql))


async def test_a_report_that_fails_in_the_database_becomes_a_dead_letter(fleet: Fleet) -> None:
    feed = Feed(fleet.db)
    poison = fleet.report("d0", 1)
    try:
        with poisoned(fleet.db, fleet.pks["d0"]):
            outcomes = await feed.send(
                ("d1", fleet.report("d1", 1)),
                ("d0", poison),
                ("d2", fleet.report("d2", 1, k7=99)),
                ("d3", fleet.hello("d3", 1, 5)),
            )
            assert reasons(outcomes) == [None, "quarantined", None, None]
            assert fleet.deployment("d1")[0] == "downloading"
            assert fleet.deployment("d2") == ("downloading", 1, 99)
            assert fleet.sequence("d3") == 5
            assert fleet.deployment("d0") == ("notified", -1, None)
            [letter] = fleet.dead_letters()
            assert (letter.device, letter.transport, letter.payload) == ("d0", "mqtt", poison)
            assert "poisoned deployment" in letter.error
            assert letter.reason in ("integrity", "database")
            assert sample("fwcm_messages_quarantined_total", transport="mqtt", reason=letter.reason) >= 1
            # the next batch is not held up: another device's report applies at once
            assert await feed.send(("d1", fleet.report("d1", 2, DOWNLOADED))) == [None]
            assert fleet.deployment("d1")[:2] == ("downloaded", 2)
        # once the fault is gone, the device's next report applies
        assert await feed.send(("d0", fleet.report("d0", 2))) == [None]
        assert fleet.deployment("d0")[:2] == ("downloading", 2)
    finally:
        await feed.close()

    page = fleet.api.client.get("/api/v1/dead-letters").json()
    assert page["total"] == 1
    [item] = page["items"]
    assert (item["device"], item["reason"]) == ("d0", letter.reason)
    assert base64.b64decode(item["payload"]) == poison
    assert fleet.api.client.get("/api/v1/dead-letters", params={"device": "d1"}).json()["total"] == 0
    other = fleet.api.new_tenant("other")
    assert other.get("/api/v1/dead-letters").json() == {"total": 0, "limit": 100, "offset": 0, "items": []}
    assert fleet.api.client.get("/api/v1/dead-letters", params={"limit": 0}).status_code == 422
    assert fleet.api.anonymous().get("/api/v1/dead-letters").status_code == 401


async def test_every_poisoned_report_of_a_batch_is_found(fleet: Fleet) -> None:
    """Several failing reports among many: each is set aside alone, every other one commits."""
    feed = Feed(fleet.db)
    try:
        with poisoned(fleet.db, fleet.pks["d0"]):
            messages = [("d0", fleet.report("d0", seq)) for seq in (1, 2, 3)]
            messages += [("d1", fleet.report("d1", seq, k7=seq)) for seq in range(1, 30)]
            messages += [("d2", fleet.hello("d2", seq, seq)) for seq in range(1, 30)]
            outcomes = await feed.send(*messages)
        assert reasons(outcomes) == ["quarantined"] * 3 + [None] * 58
        assert fleet.deployment("d1") == ("downloading", 29, 29)
        assert fleet.sequence("d2") == 29
        assert sorted(d.payload for d in fleet.dead_letters()) == sorted(p for _d, p in messages[:3])
    finally:
        await feed.close()


# -- an outage is not poison ---------------------------------------------------------------------


@contextmanager
def outage(db: Database, url: str) -> Iterator[None]:
    """Make the database refuse every statement: the SQLite file is replaced by a directory (its
    volume is gone); the PostgreSQL schema is renamed away."""
    if db.is_sqlite:
        path = Path(make_url(url).database or "")
        db.engine.dispose()
        away = path.with_name(path.name + ".away")
        path.rename(away)
        path.mkdir()
        try:
            yield
        finally:
            path.rmdir()
            away.rename(path)
        return
    schema = parse_qs(urlsplit(url).query)["options"][0].split("=", 1)[1]
    admin = create_engine(db.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER SCHEMA "{schema}" RENAME TO "{schema}_down"'))
        try:
            yield
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER SCHEMA "{schema}_down" RENAME TO "{schema}"'))
    finally:
        admin.dispose()


async def test_a_database_outage_sets_nothing_aside_and_acknowledges_nothing(
    fleet: Fleet, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    feed = Feed(fleet.db)
    quarantined = sum(
        sample("fwcm_messages_quarantined_total", transport="mqtt", reason=r)
        for r in ("integrity", "data", "database", "internal")
    )
    caplog.set_level(logging.WARNING, logger="fwcm.server.ingest")
    try:
        # every device's key is cached now: during the outage only applying fails
        assert await feed.send(*[(n, fleet.hello(n, 1, 1)) for n in NAMES]) == [None] * 4
        with outage(fleet.db, database_url):
            futures = feed.submit(("d0", fleet.report("d0", 2)), ("d1", fleet.report("d1", 2)))
            deadline = asyncio.get_running_loop().time() + 30
            while sum("database unavailable" in r.getMessage() for r in caplog.records) < 3:
                assert asyncio.get_running_loop().time() < deadline, "ingest did not notice the outage"
                await asyncio.sleep(0.05)
            assert not any(f.done() for f in futures)  # nothing acknowledged: the transport redelivers
        assert await asyncio.wait_for(asyncio.gather(*futures), 30) == [None, None]
    finally:
        await feed.close()
    assert fleet.deployment("d0")[:2] == ("downloading", 2)
    assert fleet.deployment("d1")[:2] == ("downloading", 2)
    assert fleet.dead_letters() == []
    assert quarantined == sum(
        sample("fwcm_messages_quarantined_total", transport="mqtt", reason=r)
        for r in ("integrity", "data", "database", "internal")
    )
    assert not [r for r in caplog.records if r.exc_info and "database unavailable" in r.getMessage()]


# -- anything a device can seal ----------------------------------------------------------------

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**70)
    | st.integers(max_value=-1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-2, 16) | st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.integers(1, 16) | st.integers() | st.text(max_size=3) | st.booleans()
_bodies = st.dictionaries(_keys, _values, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(_bodies, min_size=1, max_size=6), real=st.lists(st.booleans(), min_size=6, max_size=6))
def test_arbitrary_sealed_maps_never_hold_up_a_good_report(
    fleet: Fleet, bodies: list[dict[Any, Any]], real: list[bool]
) -> None:
    """Validly MACed maps with any values (a real report of d0 with fields replaced, or anything
    at all), followed by a good report of d1: it is applied in the same batch."""
    good_seq = fleet.deployment("d1")[1] + 1
    payloads = []
    for body, like_a_report in zip(bodies, real, strict=False):
        base: dict[Any, Any] = {1: "d0", 2: fleet.campaign, 3: 1, 4: 1, 5: 1, 6: 0} if like_a_report else {}
        payloads.append(fleet.seal("d0", {**base, **body}))

    async def run() -> list[ProtocolError | None]:
        feed = Feed(fleet.db)
        try:
            return await feed.send(*[("d0", p) for p in payloads], ("d1", fleet.report("d1", good_seq)))
        finally:
            await feed.close()

    outcomes = asyncio.run(run())
    assert outcomes[-1] is None
    assert all(o is None or isinstance(o, ProtocolError) for o in outcomes)
    assert fleet.deployment("d1")[:2] == ("downloading", good_seq)


# -- bounded ------------------------------------------------------------------------------------


def test_dead_letters_are_trimmed_per_tenant(api: Any) -> None:
    with api.db.session() as s:
        other, _key = tenants.create_tenant(s, "other")
        other_id = other.id
    for n in range(5):
        with api.db.session() as s:
            dl.add(s, [dl.Letter(api.tenant_id, f"a{n}", "mqtt", b"x", "data", "e")])
            if n < 3:
                dl.add(s, [dl.Letter(other_id, f"o{n}", "coap", b"y", "integrity", "e")])
    with api.db.session() as s:
        assert dl.trim(s, keep=2) == 3 + 1
    with api.db.read() as s:
        total, rows = dl.page(s, api.tenant_id, 10, 0)
        assert (total, [r.device for r in rows]) == (2, ["a4", "a3"])
        total, rows = dl.page(s, other_id, 10, 0)
        assert (total, [r.device for r in rows]) == (2, ["o2", "o1"])
        assert s.scalar(select(func.count()).select_from(DeadLetter)) == 4


async def test_a_late_hello_does_not_undo_a_newer_one(fleet: Fleet) -> None:
    """Hellos are ordered by their seq like any report: one delivered late (a broker hands a dead
    replica's unacknowledged messages to another) leaves what a newer hello recorded."""
    feed = Feed(fleet.db)
    try:
        assert await feed.send(("d0", fleet.hello("d0", 7, 3))) == [None]
        assert fleet.sequence("d0") == 3
        assert await feed.send(("d0", fleet.hello("d0", 5, 1))) == [None]  # older: acknowledged, ignored
        assert fleet.sequence("d0") == 3
        assert await feed.send(("d0", fleet.hello("d0", 8, 4)), ("d0", fleet.hello("d0", 6, 2))) == [
            None,
            None,
        ]
        assert fleet.sequence("d0") == 4
    finally:
        await feed.close()


async def test_a_hello_sent_before_the_confirming_boot_is_no_revert(fleet: Fleet) -> None:
    """Hellos and reports reach replicas by different paths, so the hello a device sent on the
    image it ran before the update can arrive after its success. The success names the hello of
    the boot that confirmed it (key 16): an earlier hello is no revert, a later one on the old
    image is."""
    feed = Feed(fleet.db)
    old, new = b"\x01" * 32, b"\x02" * 32
    try:
        for seq, state in ((1, DOWNLOADING), (2, DOWNLOADED), (3, 3)):  # 3: Updating
            assert await feed.send(("d0", fleet.report("d0", seq, state))) == [None]
        success = fleet.report("d0", 4, 0, k6=1, k9=9, k15=new, k16=7)  # booted with hello 7
        assert await feed.send(("d0", success)) == [None]
        assert fleet.deployment("d0")[0] == "succeeded"
        late = fleet.seal("d0", {1: "d0", 2: 0, 3: 0, 4: 6, 5: 0, 6: 0, 9: 1, 15: old})
        assert await feed.send(("d0", late)) == [None]  # sent before the boot: no revert
        assert fleet.deployment("d0")[0] == "succeeded"
        fallback = fleet.seal("d0", {1: "d0", 2: 0, 3: 0, 4: 8, 5: 0, 6: 0, 9: 1, 15: old})
        assert await feed.send(("d0", fallback)) == [None]  # a later boot on the old image
        assert fleet.deployment("d0")[0] == "reverted"
    finally:
        await feed.close()
