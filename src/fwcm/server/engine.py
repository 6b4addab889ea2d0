"""The campaign engine: leases active campaigns, notifies devices, completes and cancels campaigns.

Every decision is taken from the database, so a restarted (or another) replica carries on where
one stopped: campaigns are held through an expiring lease, deployments are marked ``notified``
before their notice leaves, and a new lease holder re-sends the notices of ``notified``
deployments once (devices ignore a notice for an attempt they already handle).

Campaigns are isolated from one another: a campaign whose step raises is set aside with a note
saying why, counted, logged once per error, and tried again with a growing delay, while every
other campaign goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from fwcm.protocol import NoticeKind
from fwcm.rollout import deployment, planner
from fwcm.rollout.consent import ConsentSpec, deadline_at, group_verdict, quorum_verdict
from fwcm.rollout.planner import CampaignView, PolicyState
from fwcm.rollout.policy import RATE_WINDOW_S, Policy
from fwcm.rollout.states import CAMPAIGN_TERMINAL, CampaignState, DeviceState
from fwcm.server import metrics
from fwcm.server.notices import Notifier
from fwcm.store import campaigns, counts
from fwcm.store import consent as cq
from fwcm.store import deployments as dq
from fwcm.store import leases as lq
from fwcm.store import notices as nq
from fwcm.store.db import Database

log = logging.getLogger(__name__)

LEASE_S = 15.0
MIN_STEP_S = 0.1
EXPIRE_EVERY_S = 1.0
"""How often in-progress deployments are checked against the device timeout."""
JOIN_EVERY_S = 5.0
"""How often a dynamic campaign looks for newly registered matching devices."""
RESEND_CHECK_EVERY_S = 5.0
TAKEOVER_SILENT_S = 2.0
"""On its first look at a campaign (taken over, or after a restart) a replica does not wait for the
silence: what the previous holder had received but not committed is lost by then."""
RESEND_MAX_INTERVAL_S = 600.0
"""Repeats to a deployment that stays silent back off up to this interval."""
FAILED_RETRY_MIN_S = 1.0
FAILED_RETRY_MAX_S = 30.0
"""A campaign whose step raised is tried again after a delay doubling between these bounds."""
STEP_RETRY_MAX_S = 5.0
"""A step that failed as a whole (the database is gone) is retried after at most this delay."""
NOTE_MAX_CHARS = 500
FOLD_EVERY_S = 2.0
"""PostgreSQL: how often the campaign count deltas are folded into the totals (``store.counts``)."""
T = TypeVar("T")


@dataclass
class _Failing:
    """A campaign the engine cannot advance: the error (logged once) and when to try again."""

    error: str
    retry_at: float
    delay: float


class Engine:
    def __init__(self, db: Database, notifier: Notifier, owner: str, *, tick_s: float = 0.2) -> None:
        self.db = db
        self.notifier = notifier
        self.owner = owner
        self.tick_s = tick_s
        self._wake = asyncio.Event()
        self._held: set[int] = set()
        self._policy_state: dict[int, PolicyState] = {}
        self._policies: dict[int, Policy] = {}
        self._consents: dict[int, ConsentSpec] = {}
        self._joined: dict[int, float] = {}
        self._expired_at: dict[int, float] = {}
        self._resend_checked: dict[int, float] = {}
        self._resend_due: dict[int, dict[tuple[int, int], tuple[float, float]]] = {}
        """Per campaign: silent deployments (device, attempt) → (next repeat, interval)."""
        self._in_progress_seen: dict[int, deque[tuple[float, int]]] = {}
        """Per campaign: (time, deployments in progress) at each check for silent ones."""
        self._leased: list[lq.LeasedCampaign] = []
        self._leased_at = -LEASE_S
        self._lease_now = True
        self._folded_at = -FOLD_EVERY_S
        self._busy = False
        self.on_notified: Callable[[int, list[dq.Target]], None] = lambda _tenant, _targets: None
        """Called with every batch of notified devices (the ingest primes its key cache with them)."""
        self.notes: dict[int, str | None] = {}
        """Why a campaign is not moving (window closed, rate limit, approval), for status displays."""
        self._failing: dict[int, _Failing] = {}
        """Campaigns whose last step raised, set aside until their retry time."""

    def wake(self, _campaigns: object = None) -> None:
        """A campaign changed through the API: look at the leases again at once."""
        self._lease_now = True
        self._wake.set()

    async def run(self) -> None:
        failed: str | None = None  # the error of the last step, when it failed as a whole
        delay = self.tick_s
        while True:
            started = time.monotonic()
            try:
                await self.step()
            except Exception as exc:
                error = _describe(exc)
                if error != failed:  # each new error once with its traceback, not every tick
                    log.exception("engine step failed; retrying")
                failed, delay = error, min(delay * 2, STEP_RETRY_MAX_S)
                await asyncio.sleep(delay)
                continue
            if failed is not None:
                log.info("engine steps succeed again")
                failed, delay = None, self.tick_s
            self._wake.clear()
            if self._busy:  # a full batch went out and more devices wait: go on once the loop turned
                self._busy = False
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            # woken under load (reports, API calls): steps are what costs, never back to back
            await asyncio.sleep(max(0.0, MIN_STEP_S - (time.monotonic() - started)))

    async def release(self) -> None:
        await self._db(lambda s: lq.release_leases(s, self.owner))

    def _in_session(self, fn: Callable[[Session], T]) -> T:
        with self.db.session() as s:
            return fn(s)

    def _in_read(self, fn: Callable[[Session], T]) -> T:
        with self.db.read() as s:
            return fn(s)

    def _read_held(self, ids: list[int]) -> list[lq.LeasedCampaign]:
        with self.db.read() as s:
            return lq.held_campaigns(s, ids, self.owner)

    async def _db(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in one transaction on a worker thread."""
        return await asyncio.to_thread(self._in_session, fn)

    async def step(self) -> None:
        """Renew leases now and then (a write), otherwise re-read the held campaigns (a read)."""
        now = time.monotonic()
        if self._lease_now or now - self._leased_at >= LEASE_S / 3:
            self._lease_now = False
            self._leased_at = now
            leased, revoked = await self._db(
                lambda s: (lq.lease_campaigns(s, self.owner, LEASE_S), nq.revoked_key_ids(s))
            )
            self.notifier.revoked = revoked
            await self._process_cancellations()
        else:
            ids = [c.id for c in self._leased]
            leased = await asyncio.to_thread(self._read_held, ids) if ids else []
        if not self.db.is_sqlite and now - self._folded_at >= FOLD_EVERY_S:
            self._folded_at = now
            await self._fold()
        self._leased = leased
        held_now = {c.id for c in leased}
        for c in leased:
            failing = self._failing.get(c.id)
            if failing is not None and time.monotonic() < failing.retry_at:
                continue
            try:
                await self._step_campaign(c)
            except Exception as exc:
                await self._set_aside(c, exc, failing)
            else:
                if failing is not None:
                    del self._failing[c.id]
                    log.info("campaign %d: the engine advances it again", c.id)
        for cid in set(self._failing) - held_now:  # finished, cancelled, or leased elsewhere
            del self._failing[cid]
        metrics.ENGINE_CAMPAIGNS_FAILING.set(len(self._failing))
        self._held = held_now

    async def _fold(self) -> None:
        """Fold the count deltas (every replica does; concurrent folds are safe), so that reading
        a campaign's counts stays a few rows."""
        try:
            folded = await self._db(counts.fold)
        except SQLAlchemyError as exc:  # a campaign deleted under it: its deltas go next time
            log.warning("folding the campaign count deltas failed: %s", _describe(exc))
        else:
            if folded:
                log.debug("folded %d campaign count deltas", folded)

    async def _step_campaign(self, c: lq.LeasedCampaign) -> None:
        """Everything one step does for one campaign."""
        await self._load_envelope(c.manifest_id)
        spec = self._consent(c)
        if spec is not None:
            for mid in spec.variants.values():
                await self._load_envelope(mid)
            if c.consent_stage != "granted":
                await self._ask(c, spec)
                return
        if c.id not in self._held:
            await self._resend_notified(c)
        await self._advance(c)
        if spec is not None and spec.group and c.group_decision is None:
            await self._coordinate(c, spec)

    async def _set_aside(self, c: lq.LeasedCampaign, exc: Exception, failing: _Failing | None) -> None:
        """One campaign's step raised: note why, count it, log it once, and retry it later."""
        error = _describe(exc)
        metrics.ENGINE_CAMPAIGN_ERRORS.labels(type(exc).__name__).inc()
        if failing is None or failing.error != error:
            log.error("campaign %d: the engine cannot advance it; retrying with backoff", c.id, exc_info=exc)
        delay = FAILED_RETRY_MIN_S if failing is None else min(failing.delay * 2, FAILED_RETRY_MAX_S)
        self._failing[c.id] = _Failing(error, time.monotonic() + delay, delay)
        note = f"the engine cannot advance this campaign: {error}"[:NOTE_MAX_CHARS]
        if note != self.notes.get(c.id):
            try:
                await self._db(lambda s: lq.set_note(s, c.id, note))
                self.notes[c.id] = note
            except Exception:  # the database may be what failed; the note waits for the next try
                log.debug("campaign %d: could not record the engine's note", c.id, exc_info=True)

    async def _load_envelope(self, manifest_id: int) -> None:
        if manifest_id not in self.notifier.envelopes:
            env = await self._db(lambda s: lq.manifest_envelope(s, manifest_id))
            self.notifier.envelopes[manifest_id] = env

    async def _load_envelopes_of(self, targets: Iterable[dq.Target]) -> None:
        """The manifests of deployments with their own (a consent variant, a delta manifest)."""
        for mid in {t.manifest_id for t in targets if t.manifest_id is not None}:
            await self._load_envelope(mid)

    async def _resend_notified(self, c: lq.LeasedCampaign) -> None:
        targets: list[dq.Target] = await self._db(
            lambda s: dq.in_flight(s, c.id, [DeviceState.NOTIFIED.value])
        )
        await self._load_envelopes_of(targets)
        self.notifier.send_all(targets, c.id, NoticeKind.UPDATE, c.manifest_id)
        if targets:
            log.info("campaign %d: re-sent %d notices after taking the lease", c.id, len(targets))

    def _policy(self, c: lq.LeasedCampaign) -> Policy:
        cached = self._policies.get(c.id)
        if cached is None:
            cached = self._policies[c.id] = Policy.from_stored(c.policy)
        return cached

    async def _advance(self, c: lq.LeasedCampaign) -> None:
        """One step for a scheduled, running or paused campaign: snapshot → plan → apply.

        The snapshot is read on a read transaction; the pure planner decides; the plan is written
        in one transaction, and only when it changes something (on SQLite a write transaction
        holds the one write lock, and ingest waits for it; most steps change nothing).
        """
        policy = self._policy(c)
        now = time.time()
        first_look = c.id not in self._policy_state
        memory = self._policy_state.setdefault(c.id, PolicyState())
        if first_look:
            memory.accept_review(c.reviewed)
        join_due = policy.dynamic and now - self._joined.get(c.id, 0.0) >= JOIN_EVERY_S
        expire_due = now - self._expired_at.get(c.id, 0.0) >= EXPIRE_EVERY_S
        cutoffs = deployment.timeout_cutoffs(policy, now) if expire_due else {}
        since = now - RATE_WINDOW_S if first_look else None
        snapshot = await asyncio.to_thread(self._in_read, lambda s: _snapshot(s, c, cutoffs, since))
        before = copy.deepcopy(memory)  # the planner's memory as it was, should the plan be dropped
        step = planner.plan(
            policy,
            snapshot,
            memory,
            now,
            join=join_due,
            consent_due=c.consent is not None and expire_due,
            deadline=self._deadline(c) if c.consent is not None else None,
            note_before=self.notes.get(c.id),
        )
        targets: list[dq.Target] = []
        if not step.idle:
            applied = await self._db(lambda s: _apply(s, c, policy, step, now))
            if applied is None:
                log.info("campaign %d changed while its step was planned; planning again", c.id)
                self._policy_state[c.id] = before
                self._lease_now = True
                return
            targets = applied
            if step.note_changed:
                self.notes[c.id] = step.note
        memory.record_notified(len(targets), now)
        decision = step.decision
        if join_due:
            self._joined[c.id] = now
        if expire_due:
            self._expired_at[c.id] = now
        window = policy.window_span(now) if policy.window_mode == "install" else None
        self.notifier.windows[c.id] = window
        if targets:
            self.on_notified(c.tenant_id, targets)
            await self._load_envelopes_of(targets)
        self.notifier.send_all(targets, c.id, NoticeKind.UPDATE, c.manifest_id)
        if targets:
            log.info("campaign %d: notified %d devices", c.id, len(targets))
            self._busy = self._busy or len(targets) >= decision.notify
        if decision.transition is None:
            await self._resend_silent(c, policy, now, snapshot.view.in_progress)
        if decision.advance_to is not None:
            log.info("campaign %d: %s begins", c.id, policy.label(decision.advance_to))
        if decision.transition is not None:
            state, reason = decision.transition
            log.info("campaign %d %s: %s", c.id, state.value, reason)
            if state in CAMPAIGN_TERMINAL:
                self._forget(c.id)

    async def _resend_silent(
        self, c: lq.LeasedCampaign, policy: Policy, now: float, in_progress: int
    ) -> None:
        """Repeat the notice of deployments in progress that have been silent for a while.

        A report the broker acknowledged to the device can still be lost on its way to the server:
        a replica that dies holds the reports it had received but not yet committed, and the
        broker drops them with its session (see docs/operations.md). The device will not send them
        again by itself, but it answers a repeated notice of an attempt it already finished with
        its final report (new seq), and ignores one for the attempt it is working on. Each
        silent deployment is re-sent after ``silent_s`` (``rollout.deployment.silence_allowed``: longer
        while many are in progress), then at doubling intervals.
        """
        first = c.id not in self._resend_checked
        if now - self._resend_checked.get(c.id, 0.0) < RESEND_CHECK_EVERY_S:
            return
        self._resend_checked[c.id] = now
        seen = self._in_progress_seen.setdefault(c.id, deque())
        seen.append((now, in_progress))
        while seen[0][0] < now - policy.device_timeout_s / 3:
            seen.popleft()
        silent_s = deployment.silence_allowed(seen, now, policy.device_timeout_s)
        wait_s = min(TAKEOVER_SILENT_S, silent_s) if first else silent_s
        rows = await self._db(lambda s: dq.silent_in_progress(s, c.id, wait_s))
        await self._load_envelopes_of(t for t, _state in rows)
        before = self._resend_due.get(c.id, {})
        due: dict[tuple[int, int], tuple[float, float]] = {}
        resend: dict[NoticeKind, list[dq.Target]] = {}
        for t, state in rows:
            if first and state == DeviceState.NOTIFIED.value:
                continue  # re-sent on taking the lease (_resend_notified)
            key = (t.device_pk, t.attempt)
            at, interval = before.get(key, (0.0, silent_s))
            if now >= at:
                # what the device's notice is now (as CoAP's notice resource would show it)
                kind = deployment.notice_kind(DeviceState(state), CampaignState(c.state), c.group_decision)
                resend.setdefault(kind, []).append(t)
                at, interval = now + interval, min(2 * interval, RESEND_MAX_INTERVAL_S)
            due[key] = (at, interval)
        self._resend_due[c.id] = due  # deployments that reported since are forgotten
        for kind, kind_targets in resend.items():
            self.notifier.send_all(kind_targets, c.id, kind, c.manifest_id)
        sent = sum(map(len, resend.values()))
        if sent:
            log.info("campaign %d: re-sent %d notices of silent deployments", c.id, sent)

    # -- consent campaigns ------------------------------------------------------------------

    def _consent(self, c: lq.LeasedCampaign) -> ConsentSpec | None:
        """The campaign's consent rules (cached), and what its notices carry because of them."""
        if c.consent is None:
            return None
        spec = self._consents.get(c.id)
        if spec is None:
            spec = self._consents[c.id] = ConsentSpec.from_stored(c.consent)
            self.notifier.consent_notices(c.id, c.name, spec, self._deadline(c))
        return spec

    def _deadline(self, c: lq.LeasedCampaign) -> float:
        started = c.started_at.timestamp() if c.started_at is not None else time.time()
        return deadline_at(started, self._consents[c.id])

    async def _ask(self, c: lq.LeasedCampaign, spec: ConsentSpec) -> None:
        """Invite, count the answers, and grant or refuse the campaign by its quorum rule."""
        now = time.time()
        passed = now >= self._deadline(c)

        def work(s: Session) -> tuple[list[dq.Target], str, str, list[dq.Target]]:
            invites = cq.take_for_invite(s, c.id)
            if c.consent_stage is None:
                cq.set_stage(s, c.id, "asking")
            verdict, reason = quorum_verdict(spec.quorum, cq.tally(s, c.id), deadline_passed=passed)
            withdrawn: list[dq.Target] = []
            if verdict == "grant":
                cq.set_stage(s, c.id, "granted")
                lq.add_campaign_event(s, c.id, c.tenant_id, c.state, f"consent granted: {reason}")
                lq.set_note(s, c.id, None)
            elif verdict == "refuse":
                withdrawn = cq.refuse(s, c.id, c.tenant_id, reason)
            elif reason != self.notes.get(c.id):
                lq.set_note(s, c.id, reason)
            self.notes[c.id] = reason
            return invites, verdict, reason, withdrawn

        invites, verdict, reason, withdrawn = await self._db(work)
        self.notifier.send_all(invites, c.id, NoticeKind.INVITE, c.manifest_id)
        if invites:
            log.info("campaign %d: invited %d devices", c.id, len(invites))
        self.notifier.send_all(withdrawn, c.id, NoticeKind.CANCEL, c.manifest_id, reason=reason)
        if verdict != "wait":
            log.info(
                "campaign %d: consent %s: %s", c.id, "granted" if verdict == "grant" else "refused", reason
            )
            self._lease_now = True  # act on the new stage at once
            if verdict == "refuse":
                self._forget(c.id)

    async def _coordinate(self, c: lq.LeasedCampaign, spec: ConsentSpec) -> None:
        """Group install: commit once every member prepared, abort on a failure or the deadline.
        The decision is written before any commit or abort notice leaves."""
        granted = c.granted_at.timestamp() if c.granted_at is not None else time.time()
        passed = time.time() >= granted + spec.prepare_within_s

        def work(s: Session) -> tuple[str, str, list[dq.Target]]:
            verdict, reason = group_verdict(cq.group(s, c.id), deadline_passed=passed)
            if verdict == "wait" or not cq.decide_group(s, c.id, verdict):
                return "wait", reason, []
            lq.add_campaign_event(s, c.id, c.tenant_id, c.state, reason)
            if verdict == "commit":
                return verdict, reason, cq.members(s, c.id, [DeviceState.DOWNLOADED.value])
            targets = cq.members(
                s,
                c.id,
                [DeviceState.NOTIFIED.value, DeviceState.DOWNLOADING.value, DeviceState.DOWNLOADED.value],
            )
            cq.abort_members(s, c.id, reason)
            return verdict, reason, targets

        verdict, reason, targets = await self._db(work)
        if verdict == "wait":
            return
        kind = NoticeKind.COMMIT if verdict == "commit" else NoticeKind.ABORT
        self.notifier.send_all(targets, c.id, kind, c.manifest_id, reason=reason)
        log.info("campaign %d: %s (%d members told)", c.id, reason, len(targets))
        self._lease_now = True

    def _forget(self, campaign: int) -> None:
        self._policy_state.pop(campaign, None)
        self._consents.pop(campaign, None)
        self._policies.pop(campaign, None)
        self._joined.pop(campaign, None)
        self._expired_at.pop(campaign, None)
        self._resend_checked.pop(campaign, None)
        self._resend_due.pop(campaign, None)
        self._in_progress_seen.pop(campaign, None)
        self.notes.pop(campaign, None)

    async def _process_cancellations(self) -> None:
        """Withdraw notices of campaigns cancelled since the last step."""

        def work(s: Session) -> list[tuple[int, int, list[dq.Target]]]:
            out = []
            for cid, _tenant, manifest_id in lq.cancelled_unsettled(s, self.owner, LEASE_S):
                targets = dq.in_flight(
                    s,
                    cid,
                    [DeviceState.NOTIFIED.value, DeviceState.DOWNLOADING.value, DeviceState.DOWNLOADED.value],
                )
                dq.cancel_not_started(s, cid)
                lq.settle_cancel(s, cid)
                out.append((cid, manifest_id, targets))
            return out

        done: list[tuple[int, int, list[dq.Target]]] = await self._db(work)
        for cid, manifest_id, targets in done:
            self.notifier.send_all(targets, cid, NoticeKind.CANCEL, manifest_id)
            log.info("campaign %d cancelled: withdrew %d notices", cid, len(targets))


