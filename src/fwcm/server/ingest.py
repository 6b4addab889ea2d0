"""Batched ingest of device messages from every transport.

Messages are queued as they arrive, verified (size, COSE_Mac0 under the device's own key, topic or
path identity, the range of every field; a ``report`` a transport built for a device it
authenticated itself, as LwM2M does, has no MAC but the same bounds), and applied in one
transaction per batch.  Each message is acknowledged only after its batch committed, or refused
with a reason.  A batch that fails is halved until the messages that fail on their own are found:
those become dead letters (stored, acknowledged, counted) and the rest commits, so one device's
message never holds up another's.
When the database itself fails, nothing is acknowledged and the batch is retried, so the
transport redelivers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from fwcm import attestation, protocol
from fwcm.protocol import REPORT_ACCOUNTING, REPORT_ANSWER, REPORT_EVIDENCE, ProtocolError, Result
from fwcm.protocol.fields import loads
from fwcm.rollout import deployment
from fwcm.rollout.consent import ConsentSpec
from fwcm.rollout.policy import Policy
from fwcm.server import metrics
from fwcm.server.keys import KeyCache
from fwcm.store import attestations as aq
from fwcm.store import consent as cq
from fwcm.store import deadletters as dl
from fwcm.store import deployments as dq
from fwcm.store import device_state as ds
from fwcm.store import leases as lq
from fwcm.store import notices as nq
from fwcm.store.db import Database
from fwcm.store.models import Campaign
from fwcm.transport.inbound import Inbound

log = logging.getLogger(__name__)

Credentials = list[tuple[int, dq.Target, int]]
"""(campaign, target, manifest id) of attested installs that succeeded: credentials are due."""
AttestedFn = Callable[[list[aq.AttestationResult], Credentials], None]


class _Unit(NamedTuple):
    """A verified message of a batch: a status report, or a presence flag (``online``)."""

    pos: int
    """Its place in the batch."""
    key: ds.DeviceKey
    verified: ds.Verified | None
    online: bool | None


@dataclass
class _Checked:
    """A verified batch: the answer of each refused message, and what to apply with where each
    message sits in the batch (kept as plain lists: building units is left to a failed batch)."""

    outcomes: list[ProtocolError | None]
    verified: list[ds.Verified]
    where: list[int]
    """Batch position of each verified report."""
    presence: list[tuple[int, ds.DeviceKey, bool]]
    """(batch position, device, online) of each presence message."""

    def units(self) -> list[_Unit]:
        """One unit per message to apply, in batch order: what isolating a failed batch halves."""
        units = [_Unit(pos, v.key, v, None) for pos, v in zip(self.where, self.verified, strict=True)]
        units += [_Unit(pos, key, None, online) for pos, key, online in self.presence]
        return sorted(units, key=lambda u: u.pos)


@dataclass
class _Applied:
    """What committed transactions of a batch changed, for the callbacks after acknowledging."""

    changed: int = 0
    campaigns: set[int] = field(default_factory=set)
    attested: list[aq.AttestationResult] = field(default_factory=list)
    credentials: Credentials = field(default_factory=list)

    def add(self, other: _Applied) -> None:
        self.changed += other.changed
        self.campaigns |= other.campaigns
        self.attested += other.attested
        self.credentials += other.credentials


def failure_reason(exc: BaseException) -> str:
    """A short label for why a message failed to apply (a metric label: few values)."""
    if isinstance(exc, sa_exc.IntegrityError):
        return "integrity"
    if isinstance(exc, sa_exc.DataError | OverflowError | ValueError):
        return "data"
    if isinstance(exc, sa_exc.DBAPIError):
        return "database"
    return "internal"


def describe(exc: BaseException) -> str:
    """The driver's first line (no SQL, no parameters: a dead letter is shown to its tenant)."""
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".replace("\x00", "")[:200]


def _split(
    verified: list[ds.Verified],
) -> tuple[list[ds.Verified], list[ds.Verified], list[ds.Verified], list[ds.Verified]]:
    """Status reports; attestation evidence, consent answers and usage records (a report may be
    several of those, never both a plain report and one of them)."""
    reports: list[ds.Verified] = []
    evidence: list[ds.Verified] = []
    answers: list[ds.Verified] = []
    usage: list[ds.Verified] = []
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


