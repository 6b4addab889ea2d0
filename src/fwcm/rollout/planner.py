"""The rollout planner (pure): what the engine does now for one campaign.

The engine hands it a :class:`CampaignView` (deployment counts per phase and state, the campaign
state and current phase), its small memory of the campaign (:class:`PolicyState`: what was
notified when, what an operator acknowledged) and the current time in POSIX seconds; it answers
with a :class:`Decision` (how many devices to notify, a phase to begin, a state to take, a note for
people watching) that the engine carries out. Nothing here reads a clock, a database or a socket.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction

from fwcm.rollout.deployment import Expired, Silent, expire
from fwcm.rollout.policy import PACE_BURST_S, RATE_WINDOW_S, Policy
from fwcm.rollout.states import (
    AGAINST_ERRORS,
    DEVICE_TERMINAL,
    IN_PROGRESS,
    NOT_FOR_ME,
    CampaignState,
    DeviceState,
)

# --------------------------------------------------------------------------------------------
# Views, state and decisions


@dataclass(frozen=True)
class CampaignView:
    """What the engine knows right now: campaign state, current phase, counts per phase and state."""

    state: CampaignState
    phase: int
    counts: Mapping[int, Mapping[str, int]]

    @classmethod
    def from_rows(cls, state: str, phase: int, rows: Iterable[tuple[int, str, int]]) -> CampaignView:
        """Build from ``SELECT phase, state, count(*) … GROUP BY phase, state`` rows."""
        counts: dict[int, Counter[str]] = {}
        for p, st, n in rows:
            counts.setdefault(int(p), Counter())[st] += int(n)
        return cls(CampaignState(state), phase, counts)

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    @property
    def in_progress(self) -> int:
        """Deployments notified and not ended yet, over every phase."""
        return sum(c.get(st.value, 0) for c in self.counts.values() for st in IN_PROGRESS)


@dataclass
class PolicyState:
    """What the policy remembers between decisions (per campaign, in the engine's memory).

    Losing it (a restart) is safe: seed the rate window with :meth:`seed`; acknowledgements are
    forgotten, so a resumed campaign still above a threshold pauses again rather than going on.
    """

    notified_at: list[tuple[float, int]] = field(default_factory=list)
    clock: float = -math.inf
    tokens: float | None = None
    refilled_at: float | None = None
    last_state: CampaignState | None = None
    paused_for: tuple[str, int] | None = None
    error_ack: dict[int, int] = field(default_factory=dict)
    success_override: set[int] = field(default_factory=set)

    def accept_review(self, reviewed: Mapping[str, object] | None) -> None:
        """Take in what an operator accepted when resuming a stopped campaign (:func:`review`)."""
        if not reviewed:
            return
        errors = reviewed.get("errors")
        if isinstance(errors, Mapping):
            for p, n in errors.items():
                self.error_ack[int(p)] = max(self.error_ack.get(int(p), -1), int(n))
        success = reviewed.get("success")
        if isinstance(success, list):
            self.success_override.update(int(p) for p in success)

    def observe(self, now: float) -> float:
        """The policy's clock never runs backwards: a wall clock stepped back reads as standing still."""
        self.clock = max(self.clock, now)
        return self.clock

    def seed(self, times: Iterable[float]) -> None:
        """Restore the rate window from the notification times of the last minute (after a restart)."""
        for t in times:
            self.notified_at.append((t, 1))
            self.clock = max(self.clock, t)

    def record_notified(self, n: int, now: float) -> None:
        """The engine notified ``n`` devices at ``now`` (call with the same ``now`` as ``decide``)."""
        if n <= 0:
            return
        now = self.observe(now)
        self.notified_at.append((now, n))
        if self.tokens is not None:
            self.tokens -= n

    def notified_since(self, since: float) -> int:
        """Devices notified at or after ``since``; drops older records."""
        self.notified_at = [(t, n) for t, n in self.notified_at if t >= since]
        return sum(n for _, n in self.notified_at)

    def allowance(self, rate: float, now: float) -> int:
        """Devices that may be notified at ``now`` under ``rate`` per minute.

        Hard rule: at most ``rate`` in any 60 s window. Pacing: a token bucket refilled at
        ``rate / 60`` per second holding ``PACE_BURST_S`` seconds' worth, so a large rate is
        spread over the minute instead of leaving in one burst.
        """
        in_window = self.notified_since(now - RATE_WINDOW_S - 1e-6)  # margin for float rounding
        left = math.floor(rate) - in_window
        per_s = rate / RATE_WINDOW_S
        cap = max(1.0, per_s * PACE_BURST_S)
        if self.tokens is None or self.refilled_at is None:
            self.tokens = cap
        else:
            self.tokens = min(cap, self.tokens + per_s * max(now - self.refilled_at, 0.0))
        self.refilled_at = now
        return max(0, min(left, math.floor(self.tokens + 1e-9)))


@dataclass(frozen=True)
class Decision:
    """What the engine should do now.

    ``notify`` counts pending deployments of phases up to and including ``view.phase``;
    ``advance_to`` is the new current phase; ``transition`` a campaign state change with its
    reason; ``note`` says, for people watching, why nothing (more) happens.
    """

    notify: int = 0
    advance_to: int | None = None
    transition: tuple[CampaignState, str] | None = None
    note: str | None = None


def _get(c: Mapping[str, int], *states: DeviceState) -> int:
    return sum(c.get(s.value, 0) for s in states)


def _settled(c: Mapping[str, int]) -> bool:
    """No device of these counts is pending or in progress."""
    return all(DeviceState(s) in DEVICE_TERMINAL for s, n in c.items() if n)


def _reaches(part: int, whole: int, percent: float) -> bool:
    """``part`` is at least ``percent`` % of ``whole``, compared exactly (no float rounding)."""
    return Fraction(100 * part) >= Fraction(str(percent)) * whole


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "0.0%"


def decide(
    policy: Policy, view: CampaignView | Mapping[str, int], state: PolicyState, now: float
) -> Decision:
    """Decide what to do now. Mutates ``state`` (rate pacing, acknowledgements) only.

    A bare mapping of counts is still accepted (a running campaign seen as one phase).
    """
    if not isinstance(view, CampaignView):
        view = CampaignView(CampaignState.RUNNING, len(policy.phases) - 1, {len(policy.phases) - 1: view})
    now = state.observe(now)
    counts = _fold(policy, view)
    last = len(policy.phases) - 1
    cur = min(max(view.phase, 0), last)

    if state.last_state == CampaignState.PAUSED and view.state == CampaignState.RUNNING:
        _acknowledge(state, counts, cur)
    state.last_state = view.state

    if view.state == CampaignState.SCHEDULED:
        if policy.start_at is None or now >= policy.start_at:
            return _to(state, CampaignState.RUNNING, "scheduled start reached", cur)
        at = datetime.fromtimestamp(policy.start_at, UTC).isoformat()
        return Decision(note=f"scheduled to start at {at}")
    if view.state not in (CampaignState.RUNNING, CampaignState.PAUSED):
        return Decision()

    for p in range(cur + 1):
        reason = _error_crossed(policy, p, counts.get(p, Counter()), state)
        if reason is None:
            continue
        if view.state == CampaignState.PAUSED and policy.on_error == "pause":
            return Decision(note=f"paused: {reason}")
        target = CampaignState.STOPPED if policy.on_error == "stop" else CampaignState.PAUSED
        return _to(state, target, reason, p, kind="error")

    settled = all(
        _get(c, DeviceState.PENDING) == 0
        and all(DeviceState(s) in DEVICE_TERMINAL for s, n in c.items() if n)
        for c in counts.values()
    )
    if cur == last and settled and not policy.dynamic:
        return _to(state, CampaignState.COMPLETED, _summary(policy, view.total, counts, cur), cur)
    if view.state == CampaignState.PAUSED:
        return Decision(note="paused")

    advance_to: int | None = None
    c = counts.get(cur, Counter())
    if cur < last and _get(c, DeviceState.PENDING) == 0:
        ph = policy.phases[cur]
        size = sum(c.values())
        ok = _get(c, DeviceState.SUCCEEDED, *NOT_FOR_ME)
        if _reaches(ok, size, ph.success_threshold) or cur in state.success_override:
            if ph.advance == "approval":
                reason = (
                    f"{policy.label(cur)} done ({_ended_well(c, size)}); waiting for approval: "
                    f"resume to start {policy.label(cur + 1)}"
                )
                return Decision(
                    advance_to=cur + 1,
                    transition=_mark(state, CampaignState.PAUSED, reason, cur, "approval"),
                )
            advance_to = cur + 1
        elif _settled(c):
            reason = (
                f"success threshold of {policy.label(cur)} not reached: {_ended_well(c, size)} "
                f"({_pct(ok, size)} < {ph.success_threshold:g}%)"
            )
            target = CampaignState.STOPPED if policy.on_error == "stop" else CampaignState.PAUSED
            return _to(state, target, reason, cur, kind="success")

    pending = sum(_get(counts.get(p, Counter()), DeviceState.PENDING) for p in range(cur + 1))
    notify, note = _budget(policy, pending, counts, state, now)
    if cur == last and settled:
        note = "all devices done; waiting for devices that join (dynamic campaign)"
    return Decision(notify=notify, advance_to=advance_to, note=note)


def finished(policy: Policy, counts: Mapping[str, int]) -> tuple[CampaignState, str | None] | None:
    """Earlier single-phase API: the end state for flat ``counts``, or None while it goes on."""
    d = decide(policy, counts, PolicyState(), 0.0)
    if d.transition is not None and d.transition[0] in (CampaignState.STOPPED, CampaignState.COMPLETED):
        return d.transition
    return None


def _fold(policy: Policy, view: CampaignView) -> dict[int, Counter[str]]:
    """Counts per phase, phases the policy does not know folded into its last one."""
    last = len(policy.phases) - 1
    out: dict[int, Counter[str]] = {}
    for p, c in view.counts.items():
        out.setdefault(min(max(p, 0), last), Counter()).update({k: v for k, v in c.items() if v})
    return out


def _error_crossed(policy: Policy, p: int, c: Mapping[str, int], state: PolicyState) -> str | None:
    ph = policy.phases[p]
    if ph.error_threshold is None:
        return None
    failed = _get(c, *AGAINST_ERRORS)
    notified = sum(c.values()) - _get(c, DeviceState.PENDING)
    if failed < ph.error_min_devices or failed <= state.error_ack.get(p, -1):
        return None
    if not _reaches(failed, notified, ph.error_threshold):
        return None
    reverted = _get(c, DeviceState.REVERTED)
    what = "failed"
    if reverted:
        what = f"failed or reverted ({failed - reverted} failed, {reverted} reverted)"
    return (
        f"error threshold of {policy.label(p)} crossed: {failed} of {notified} devices {what} "
        f"({_pct(failed, notified)} >= {ph.error_threshold:g}%)"
    )


def _ended_well(c: Mapping[str, int], size: int) -> str:
    """What counts toward a success threshold, saying apart what succeeded and what was not for
    the device: nine skipped devices are never "9 devices succeeded"."""
    succeeded = _get(c, DeviceState.SUCCEEDED)
    others = [(st, c.get(st.value, 0)) for st in sorted(NOT_FOR_ME) if c.get(st.value, 0)]
    if not others:
        return f"{succeeded} of {size} devices succeeded"
    ok = succeeded + sum(n for _st, n in others)
    apart = ", ".join([f"{succeeded} succeeded"] + [f"{n} {st.value}" for st, n in others])
    return f"{ok} of {size} devices succeeded or were not for them ({apart})"


def _budget(
    policy: Policy, pending: int, counts: Mapping[int, Mapping[str, int]], state: PolicyState, now: float
) -> tuple[int, str | None]:
    if pending <= 0:
        return 0, None
    if policy.window is not None and policy.window.mode == "notify" and not policy.window.contains(now):
        opens, _ = policy.window.span(now)
        at = datetime.fromtimestamp(opens, policy.window.zone).isoformat(timespec="minutes")
        return 0, f"outside the maintenance window {policy.window.describe()}; opens {at}"
    budget = min(pending, policy.batch_max)
    successes = sum(_get(c, DeviceState.SUCCEEDED) for c in counts.values())
    rate = policy.effective_rate(successes)
    if rate is not None:
        allowed = state.allowance(rate, now)
        if allowed < budget:
            return allowed, f"rate limit: {rate:g} devices/minute"
    return budget, None


def _summary(policy: Policy, total: int, counts: Mapping[int, Mapping[str, int]], cur: int) -> str:
    all_c: Counter[str] = Counter()
    for c in counts.values():
        all_c.update(c)
    parts = [f"{all_c[s.value]} {s.value}" for s in DeviceState if all_c.get(s.value)]
    text = f"all {total} devices done: {', '.join(parts) or 'none'}"
    c = counts.get(cur, Counter())
    size, ok = sum(c.values()), _get(c, DeviceState.SUCCEEDED, *NOT_FOR_ME)
    thr = policy.phases[cur].success_threshold
    if size and not _reaches(ok, size, thr):
        text += f"; below the success threshold of {policy.label(cur)} ({_pct(ok, size)} < {thr:g}%)"
    return text


def _mark(
    state: PolicyState, target: CampaignState, reason: str, phase: int, kind: str
) -> tuple[CampaignState, str]:
    state.last_state = target
    state.paused_for = (kind, phase) if target == CampaignState.PAUSED else None
    return target, reason


def _to(state: PolicyState, target: CampaignState, reason: str, phase: int, kind: str = "") -> Decision:
    return Decision(transition=_mark(state, target, reason, phase, kind))


def _acknowledge(state: PolicyState, counts: Mapping[int, Mapping[str, int]], cur: int) -> None:
    """An operator resumed: failures seen so far are accepted; a shortfall that paused is waived."""
    for p in range(cur + 1):
        state.error_ack[p] = _get(counts.get(p, {}), *AGAINST_ERRORS)
    if state.paused_for is not None and state.paused_for[0] == "success":
        state.success_override.add(state.paused_for[1])
    state.paused_for = None


def review(rows: Iterable[tuple[int, str, int]], phase: int) -> dict[str, object]:
    """What resuming a stopped campaign accepts, as stored with it (JSON) so that every replica
    honours it: the failures of each phase so far, and the shortfall of the current phase's success
    threshold (as a resume after a pause does). Later failures count against the thresholds again."""
    errors: Counter[int] = Counter()
    for p, st, n in rows:
        if st in (DeviceState.FAILED.value, DeviceState.TIMED_OUT.value):
            errors[int(p)] += int(n)
    return {"errors": {str(p): n for p, n in sorted(errors.items())}, "success": [phase]}


# -- one engine step ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One campaign as the engine read it, in one read transaction."""

    view: CampaignView
    silent: tuple[Silent, ...] = ()
    """In-progress deployments past their state's timeout cutoff (read when expiry is due)."""
    recent: tuple[float, ...] | None = None
    """Notification times of the last rate window, on the engine's first look (seeds the pacing)."""


@dataclass(frozen=True)
class Plan:
    """What one engine step does to one campaign, written in one transaction."""

    decision: Decision
    max_phase: int
    """Pending deployments of phases up to this one may be notified."""
    expired: tuple[Expired, ...] = ()
    join: bool = False
    """Dynamic campaigns: take in devices registered since (their phase is the policy's last)."""
    invite: bool = False
    """Consent campaigns: ask devices that joined late."""
    close_invitations: bool = False
    """Consent campaigns: the deadline passed; unanswered invitations end as ``no_answer``."""
    note: str | None = None
    note_changed: bool = False

    @property
    def idle(self) -> bool:
        """Nothing to write: most steps of a running campaign (checked without the write lock)."""
        d = self.decision
        changes = d.notify or d.advance_to is not None or d.transition is not None or self.expired
        return not (changes or self.join or self.invite or self.close_invitations or self.note_changed)


def plan(
    policy: Policy,
    snapshot: Snapshot,
    memory: PolicyState,
    now: float,
    *,
    join: bool = False,
    consent_due: bool = False,
    deadline: float | None = None,
    note_before: str | None = None,
) -> Plan:
    """The step for a campaign from its snapshot: the decision, the silent deployments that expire
    (retried later or timed out), and the housekeeping that is due. Mutates ``memory`` only."""
    if snapshot.recent is not None:
        memory.seed(snapshot.recent)
    decision = decide(policy, snapshot.view, memory, now)
    note = None if decision.transition is not None else decision.note
    return Plan(
        decision=decision,
        max_phase=snapshot.view.phase,
        expired=tuple(expire(snapshot.silent, policy, now)),
        join=join,
        invite=consent_due,
        close_invitations=consent_due and deadline is not None and now >= deadline,
        note=note,
        note_changed=note != note_before,
    )
