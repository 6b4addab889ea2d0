"""Batched ingest of device messages from every transport.

Messages are queued as they arrive, verified (size, COSE_Mac0 under the device's own key, topic or
path identity), and applied in one transaction per batch.  Each message is acknowledged only
after its batch committed, or refused with a reason; when the database fails, the batch is
retried and nothing is acknowledged, so the transport redelivers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from fwcm import protocol
from fwcm.protocol import REPORT_ACCOUNTING, REPORT_ANSWER, REPORT_EVIDENCE, ProtocolError, Result
from fwcm.rollout.consent import ConsentSpec
from fwcm.rollout.policy import Policy
from fwcm.server import metrics
from fwcm.store import consent as cq
from fwcm.store import deployments as dq
from fwcm.store.db import Database
from fwcm.store.models import Campaign
from fwcm.transport.inbound import Inbound

log = logging.getLogger(__name__)

Credentials = list[tuple[int, dq.Target, int]]
"""(campaign, target, manifest id) of attested installs that succeeded: credentials are due."""
AttestedFn = Callable[[list[dq.AttestationResult], Credentials], None]

KEY_CACHE_TTL_S = 60.0


@dataclass
class _Item:
    inbound: Inbound
    arrived: float


class KeyCache:
    """Device keys by (tenant, name); short-lived so deleted devices stop being accepted."""

    def __init__(self, db: Database, ttl: float = KEY_CACHE_TTL_S, size: int = 200_000) -> None:
        self._db = db
        self._ttl = ttl
        self._size = size
        self._entries: dict[tuple[str, str], tuple[float, dq.DeviceKey | None]] = {}

    def prime(self, tenant_id: int, targets: list[dq.Target]) -> None:
        """Remember the keys of devices just notified: their reports follow within seconds."""
        until = time.monotonic() + self._ttl
        if len(self._entries) + len(targets) > self._size:
            self._entries.clear()
        for t in targets:
            self._entries[(t.tenant, t.name)] = (until, dq.DeviceKey(t.device_pk, tenant_id, t.secret))

    def peek(self, name: tuple[str, str]) -> dq.DeviceKey | None:
        """The cached key of a device, without touching the database (None: not cached)."""
        hit = self._entries.get(name)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def lookup(self, names: set[tuple[str, str]]) -> dict[tuple[str, str], dq.DeviceKey | None]:
        now = time.monotonic()
        found: dict[tuple[str, str], dq.DeviceKey | None] = {}
        missing = set()
        for n in names:
            hit = self._entries.get(n)
            if hit is not None and hit[0] > now:
                found[n] = hit[1]
            else:
                missing.add(n)
        if missing:
            with self._db.session() as s:
                loaded = dq.device_keys(s, missing)
            if len(self._entries) + len(missing) > self._size:
                self._entries.clear()
            for n in missing:
                key = loaded.get(n)
                found[n] = key
                self._entries[n] = (now + self._ttl, key)
        return found


def _split(
    verified: list[dq.Verified],
) -> tuple[list[dq.Verified], list[dq.Verified], list[dq.Verified], list[dq.Verified]]:
    """Status reports; attestation evidence, consent answers and usage records (a report may be
    several of those, never both a plain report and one of them)."""
    reports: list[dq.Verified] = []
    evidence: list[dq.Verified] = []
    answers: list[dq.Verified] = []
    usage: list[dq.Verified] = []
    kinds = ((REPORT_EVIDENCE, evidence), (REPORT_ANSWER, answers), (REPORT_ACCOUNTING, usage))
    for v in verified:
        extra = v.report.extra
        special = False
        if extra:
            for key, found in kinds:
                if key in extra:
                    found.append(v)
                    special = True
        if not special:
            reports.append(v)
    return reports, evidence, answers, usage


class Ingest:
    def __init__(
        self,
        db: Database,
        on_applied: Callable[[set[int]], None] = lambda _c: None,
        *,
        on_attested: AttestedFn = lambda _a, _c: None,
        batch_max: int = 2000,
        linger_s: float = 0.002,
    ) -> None:
        self.db = db
        self.keys = KeyCache(db)
        self._policies: dict[int, Policy] = {}
        self._consents: dict[int, cq.AnswerContext | None] = {}
        self._on_applied = on_applied
        self.on_attested = on_attested
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._batch_max = batch_max
        self._linger = linger_s
        self.ingested = 0
        self.rejected = 0

    def submit(self, inbound: Inbound) -> None:
        """Queue a message (called on the event loop thread)."""
        self._queue.put_nowait(_Item(inbound, time.monotonic()))

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self._linger
            while len(batch) < self._batch_max:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(
                        self._queue.get_nowait()
                        if self._queue.qsize()
                        else await asyncio.wait_for(self._queue.get(), max(remaining, 0.0005))
                    )
                except TimeoutError:
                    break
            await self._process_until_durable(batch)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until the queue is empty (used at shutdown and by tests)."""
        deadline = time.monotonic() + timeout
        while self._queue.qsize() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _process_until_durable(self, batch: list[_Item]) -> None:
        delay = 0.2
        while True:
            try:
                outcomes, campaigns, attested, credentials = await asyncio.to_thread(self._process, batch)
                break
            except Exception:
                log.exception("ingest batch of %d failed; retrying without acknowledging", len(batch))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        now = time.monotonic()
        metrics.LAST_COMMIT.set(time.time())
        for item, outcome in zip(batch, outcomes, strict=True):
            item.inbound.on_done(outcome)
        metrics.INGEST_LATENCY.observe(now - batch[0].arrived)  # the batch's oldest report
        metrics.BATCH_SIZE.observe(len(batch))
        if attested or credentials:
            self.on_attested(attested, credentials)
        if campaigns:
            self._on_applied(campaigns)

    def _answer_contexts(self, s: Session, campaigns: set[int]) -> dict[int, cq.AnswerContext]:
        """Consent rules of campaigns receiving answers (cached: they do not change once started)."""
        missing = [c for c in campaigns if c not in self._consents]
        if missing:
            rows = s.execute(
                select(Campaign.id, Campaign.consent, Campaign.manifest_id).where(Campaign.id.in_(missing))
            ).all()
            for cid, consent, manifest_id in rows:
                spec = ConsentSpec.from_stored(consent) if consent else None
                self._consents[cid] = cq.AnswerContext(spec, manifest_id) if spec else None
        return {c: ctx for c in campaigns if (ctx := self._consents.get(c)) is not None}

    def _process(
        self, batch: list[_Item]
    ) -> tuple[list[ProtocolError | None], set[int], list[dq.AttestationResult], Credentials]:
        """Verify and apply a batch in one transaction; returns per-message outcome."""
        outcomes: list[ProtocolError | None] = [None] * len(batch)
        sealed: dict[int, protocol.Sealed] = {}
        presence: dict[int, bool] = {}
        for i, item in enumerate(batch):
            m = item.inbound
            if m.kind.startswith("refused:"):
                outcomes[i] = ProtocolError(m.kind.split(":", 1)[1], "refused by transport")
            elif m.kind == "status":
                try:
                    sealed[i] = protocol.unseal(m.payload)
                    if sealed[i].kid != m.device:
                        raise ProtocolError(
                            "forbidden", f"{sealed[i].kid!r} wrote on the topic of {m.device!r}"
                        )
                except ProtocolError as err:
                    sealed.pop(i, None)
                    outcomes[i] = err
        names = {(batch[i].inbound.tenant, batch[i].inbound.device) for i in sealed}
        names |= {(b.inbound.tenant, b.inbound.device) for b in batch if b.inbound.kind == "presence"}
        keys = self.keys.lookup(names)
        verified: list[dq.Verified] = []
        for i, frame in sealed.items():
            m = batch[i].inbound
            key = keys.get((m.tenant, m.device))
            try:
                if key is None:
                    raise ProtocolError("unknown_device", f"unknown device {m.tenant}/{m.device}")
                report = protocol.Report.from_map(frame.open(key.secret))
                if report.device != m.device:
                    raise ProtocolError("forbidden", f"report names {report.device!r}, sent as {m.device!r}")
                verified.append(dq.Verified(key, report))
            except ProtocolError as err:
                outcomes[i] = err
        for item in batch:
            m = item.inbound
            if m.kind == "presence":
                key = keys.get((m.tenant, m.device))
                if key is not None and m.payload in (b"0", b"1"):
                    presence[key.device_pk] = m.payload == b"1"
        reports, evidence, answers, usage = _split(verified)
        done = [
            (v.report.campaign, v.key.device_pk)
            for v in reports
            if v.report.campaign and v.report.result == Result.SUCCESS
        ]
        with self.db.session() as s:
            attested = dq.apply_attestations(s, evidence)
            changed, campaigns = dq.apply_reports(s, reports, self._policies)
            if answers:
                contexts = self._answer_contexts(s, {v.report.campaign for v in answers})
                campaigns |= cq.apply_answers(s, answers, contexts)
            if usage:
                cq.apply_accounting(s, usage)
            credentials = dq.credential_targets(s, done) if done else []
            dq.set_presence(s, presence)
        for a in attested:
            metrics.ATTESTATIONS.labels(a.reason or "accepted").inc()
            if a.reason is not None:
                log.warning("attestation of %s/%s refused: %s", a.target.tenant, a.target.name, a.reason)
                campaigns.add(a.campaign)
        ingested: Counter[str] = Counter()
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.inbound.kind == "presence":
                continue
            if outcome is None:
                ingested[item.inbound.transport] += 1
            else:
                self.rejected += 1
                metrics.REJECTED.labels(item.inbound.transport, outcome.reason).inc()
                log.warning(
                    "refused %s message from %s/%s: %s",
                    item.inbound.transport,
                    item.inbound.tenant,
                    item.inbound.device,
                    outcome,
                )
        for transport, n in ingested.items():  # one counter update per batch, not per report
            self.ingested += n
            metrics.REPORTS_INGESTED.labels(transport).inc(n)
        log.debug("batch of %d: %d deployments changed", len(batch), changed)
        return outcomes, campaigns, attested, credentials
