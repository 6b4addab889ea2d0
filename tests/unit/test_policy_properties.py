"""Property tests of the rollout policy: rate, phase confinement, success and error thresholds."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fwcm.rollout.planner import CampaignView, PolicyState, decide
from fwcm.rollout.policy import Policy
from fwcm.rollout.states import CampaignState, DeviceState

STATES = [s.value for s in DeviceState]
TERMINAL_FAIL = (DeviceState.FAILED.value, DeviceState.TIMED_OUT.value, DeviceState.REVERTED.value)
"""Ends that count against an error threshold (a revert after a failed trial boot too)."""


GAPS = st.one_of(st.sampled_from([0.0, 0.2, 1.0, 59.999, 60.0, 60.001]), st.floats(0, 90, allow_nan=False))


def percent(x: float) -> str:
    return f"{x:g}%"


@st.composite
def policies(draw: st.DrawFn, *, rate: bool | None = None) -> Policy:
    """Random but valid policies, built through the public dictionary form."""
    d: dict[str, Any] = {}
    with_rate = draw(st.booleans()) if rate is None else rate
    if with_rate:
        d["rate_per_minute"] = draw(st.integers(1, 5000))
    if draw(st.booleans()):
        d["ramp"] = {
            "base": draw(st.integers(1, 500)),
            "factor": draw(st.sampled_from([1.0, 1.5, 2.0, 10.0])),
            "every_successes": draw(st.integers(1, 50)),
        }
    d["batch_max"] = draw(st.integers(1, 3000))
    d["on_error"] = draw(st.sampled_from(["stop", "pause"]))
    n = draw(st.integers(1, 5))
    phases = []
    for i in range(n):
        ph: dict[str, Any] = {
            "success_threshold": percent(draw(st.sampled_from([0, 50, 80, 95, 99.5, 100]))),
            "error_min_devices": draw(st.integers(1, 5)),
        }
        if draw(st.booleans()):
            ph["error_threshold"] = percent(draw(st.sampled_from([0, 1, 5, 10, 33.3, 100])))
        if i < n - 1:
            if draw(st.booleans()):
                ph["size"] = draw(st.one_of(st.integers(0, 50), st.integers(1, 100).map(percent)))
            else:
                ph["until"] = draw(st.integers(1, 100).map(percent))
        phases.append(ph)
    d["phases"] = phases
    return Policy.from_dict(d)


@st.composite
def views(draw: st.DrawFn, policy: Policy, state: CampaignState = CampaignState.RUNNING) -> CampaignView:
    n = len(policy.phases)
    counts = {
        p: Counter({s: draw(st.integers(0, 30)) for s in draw(st.sets(st.sampled_from(STATES), max_size=6))})
        for p in range(n)
    }
    return CampaignView(state, draw(st.integers(0, n - 1)), counts)


def one_phase(policy: Policy, **counts: int) -> CampaignView:
    """A running campaign on its last phase, every device in it."""
    last = len(policy.phases) - 1
    return CampaignView(CampaignState.RUNNING, last, {last: Counter(counts)})


def pending_started(view: CampaignView) -> int:
    return sum(c.get("pending", 0) for p, c in view.counts.items() if p <= view.phase)


@settings(max_examples=300, deadline=None)
@given(
    policy=policies(rate=True),
    ticks=st.lists(
        st.tuples(
            GAPS,  # seconds since the previous tick (0: same instant)
            st.integers(0, 5000),  # devices pending
            st.floats(0, 1),  # share of the decision the engine manages to carry out
            st.integers(0, 40),  # new successes
        ),
        min_size=1,
        max_size=60,
    ),
    start=st.floats(0, 2e9),
)
def test_never_above_the_rate_in_any_60s_window(
    policy: Policy, ticks: list[tuple[float, int, float, int]], start: float
) -> None:
    assert policy.rate_per_minute is not None
    state = PolicyState()
    now, successes = start, 0
    sent: list[tuple[float, int]] = []
    for gap, pending, share, new_ok in ticks:
        now += gap
        successes += new_ok
        d = decide(policy, one_phase(policy, pending=pending, succeeded=successes), state, now)
        assert 0 <= d.notify <= min(pending, policy.batch_max)
        taken = math.floor(d.notify * share)
        state.record_notified(taken, now)
        if taken:
            sent.append((now, taken))
            rate = policy.effective_rate(successes)
            assert rate is not None and rate <= policy.rate_per_minute
            # what left in the minute up to now stays within the (ramped) rate of this moment
            assert sum(n for t, n in sent if now - 60 <= t <= now) <= math.floor(rate)
    for t0, _ in sent:  # every closed 60 s window, measured from each notification
        assert sum(n for t, n in sent if t0 <= t <= t0 + 60) <= policy.rate_per_minute


@settings(max_examples=200, deadline=None)
@given(
    policy=policies(rate=True),
    interval=st.sampled_from([0.1, 0.2, 0.5, 1.0, 3.0, 7.5]),
    ticks=st.integers(60, 1500),
)
def test_steady_ticks_stay_within_the_rate(policy: Policy, interval: float, ticks: int) -> None:
    """An engine ticking steadily and taking everything offered: the full bucket plus refill."""
    assert policy.rate_per_minute is not None
    state = PolicyState()
    sent: list[tuple[float, int]] = []
    for i in range(ticks):
        now = i * interval
        d = decide(policy, one_phase(policy, pending=10**6), state, now)
        state.record_notified(d.notify, now)
        if d.notify:
            sent.append((now, d.notify))
    for t0, _ in sent:
        assert sum(n for t, n in sent if t0 <= t <= t0 + 60) <= policy.rate_per_minute


@settings(max_examples=200, deadline=None)
@given(
    policy=policies(rate=True),
    times=st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=40),
)
def test_clock_running_backwards_never_loosens_the_rate(policy: Policy, times: list[float]) -> None:
    """The policy reads a clock stepped back as standing still: windows hold on the clock it saw."""
    assert policy.rate_per_minute is not None
    state = PolicyState()
    seen, sent = -math.inf, []
    for t in times:
        d = decide(policy, one_phase(policy, pending=10_000), state, t)
        state.record_notified(d.notify, t)
        seen = max(seen, t)
        if d.notify:
            sent.append((seen, d.notify))
    for t0, _ in sent:
        assert sum(n for t, n in sent if t0 <= t <= t0 + 60) <= policy.rate_per_minute


@settings(max_examples=300, deadline=None)
@given(policy=policies(), successes=st.lists(st.integers(0, 10**6), min_size=2, max_size=10))
def test_ramp_never_exceeds_the_configured_rate_and_only_grows(policy: Policy, successes: list[int]) -> None:
    rates = [policy.effective_rate(s) for s in sorted(successes)]
    for r in rates:
        if policy.rate_per_minute is not None:
            assert r is not None and r <= policy.rate_per_minute
        if policy.ramp is not None and r is not None:
            assert r >= min(policy.ramp.base, policy.rate_per_minute or math.inf)
    finite = [math.inf if r is None else r for r in rates]
    assert finite == sorted(finite)


@settings(max_examples=500, deadline=None)
@given(data=st.data(), policy=policies())
def test_notifies_only_pending_devices_of_started_phases(data: st.DataObject, policy: Policy) -> None:
    view = data.draw(views(policy))
    d = decide(policy, view, PolicyState(), 1e9)
    assert 0 <= d.notify <= pending_started(view)
    assert d.notify <= policy.batch_max
    if d.transition is not None:
        assert d.notify == 0
    if d.advance_to is not None:
        assert d.advance_to == view.phase + 1 < len(policy.phases)


@settings(max_examples=500, deadline=None)
@given(data=st.data(), policy=policies())
def test_never_advances_below_the_success_threshold(data: st.DataObject, policy: Policy) -> None:
    view = data.draw(views(policy))
    d = decide(policy, view, PolicyState(), 1e9)
    if d.advance_to is None:
        return
    c = view.counts[view.phase]
    size = sum(c.values())
    ok = sum(c.get(s, 0) for s in ("succeeded", "skipped", "declined", "no_answer"))  # no failure ends
    assert c.get("pending", 0) == 0
    assert 100 * ok >= policy.phases[view.phase].success_threshold * size


def crossed(policy: Policy, view: CampaignView) -> int | None:
    """First phase (up to the current one) whose error threshold is crossed, computed independently."""
    for p in range(view.phase + 1):
        ph = policy.phases[p]
        c = view.counts.get(p, Counter())
        failed = sum(c.get(s, 0) for s in TERMINAL_FAIL)
        notified = sum(c.values()) - c.get("pending", 0)
        if ph.error_threshold is None or failed < ph.error_min_devices or notified == 0:
            continue
        if Fraction(failed * 100, notified) >= Fraction(str(ph.error_threshold)):
            return p
    return None


@settings(max_examples=500, deadline=None)
@given(
    data=st.data(),
    policy=policies(),
    campaign=st.sampled_from([CampaignState.RUNNING, CampaignState.PAUSED]),
)
def test_always_stops_once_an_error_threshold_is_crossed(
    data: st.DataObject, policy: Policy, campaign: CampaignState
) -> None:
    view = data.draw(views(policy, campaign))
    d = decide(policy, view, PolicyState(), 1e9)
    p = crossed(policy, view)
    if p is None:
        assert d.transition is None or "error threshold" not in d.transition[1]
        return
    assert d.notify == 0
    if policy.on_error == "stop":
        assert d.transition is not None and d.transition[0] == CampaignState.STOPPED
        assert d.transition[1].startswith(f"error threshold of phase {p + 1}")
    elif campaign == CampaignState.RUNNING:
        assert d.transition is not None and d.transition[0] == CampaignState.PAUSED
        assert d.transition[1].startswith(f"error threshold of phase {p + 1}")
    else:  # already paused: stays paused
        assert d.transition is None


@settings(max_examples=300, deadline=None)
@given(policy=policies(), total=st.integers(0, 100_000))
def test_phase_sizes_partition_the_subset(policy: Policy, total: int) -> None:
    sizes = policy.phase_sizes(total)
    assert len(sizes) == len(policy.phases)
    assert all(n >= 0 for n in sizes) and sum(sizes) == total
    assert policy.phase_bounds(total)[-1] == total
    first = policy.phases[0]
    if total and len(sizes) > 1 and first.size is not None and first.size.percent:
        assert sizes[0] >= 1  # a percentage rounds up: a canary is never empty


@settings(max_examples=300, deadline=None)
@given(policy=policies())
def test_stored_form_round_trips(policy: Policy) -> None:
    assert Policy.from_dict(policy.to_dict()) == policy


@settings(max_examples=200, deadline=None)
@given(data=st.data(), policy=policies())
def test_dynamic_campaigns_never_complete_by_themselves(data: st.DataObject, policy: Policy) -> None:
    dynamic = Policy.from_dict({**policy.to_dict(), "dynamic": True})
    view = data.draw(views(dynamic))
    d = decide(dynamic, view, PolicyState(), 1e9)
    assert d.transition is None or d.transition[0] != CampaignState.COMPLETED
