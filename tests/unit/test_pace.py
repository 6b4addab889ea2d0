"""Pace and ETA: a sliding window of completions, bounded by rate, windows and approvals."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwcm.rollout.pace import PACE_WINDOW_S, Completion, Progress, estimate, latency, open_time, pace
from fwcm.rollout.policy import Policy

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC).timestamp()


def done(*ages: float, took: float = 20.0) -> list[Completion]:
    return [Completion(done_at=NOW - a, notified_at=NOW - a - took) for a in ages]


def test_pace_is_a_sliding_window_not_an_average_since_the_start() -> None:
    early = done(*(900 + i for i in range(100)))  # a burst a quarter of an hour ago
    recent = done(10, 20, 30, 40, 50, 60, 70, 80, 90, 100, took=5.0)
    assert pace(early, NOW) is None
    per_minute = pace(early + recent, NOW)
    assert per_minute == pytest.approx(10 * 60 / 105)  # first of them notified 105 s ago


def test_a_young_campaign_is_measured_from_its_first_notice() -> None:
    # 2 devices finished within the first 30 s: 4 per minute, not 2 per minute of a whole window
    assert pace(done(0, 5, took=25.0), NOW) == pytest.approx(2 * 60 / 30)
    assert pace(done(0, took=1.0), NOW) == pytest.approx(6.0)  # never over less than 10 s


def test_eta_follows_the_rate_limit_not_the_early_pace() -> None:
    policy = Policy.from_dict({"rate_per_minute": 10})
    progress = Progress("running", 0, pending={0: 48}, in_flight=2, completions=done(0, 3))
    e = estimate(policy, progress, NOW)
    assert e.eta_s == pytest.approx(48 * 6 + 20)  # 48 notices at 10/min, then one install
    assert e.scope is None and e.why is None


def test_eta_uses_the_pace_without_a_rate_limit() -> None:
    progress = Progress("running", 0, pending={0: 30}, in_flight=0, completions=done(10, 20, 30, took=30.0))
    e = estimate(Policy(), progress, NOW)
    per_minute = 3 * 60 / 60
    assert e.per_minute == pytest.approx(per_minute)
    assert e.eta_s == pytest.approx(30 * 60 / per_minute + 30)


def test_no_estimate_before_anything_finished_without_a_rate() -> None:
    e = estimate(Policy(), Progress("running", 0, pending={0: 5}, in_flight=5), NOW)
    assert e.eta_s is None and e.why == "measuring the pace" and e.per_minute is None


def test_an_approval_gate_ends_the_estimate() -> None:
    policy = Policy.from_dict(
        {"rate_per_minute": 60, "phases": [{"name": "canary", "size": 5, "advance": "approval"}, {}]}
    )
    running = Progress("running", 0, pending={0: 3, 1: 95}, in_flight=2, completions=done(1, took=10.0))
    e = estimate(policy, running, NOW)
    assert e.eta_s == pytest.approx(3 + 10) and e.scope == "end of phase 1 (canary)"
    assert e.why == "then waiting for approval of phase 2"
    paused = Progress("paused", 1, pending={1: 95}, in_flight=0, completions=done(1))
    e = estimate(policy, paused, NOW)
    assert e.eta_s is None and e.why == "waiting for approval of phase 2"
    assert estimate(policy, Progress("paused", 0, pending={0: 3}, in_flight=0), NOW).why == "paused"


def test_outside_the_window_the_eta_waits_for_it_to_open() -> None:
    policy = Policy.from_dict({"rate_per_minute": 60, "window": {"start": "14:00", "end": "15:00"}})
    progress = Progress("running", 0, pending={0: 120}, in_flight=0, completions=done(4000))
    e = estimate(policy, progress, NOW)
    assert e.notes == ("outside the window until 14:00 UTC",)
    assert e.eta_s == pytest.approx(2 * 3600 + 120 + 20)  # then one install
    # without a rate there is nothing to pace the wait by: say why
    e = estimate(Policy.from_dict({"window": {"start": "14:00", "end": "15:00"}}), progress, NOW)
    assert e.eta_s is None and e.why == "outside the window until 14:00 UTC"


def test_work_longer_than_a_window_continues_the_next_day() -> None:
    policy = Policy.from_dict({"window": {"start": "12:00", "end": "13:00"}})
    assert policy.window is not None
    assert open_time(policy.window, NOW, 5400) == NOW + 86400 + 1800
    assert open_time(None, NOW, 5) == NOW + 5


def test_states_without_an_eta() -> None:
    policy = Policy()
    assert estimate(policy, Progress("completed", 0, {}, 0, completions=done(1)), NOW).eta_s is None
    assert (
        estimate(policy, Progress("scheduled", 0, {0: 4}, 0), NOW).why == "scheduled: starts at its start_at"
    )
    consent = Progress("running", 0, {0: 4}, 0, consent_stage="asking")
    assert estimate(policy, consent, NOW).why == "waiting for consent (asking)"
    assert estimate(policy, Progress("running", 0, {}, 0), NOW).eta_s == 0.0


@settings(max_examples=200, deadline=None)
@given(
    ages=st.lists(st.floats(0, 2 * PACE_WINDOW_S), max_size=50),
    took=st.floats(0, 100),
    rate=st.integers(1, 1000),
    pending=st.integers(0, 10_000),
)
def test_eta_is_never_below_the_time_the_rate_needs(
    ages: list[float], took: float, rate: int, pending: int
) -> None:
    completions = done(*ages, took=took)
    policy = Policy.from_dict({"rate_per_minute": rate})
    e = estimate(policy, Progress("running", 0, {0: pending}, in_flight=1, completions=completions), NOW)
    if pending:
        assert e.eta_s is not None and e.eta_s >= pending * 60 / rate - 0.1
        assert e.eta_s <= pending * 60 / rate + (latency(completions) or 0) + 0.1
    p = pace(completions, NOW)
    assert (p is None) == (not [a for a in ages if a <= PACE_WINDOW_S])