def _describe(exc: BaseException) -> str:
    """An error in one line, as the campaign's note and the log-once key show it."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _snapshot(
    s: Session, c: lq.LeasedCampaign, cutoffs: Mapping[DeviceState, float], since: float | None
) -> planner.Snapshot:
    """What the planner needs of one campaign, read in one transaction."""
    view = CampaignView.from_rows(c.state, c.phase, dq.phase_counts(s, c.id))
    silent = tuple(dq.silent(s, c.id, cutoffs)) if cutoffs else ()
    recent = tuple(dq.recent_notifications(s, c.id, since)) if since is not None else None
    return planner.Snapshot(view, silent, recent)


def _apply(
    s: Session, c: lq.LeasedCampaign, policy: Policy, step: planner.Plan, now: float
) -> list[dq.Target] | None:
    """Write one campaign's plan in the caller's transaction; returns the devices to notify, or
    None when an operator changed the campaign since the step read it (nothing is written)."""
    if not lq.unchanged_since_lease(s, c):
        return None
    if step.expired:
        dq.write_expired(s, c.id, step.expired, now)
    if step.join:
        campaigns.join_new_devices(s, c.id, c.tenant_id, policy.late_phase)
    decision = step.decision
    targets = dq.take_pending(
        s,
        c.id,
        decision.notify,
        max_phase=step.max_phase,
        now=now,
        attestation=c.attestation,
        consented_only=c.consent is not None,
    )
    if step.invite:
        cq.take_for_invite(s, c.id)  # devices that joined late are asked too
    if step.close_invitations:
        cq.expire_invitations(s, c.id)
    if decision.advance_to is not None:
        lq.set_phase(s, c.id, c.tenant_id, decision.advance_to, policy.label(decision.advance_to))
    if decision.transition is not None:
        lq.set_campaign_state(s, c.id, c.tenant_id, *decision.transition)
    if step.note_changed:
        lq.set_note(s, c.id, step.note)
    return targets
