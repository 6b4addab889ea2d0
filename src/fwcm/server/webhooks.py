"""Webhook delivery, a task of each replica.

Every tick the worker leases the webhooks no other live replica holds (as the engine leases
campaigns), and for each one it holds runs one task that

1. turns the campaign events and device failures recorded since the webhook's cursors into
   deliveries, moving the cursors in the same transaction (the outbox is what the server already
   writes with every change, so a restart neither loses nor repeats an event), and
2. posts the oldest pending delivery, then the next: one request in flight per webhook, so its
   events arrive in order and a slow or dead receiver holds up only itself. A global semaphore
   bounds the requests of the replica, every request has a deadline, and the response body is
   never read.

A failed try is retried with exponential backoff (``fwcm.webhooks.backoff``) until it is given up.
Delivery is at least once: a replica that dies after a receiver answered but before the answer
was recorded leaves the delivery to be sent again, with the same event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import httpx
from sqlalchemy.orm import Session

from fwcm import webhooks as rules
from fwcm.store import webhooks as wq
from fwcm.store.db import Database, utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")

LEASE_S = 30.0
TRIM_EVERY_S = 60.0
EVENTS_PER_PASS = 500
"""Campaign events (and, apart, device failures) turned into deliveries per pass of a webhook."""


@dataclass(frozen=True)
class Outcome:
    state: str
    status: int | None
    error: str | None
    next_at: datetime | None


class WebhookWorker:
    """Delivers the events of the webhooks this replica holds; see the module docstring."""

    def __init__(
        self,
        db: Database,
        owner: str,
        *,
        retry_s: float = 10.0,
        batch_s: float = 10.0,
        settle_s: float | None = None,
        timeout_s: float = 10.0,
        concurrency: int = 32,
        tick_s: float = 1.0,
    ) -> None:
        self.db = db
        self.owner = owner
        self.retry_s = retry_s
        self.batch_s = batch_s
        # SQLite commits writers one at a time in id order; PostgreSQL may make a smaller id
        # visible after a larger one, so it tails only ids seen committed ``settle_s`` ago.
        self.settle_s = settle_s if settle_s is not None else (0.0 if db.is_sqlite else 5.0)
        self.timeout_s = timeout_s
        self.tick_s = tick_s
        self._limit = asyncio.Semaphore(concurrency)
        self._seen: deque[tuple[float, tuple[int, int]]] = deque()
        self._horizon = (0, 0)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._trimmed = 0.0
        self._client: httpx.AsyncClient | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        timeout = httpx.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s))
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False) as client:
            self._client = client
            try:
                while True:
                    try:
                        await self._step()
                    except Exception:
                        log.exception("webhook step failed")
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.tick_s)
            finally:
                for t in self._tasks.values():
                    t.cancel()
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
                self._tasks.clear()

    async def release(self) -> None:
        await self._db(lambda s: wq.release(s, self.owner))

    async def _db(self, work: Callable[[Session], T]) -> T:
        def run() -> T:
            with self.db.session() as s:
                return work(s)

        return await asyncio.to_thread(run)

    async def _step(self) -> None:
        hooks, newest = await self._db(lambda s: (wq.lease(s, self.owner, LEASE_S), wq.newest_events(s)))
        self._advance_horizon(newest)
        held = {h.id for h in hooks}
        for hid in [h for h in self._tasks if h not in held]:  # lost (or deleted): stop at once
            self._tasks.pop(hid).cancel()
        for hid in held:
            task = self._tasks.get(hid)
            if task is None or task.done():
                self._tasks[hid] = asyncio.create_task(self._serve(hid), name=f"webhook-{hid}")
        if time.monotonic() - self._trimmed >= TRIM_EVERY_S:
            self._trimmed = time.monotonic()
            n = await self._db(wq.trim)
            if n:
                log.info("trimmed %d old webhook deliveries", n)

    def _advance_horizon(self, newest: tuple[int, int]) -> None:
        """Remember when each newest id was seen; tail up to those seen ``settle_s`` ago."""
        now = time.monotonic()
        self._seen.append((now, newest))
        while self._seen and now - self._seen[0][0] >= self.settle_s:
            self._horizon = self._seen.popleft()[1]

    async def _serve(self, hook_id: int) -> None:
        """One pass over one webhook: new events into deliveries, then what is due, in order."""
        try:
            hook = await asyncio.to_thread(self._enqueue, hook_id, self._horizon)
            if hook is None:
                return
            while True:
                due = await asyncio.to_thread(self._head, hook_id)
                if due is None or due.next_at > utcnow():
                    return
                outcome = await self._post(hook, due)
                await self._db(partial(_record, hook_id=hook_id, owner=self.owner, due=due, o=outcome))
                if outcome.state != "delivered":
                    what = (hook_id, due.event_id, outcome.state, outcome.error)
                    log.info("webhook %d: delivery %s %s: %s", *what)
                if outcome.state == "pending":
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook %d: pass failed", hook_id)

    def _enqueue(self, hook_id: int, horizon: tuple[int, int]) -> wq.HeldWebhook | None:
        """Turn what happened past the cursors into deliveries, written in one transaction with
        the cursor move. Read first: most passes find nothing and take no write lock."""
        with self.db.read() as s:
            found = wq.held(s, self.owner, hook_id)
            if not found:
                return None
            hook = found[0]
            batch = self._collect(s, hook, horizon)
        if batch is None:
            return hook
        with self.db.session() as s:  # refused if the lease or the cursors changed meanwhile
            return hook if wq.enqueue(s, hook, self.owner, *batch, flushed=True) else None

    def _collect(
        self, s: Session, hook: wq.HeldWebhook, horizon: tuple[int, int]
    ) -> tuple[list[dict[str, Any]], int, int] | None:
        """The deliveries and new cursors of one pass, or None when there is nothing to write.

        Device failures are batched (read once per ``batch_s``), and read whenever a campaign event
        is sent too, so failures always go out before a campaign event that follows them."""
        upto_c, upto_d = horizon
        camp = wq.campaign_events_after(s, hook.tenant_id, hook.campaign_cursor, upto_c, EVENTS_PER_PASS)
        events = [e for e in map(rules.campaign_event, camp) if e is not None]
        since = None if hook.flushed_at is None else (utcnow() - hook.flushed_at).total_seconds()
        if not events and since is not None and since < self.batch_s:
            return None  # the notes among campaign events are read again at the next batch
        c_cur = camp[-1].id if len(camp) == EVENTS_PER_PASS else max(hook.campaign_cursor, upto_c)
        rows = wq.failures_after(s, hook.tenant_id, hook.device_cursor, upto_d, EVENTS_PER_PASS)
        d_cur = rows[-1].id if len(rows) == EVENTS_PER_PASS else max(hook.device_cursor, upto_d)
        events += rules.failure_events(r for r in rows if rules.is_failure(r.state, r.detail))
        events.sort(key=lambda e: e.at)
        deliveries = [_delivery(hook, e) for e in events if rules.wants(hook.events, e.type)]
        if not deliveries and (c_cur, d_cur) == (hook.campaign_cursor, hook.device_cursor):
            return None
        return deliveries, c_cur, d_cur

    def _head(self, hook_id: int) -> wq.Due | None:
        with self.db.read() as s:
            return wq.head(s, hook_id)

    async def _post(self, hook: wq.HeldWebhook, due: wq.Due) -> Outcome:
        assert self._client is not None
        stamp = int(time.time())
        headers = rules.headers(hook.secret, due.event_id, due.type, stamp, due.body)
        status: int | None = None
        try:
            async with self._limit:
                status = await asyncio.wait_for(self._send(hook.url, due.body, headers), 2 * self.timeout_s)
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except TimeoutError:
            error = "timed out"
        except httpx.HTTPError as exc:
            error = rules.short_error(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if error is None:
            return Outcome("delivered", status, None, None)
        delay = rules.backoff(due.attempts + 1, self.retry_s)
        if delay is None:
            return Outcome("failed", status, error, None)
        return Outcome("pending", status, error, utcnow() + timedelta(seconds=delay))

    async def _send(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """POST and return the status; the response body is not read (a receiver cannot make us
        hold its answer)."""
        assert self._client is not None
        async with self._client.stream("POST", url, content=body, headers=headers) as r:
            return r.status_code


def _record(s: Session, *, hook_id: int, owner: str, due: wq.Due, o: Outcome) -> None:
    wq.record_attempt(s, hook_id, owner, due.id, o.state, o.status, o.error, o.next_at)


def _delivery(hook: wq.HeldWebhook, event: rules.Event) -> dict[str, Any]:
    eid = rules.event_id()
    return {"event_id": eid, "type": event.type, "body": rules.body(eid, hook.tenant, event)}