def _body(payload: bytes) -> dict[Any, Any]:
    """The CBOR report map of a ``report`` message: one a transport built for a device it
    authenticated itself (LwM2M), so it carries no MAC of the device's."""
    if len(payload) > protocol.MAX_REPORT_BYTES:
        raise ProtocolError(
            "oversized", f"report of {len(payload)} bytes exceeds {protocol.MAX_REPORT_BYTES}"
        )
    body = loads(payload)
    if not isinstance(body, dict):
        raise ProtocolError("shape", "report body is not a CBOR map")
    return body


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
        self._waiting: deque[Inbound] = deque()
        self._arrivals: deque[float] = deque()
        """When each waiting message arrived (the latency of a batch is its oldest message's)."""
        self._wake = asyncio.Event()
        self._batch_max = batch_max
        self._linger = linger_s
        self.ingested = 0
        self.rejected = 0
        self.quarantined = 0

    def submit(self, inbound: Inbound) -> None:
        """Queue a message (called on the event loop thread)."""
        self._waiting.append(inbound)
        self._arrivals.append(time.monotonic())
        if not self._wake.is_set():
            self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._waiting)

    async def run(self) -> None:
        """Take what waits, up to ``batch_max`` at a time. The first message after a quiet spell
        waits ``linger`` for company; under load, what arrived while a batch was applied forms
        the next one at once."""
        waiting = self._waiting
        while True:
            if not self._wake.is_set():
                await self._wake.wait()
                await asyncio.sleep(self._linger)
            batch = [waiting.popleft() for _ in range(min(len(waiting), self._batch_max))]
            arrivals = [self._arrivals.popleft() for _ in batch]
            if not waiting:
                self._wake.clear()
            if batch:
                await self._process_until_durable(batch, arrivals[0])

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until the queue is empty (used at shutdown and by tests)."""
        deadline = time.monotonic() + timeout
        while self._waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _process_until_durable(self, batch: list[Inbound], arrived: float) -> None:
        delay = 0.2
        while True:
            try:
                checked, first = await asyncio.to_thread(self._process, batch)
                break
            except Exception:  # the key lookup: the database is down
                log.exception("ingest batch of %d failed; retrying without acknowledging", len(batch))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        outcomes = checked.outcomes
        if isinstance(first, _Applied):
            applied = first
        else:
            applied = await self._isolate(batch, checked.units(), outcomes, first)
        self._count(batch, outcomes)
        now = time.monotonic()
        metrics.LAST_COMMIT.set(time.time())
        for m, outcome in zip(batch, outcomes, strict=True):
            m.on_done(outcome)
        metrics.INGEST_LATENCY.observe(now - arrived)  # the batch's oldest report
        metrics.BATCH_SIZE.observe(len(batch))
        if applied.attested or applied.credentials:
            self.on_attested(applied.attested, applied.credentials)
        if applied.campaigns:
            self._on_applied(applied.campaigns)

    async def _isolate(
        self,
        batch: list[Inbound],
        units: list[_Unit],
        outcomes: list[ProtocolError | None],
        failure: Exception,
    ) -> _Applied:
        """Apply what can be applied of a batch whose transaction failed.

        The failing part is halved until single messages fail; one that fails twice while the
        database takes writes becomes a dead letter. A part that fails while the database takes no
        writes is an outage: it waits and is retried, and nothing of the batch is acknowledged.
        """
        log.warning("ingest batch of %d failed (%s); isolating what fails", len(units), describe(failure))
        log.debug("ingest batch failure", exc_info=failure)
        applied = _Applied()
        pending: list[tuple[Sequence[_Unit], Exception | None]] = [(units, failure)]
        tried_alone: set[int] = set()
        buried: list[tuple[_Unit, str]] = []
        delay = 0.2
        while pending:
            part, error = pending.pop()
            if error is None:
                try:
                    applied.add(await asyncio.to_thread(self._apply_units, part))
                    continue
                except Exception as exc:
                    error = exc
            alone = len(part) == 1
            if alone and part[0].pos in tried_alone:
                reason, why = failure_reason(error), describe(error)
                if await asyncio.to_thread(self._bury, batch, part[0], reason, why):
                    outcomes[part[0].pos] = ProtocolError("quarantined", f"failed to apply: {why}")
                    buried.append((part[0], reason))
                    continue
            elif await asyncio.to_thread(self._database_works):
                if alone:  # once more on its own: a deadlock or a dropped connection passes
                    tried_alone.add(part[0].pos)
                    pending.append((part, None))
                else:
                    mid = len(part) // 2
                    pending += [(part[mid:], None), (part[:mid], None)]  # arrival order: left first
                continue
            log.warning(
                "database unavailable (%s); %d messages wait, none acknowledged",
                describe(error),
                sum(len(p) for p, _e in pending) + len(part),
            )
            pending.append((part, None))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        if buried:
            self._report_buried(batch, buried)
        return applied

    def _database_works(self) -> bool:
        try:
            with self.db.session() as s:
                dl.probe(s)
            return True
        except Exception:
            return False

    def _bury(self, batch: list[Inbound], unit: _Unit, reason: str, error: str) -> bool:
        """Store a message that fails on its own as a dead letter; False if the database failed."""
        m = batch[unit.pos]
        letter = dl.Letter(unit.key.tenant_id, m.device, m.transport, m.payload, reason, error)
        try:
            with self.db.session() as s:
                dl.add(s, [letter])
            return True
        except Exception:
            return False

    def _report_buried(self, batch: list[Inbound], buried: list[tuple[_Unit, str]]) -> None:
        """Count dead letters, and log them in one line per batch."""
        for unit, reason in buried:
            metrics.QUARANTINED.labels(batch[unit.pos].transport, reason).inc()
        self.quarantined += len(buried)
        names = [f"{batch[u.pos].tenant}/{batch[u.pos].device}" for u, _r in buried[:5]]
        more = f" and {len(buried) - 5} more" if len(buried) > 5 else ""
        log.warning(
            "ingest: %d of %d messages failed to apply and were kept as dead letters: %s%s",
            len(buried),
            len(batch),
            ", ".join(names),
            more,
        )

    @staticmethod
    def _attest(s: Session, evidence: list[ds.Verified]) -> list[aq.AttestationResult]:
        """Attestation evidence: the deployments it answers in, the attestation rules decide."""
        if not evidence:
            return []
        rows = aq.awaiting_evidence(s, {(v.report.campaign, v.key.device_pk) for v in evidence})
        awaiting = {pair: row.awaiting for pair, row in rows.items()}
        judged = attestation.judge_evidence(
            awaiting, [(v.key.device_pk, v.report) for v in evidence], time.time()
        )
        return aq.write_verdicts(s, judged, rows)

    def _judge(self, s: Session, reports: list[ds.Verified]) -> list[deployment.Applied]:
        """What campaign reports do to their deployments: current rows in, the rules decide."""
        if not reports:
            return []
        views = dq.deployment_views(s, {(v.report.campaign, v.key.device_pk) for v in reports})
        missing = {c for c, _d in views} - self._policies.keys()
        for cid, stored in lq.campaign_policy_rows(s, missing).items():  # they never change once started
            self._policies[cid] = Policy.from_stored(stored)
        reported = [deployment.Reported(v.key.tenant_id, v.key.device_pk, v.report) for v in reports]
        return deployment.judge_reports(views, reported, self._policies, time.time())

    @staticmethod
    def _hellos(s: Session, hellos: list[ds.Verified]) -> set[int]:
        """Record hellos, and mark reverted the succeeded deployments whose device's hello shows
        another image than its success claimed; returns the campaigns that changed."""
        if not hellos:
            return set()
        records = ds.hello_records(s, [v.key.device_pk for v in hellos])
        said = [deployment.Reported(v.key.tenant_id, v.key.device_pk, v.report) for v in hellos]
        reverted = deployment.judge_hellos(records, said)
        ds.apply_hellos(s, hellos)
        for r in reverted:
            log.warning("device %d of campaign %d reverted: %s", r.device_pk, r.campaign, r.detail)
        return dq.write_reverted(s, reverted)

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

    def _process(self, batch: list[Inbound]) -> tuple[_Checked, _Applied | Exception]:
        """Verify a batch and apply it in one transaction: what was checked, and what the
        transaction changed (or why it failed)."""
        checked = self._verify(batch)
        presence = {key.device_pk: online for _pos, key, online in checked.presence}
        try:
            return checked, self._apply(checked.verified, presence)
        except Exception as exc:
            return checked, exc

    def _verify(self, batch: list[Inbound]) -> _Checked:
        """Check every message of a batch: the refused get their reason, the rest are kept."""
        outcomes: list[ProtocolError | None] = [None] * len(batch)
        sealed: dict[int, protocol.Sealed] = {}
        for i, m in enumerate(batch):
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
        vouched: dict[int, dict[Any, Any]] = {}
        for i, m in enumerate(batch):
            if m.kind == "report":  # the transport authenticated the device and built the report
                try:
                    vouched[i] = _body(m.payload)
                except ProtocolError as err:
                    outcomes[i] = err
        names = {(batch[i].tenant, batch[i].device) for i in [*sealed, *vouched]}
        names |= {(b.tenant, b.device) for b in batch if b.kind == "presence"}
        keys = self.keys.lookup(names)
        checked = _Checked(outcomes, [], [], [])
        opened: list[tuple[int, protocol.Sealed | dict[Any, Any]]] = [*sealed.items(), *vouched.items()]
        for i, frame in sorted(opened, key=lambda x: x[0]):
            m = batch[i]
            key = keys.get((m.tenant, m.device))
            try:
                if key is None:
                    raise ProtocolError("unknown_device", f"unknown device {m.tenant}/{m.device}")
                if key.retired:
                    raise ProtocolError("decommissioned", f"device {m.tenant}/{m.device} is decommissioned")
                body = frame if isinstance(frame, dict) else frame.open(key.secret)
                report = protocol.Report.from_map(body)
                if report.device != m.device:
                    raise ProtocolError("forbidden", f"report names {report.device!r}, sent as {m.device!r}")
                checked.verified.append(ds.Verified(key, report))
                checked.where.append(i)
            except ProtocolError as err:
                outcomes[i] = err
            except Exception as exc:  # a decoder bug: refuse this message, never stall the batch
                log.warning("cannot decode a message of %s/%s: %s", m.tenant, m.device, describe(exc))
                outcomes[i] = ProtocolError("internal", f"could not decode: {describe(exc)}")
        for i, m in enumerate(batch):
            if m.kind == "presence":
                key = keys.get((m.tenant, m.device))
                if key is not None and not key.retired and m.payload in (b"0", b"1"):
                    checked.presence.append((i, key, m.payload == b"1"))
        return checked

    def _apply_units(self, units: Sequence[_Unit]) -> _Applied:
        verified = [u.verified for u in units if u.verified is not None]
        return self._apply(verified, {u.key.device_pk: u.online for u in units if u.online is not None})

    def _apply(self, verified: list[ds.Verified], presence: dict[int, bool]) -> _Applied:
        """Apply verified messages in one transaction; raises (nothing written) if any fails."""
        if not verified and not presence:
            return _Applied()
        reports, evidence, answers, usage = _split(verified)
        done = [
            (v.report.campaign, v.key.device_pk)
            for v in reports
            if v.report.campaign and v.report.result == Result.SUCCESS
        ]
        with self.db.session() as s:
            attested = self._attest(s, evidence)
            reverted = self._hellos(s, [v for v in reports if v.report.campaign == 0])
            applied = self._judge(s, [v for v in reports if v.report.campaign != 0])
            dq.write_reports(s, applied)
            changed, campaigns = len(applied), {a.campaign for a in applied} | reverted
            if answers:
                contexts = self._answer_contexts(s, {v.report.campaign for v in answers})
                campaigns |= cq.apply_answers(s, answers, contexts)
            if usage:
                cq.apply_accounting(s, usage)
            credentials = nq.credential_targets(s, done) if done else []
            ds.set_presence(s, presence)
        for a in attested:
            metrics.ATTESTATIONS.labels(a.reason or "accepted").inc()
            if a.reason is not None:
                log.warning("attestation of %s/%s refused: %s", a.target.tenant, a.target.name, a.reason)
                campaigns.add(a.campaign)
        log.debug("%d reports applied: %d deployments changed", len(verified), changed)
        return _Applied(changed, campaigns, attested, credentials)

    def _count(self, batch: list[Inbound], outcomes: list[ProtocolError | None]) -> None:
        """Metrics of a settled batch: ingested per transport (one update per batch), refusals."""
        ingested: Counter[str] = Counter()
        for m, outcome in zip(batch, outcomes, strict=True):
            if m.kind == "presence":
                continue
            if outcome is None:
                ingested[m.transport] += 1
            elif outcome.reason != "quarantined":  # counted as dead letters
                self.rejected += 1
                metrics.REJECTED.labels(m.transport, outcome.reason).inc()
                log.warning(
                    "refused %s message from %s/%s: %s",
                    m.transport,
                    m.tenant,
                    m.device,
                    outcome,
                )
        for transport, n in ingested.items():
            self.ingested += n
            metrics.REPORTS_INGESTED.labels(transport).inc(n)
