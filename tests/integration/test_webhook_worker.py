"""The webhook delivery worker on real databases with real local receivers: two replicas never
deliver one event twice, a receiver that never answers holds up only its own webhook, and a
restart neither loses nor repeats an event."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import select

from fwcm import manifest
from fwcm import webhooks as rules
from fwcm.rollout import launch
from fwcm.server.webhooks import WebhookWorker
from fwcm.store import campaigns, images, tenants, trust
from fwcm.store import webhooks as wq
from fwcm.store.db import Database
from fwcm.store.models import Webhook, WebhookDelivery


class Receiver:
    """An HTTP/1.1 receiver on 127.0.0.1 that records each request; ``hang`` never answers."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.url = ""
        self.closing = asyncio.Event()
        self.handlers: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")[1:]
                headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.got.append((headers, body))
                if self.hang:
                    await self.closing.wait()
                    return
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def ids(self) -> list[str]:
        return [json.loads(b)["id"] for _h, b in self.got]


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        server.close()
        receiver.closing.set()
        for w in receiver.writers:
            w.close()
        await asyncio.gather(*receiver.handlers, return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def running(db: Database, owner: str) -> AsyncIterator[WebhookWorker]:
    worker = WebhookWorker(db, owner, retry_s=60.0, batch_s=0.2, timeout_s=1.0, tick_s=0.1)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.release()


async def until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def _manifest(db: Database, tid: int) -> int:
    key = manifest.generate_private_key()
    vendor = manifest.vendor_id_for_domain("example.com")
    info = manifest.ManifestInfo(
        9, vendor, manifest.class_id_for(vendor, "a"), hashlib.sha256(b"fw").digest(), 2, ("http://h/p/x",)
    )
    with db.session() as s:
        trust.add_signer(s, tid, "k", manifest.public_key_pem(key))
        return images.upload_manifest(s, tid, manifest.build_envelope(info, key))[0].id


def _hook(db: Database, tid: int, url: str) -> tuple[int, str]:
    with db.session() as s:
        h = wq.create(s, tid, url, None, "k" * 64, rules.PER_TENANT)
        return h.id, h.secret


def _deliveries(db: Database, hook_id: int) -> list[WebhookDelivery]:
    with db.session() as s:
        rows = s.scalars(
            select(WebhookDelivery).where(WebhookDelivery.webhook_id == hook_id).order_by(WebhookDelivery.id)
        )
        return list(rows)


async def test_replicas_deliver_once_a_hanging_receiver_delays_only_itself_and_restarts_lose_nothing(
    db: Database,
) -> None:
    with db.session() as s:
        acme = tenants.create_tenant(s, "acme")[0].id
        other = tenants.create_tenant(s, "other")[0].id
    acme_m, other_m = _manifest(db, acme), _manifest(db, other)
    async with receiving(Receiver(hang=True)) as stuck, receiving(Receiver()) as live:
        stuck_hook, _ = _hook(db, acme, stuck.url)
        live_hook, secret = _hook(db, other, live.url)
        async with running(db, "r1"), running(db, "r2"):
            with db.session() as s:
                campaigns.create_campaign(s, acme, acme_m, launch.draft("a", ""))
            await until(lambda: len(stuck.got) == 1)  # acme's receiver now holds its only request
            with db.session() as s:
                cid = campaigns.create_campaign(s, other, other_m, launch.draft("o", "")).id
            with db.session() as s:
                campaigns.start_campaign(s, other, cid, launch.start_plan, allow_empty=True)
            for action in ("pause", "resume"):
                with db.session() as s:
                    campaigns.change_campaign(s, other, cid, action)
            # the other tenant's four events arrive while acme's receiver holds its only request
            await until(lambda: len(_done(db, live_hook)) == 4)
            assert len(stuck.got) == 1
            with db.read() as s:
                owners = dict(s.execute(select(Webhook.id, Webhook.lease_owner)).tuples().all())
            assert set(owners.values()) <= {"r1", "r2"}
            # the hanging receiver's request times out and is retried later, not at once
            stuck_row = await until(lambda: _tried(db, stuck_hook))
            assert stuck_row.state == "pending" and stuck_row.last_status is None
            assert stuck_row.last_error is not None and stuck_row.last_error.startswith("ReadTimeout")
            assert len(stuck.got) == 1
        states = [json.loads(b)["data"]["state"] for _h, b in live.got]
        assert states == ["draft", "running", "paused", "running"]
        assert len(set(live.ids())) == len(live.ids()) == 4  # two replicas, each event once
        for headers, body in live.got:
            assert rules.verify(secret, int(headers["x-fwcm-timestamp"]), body, headers["x-fwcm-signature"])
        assert all(json.loads(b)["tenant"] == "other" for _h, b in live.got)

        # while no replica runs, the campaign is cancelled; a restarted one sends just that
        with db.session() as s:
            campaigns.change_campaign(s, other, cid, "cancel")
        async with running(db, "r3"):
            await until(lambda: len(_done(db, live_hook)) == 5)
        assert [json.loads(b)["data"]["state"] for _h, b in live.got][4:] == ["cancelled"]
        assert len(set(live.ids())) == 5 and len(stuck.got) == 1


def _done(db: Database, hook_id: int) -> list[WebhookDelivery]:
    return [d for d in _deliveries(db, hook_id) if d.state == "delivered"]


def _tried(db: Database, hook_id: int) -> WebhookDelivery | None:
    rows = [d for d in _deliveries(db, hook_id) if d.attempts >= 1]
    return rows[0] if rows else None


async def test_removing_a_webhook_deletes_its_log_and_sends_nothing_more(db: Database) -> None:
    with db.session() as s:
        acme = tenants.create_tenant(s, "acme")[0].id
    mid = _manifest(db, acme)
    async with receiving(Receiver()) as live:
        hook, _ = _hook(db, acme, live.url)
        async with running(db, "r1"):
            with db.session() as s:
                cid = campaigns.create_campaign(s, acme, mid, launch.draft("a", "")).id
            await until(lambda: len(_done(db, hook)) == 1)
            with db.session() as s:
                wq.remove(s, acme, hook)
                campaigns.start_campaign(s, acme, cid, launch.start_plan, allow_empty=True)
            second, _ = _hook(db, acme, live.url)  # a new webhook sees only what comes after it
            with db.session() as s:
                campaigns.change_campaign(s, acme, cid, "pause")
            await until(lambda: len(_done(db, second)) == 1)
        assert _deliveries(db, hook) == []
        assert [json.loads(b)["data"]["state"] for _h, b in live.got] == ["draft", "paused"]


def test_waiting_deliveries_and_the_log_stay_bounded(db: Database, monkeypatch: Any) -> None:
    monkeypatch.setattr(wq, "MAX_PENDING", 3)
    with db.session() as s:
        acme = tenants.create_tenant(s, "acme")[0].id
    hook_id, _ = _hook(db, acme, "http://127.0.0.1:9/")
    rows = [{"event_id": f"e{i}", "type": rules.CAMPAIGN_STATE, "body": b"{}"} for i in range(5)]
    with db.session() as s:
        [hook] = wq.lease(s, "r1", 30)
        assert not wq.enqueue(s, hook, "r2", rows, 0, 0, flushed=True)  # not its lease: nothing
        assert wq.enqueue(s, hook, "r1", rows, hook.campaign_cursor, hook.device_cursor, flushed=True)
    found = _deliveries(db, hook_id)
    assert [(d.event_id, d.state) for d in found] == [
        ("e0", "failed"),
        ("e1", "failed"),
        ("e2", "pending"),
        ("e3", "pending"),
        ("e4", "pending"),
    ]
    assert found[0].last_error == "dropped: more than 3 deliveries waiting"
    with db.session() as s:
        for d in found[2:]:
            wq.record_attempt(s, hook_id, "r2", d.id, "delivered", 204, None, None)  # not r2's
        assert wq.pending_counts(s, [hook_id]) == {hook_id: 3}
        for d in found[2:]:
            wq.record_attempt(s, hook_id, "r1", d.id, "delivered", 204, None, None)
        assert wq.trim(s, keep=2) == 3
        total, log = wq.deliveries(s, acme, hook_id, 10)
        assert total == 2 and [d.event_id for d in log] == ["e4", "e3"]
        tries = wq.attempts_of(s, [d.id for d in log])
        assert [(a.attempt, a.status) for a in tries[log[0].id]] == [(1, 204)]
