"""Rollout policy rules, one at a time: phases, thresholds, approval, resume, windows, retries."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from fwcm.rollout.planner import CampaignView, PolicyState, decide, finished
from fwcm.rollout.policy import Policy
from fwcm.rollout.states import CampaignState
from fwcm.rollout.values import PolicyError

RUNNING, PAUSED = CampaignState.RUNNING, CampaignState.PAUSED


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def staged(**rollout: Any) -> Policy:
    return Policy.from_dict(
        {
            "success_threshold": "95%",
            "error_threshold": "10%",
            "error_min_devices": 2,
            **rollout,
            "phases": [{"name": "canary", "until": "5%"}, {"until": "50%"}, {}],
        }
    )


def view(phase: int, state: CampaignState = RUNNING, **per_phase: dict[str, int]) -> CampaignView:
    return CampaignView(state, phase, {int(k[1:]): Counter(v) for k, v in per_phase.items()})


def test_phase_sizes_until_and_size() -> None:
    assert staged().phase_sizes(300) == [15, 135, 150]
    assert staged().phase_bounds(300) == [15, 150, 300]
    assert staged().phase_sizes(3) == [1, 1, 1]
    assert staged().phase_sizes(0) == [0, 0, 0]
    p = Policy.from_dict({"phases": [{"size": 10}, {"size": "50%"}, {}]})
    assert p.phase_sizes(100) == [10, 50, 40]
    assert p.phase_sizes(12) == [10, 2, 0]  # later phases shrink when the subset runs out


def test_notifies_pending_of_current_and_earlier_phases_only() -> None:
    p = staged()
    d = decide(p, view(0, p0={"pending": 15}, p1={"pending": 135}), PolicyState(), 0)
    assert d.notify == 15 and d.advance_to is None and d.transition is None
    # a retried device of phase 1 waits in pending while phase 2 runs
    d = decide(
        p, view(1, p0={"succeeded": 14, "pending": 1}, p1={"pending": 5, "notified": 130}), PolicyState(), 0
    )
    assert d.notify == 6


def test_advances_at_the_success_threshold_once_nothing_is_pending() -> None:
    p = staged()
    below = view(0, p0={"succeeded": 14, "downloading": 6}, p1={"pending": 100})  # 70 % < 95 %
    assert decide(p, below, PolicyState(), 0).advance_to is None
    at = view(0, p0={"succeeded": 18, "skipped": 1, "installing": 1}, p1={"pending": 100})  # 95 %
    d = decide(p, at, PolicyState(), 0)
    assert d.advance_to == 1 and d.transition is None
    pending_left = view(0, p0={"succeeded": 19, "pending": 1}, p1={"pending": 100})
    assert decide(p, pending_left, PolicyState(), 0).advance_to is None


def test_error_threshold_stops_with_a_reason_naming_it() -> None:
    p = staged()
    v = view(0, p0={"failed": 2, "timed_out": 1, "succeeded": 12, "pending": 5})
    d = decide(p, v, PolicyState(), 0)
    assert d.notify == 0
    assert d.transition == (
        CampaignState.STOPPED,
        "error threshold of phase 1 (canary) crossed: 3 of 15 devices failed (20.0% >= 10%)",
    )


def test_error_threshold_is_inclusive_and_needs_the_minimum_devices() -> None:
    p = staged()
    exactly = view(0, p0={"failed": 2, "succeeded": 18})  # 10.0 % >= 10 %
    assert decide(p, exactly, PolicyState(), 0).transition is not None
    one = view(0, p0={"failed": 1, "notified": 1})  # 100 %, but fewer than 2 devices
    assert decide(p, one, PolicyState(), 0).transition is None


def test_error_in_an_earlier_phase_still_counts() -> None:
    p = staged()
    v = view(1, p0={"failed": 5, "succeeded": 10}, p1={"notified": 50})
    d = decide(p, v, PolicyState(), 0)
    assert d.transition is not None and d.transition[1].startswith("error threshold of phase 1 (canary)")


def test_on_error_pause_then_resume_acknowledges_the_failures_seen() -> None:
    p = staged(on_error="pause")
    st = PolicyState()
    v = view(0, p0={"failed": 2, "succeeded": 8, "pending": 10})
    d = decide(p, v, st, 0)
    assert d.transition is not None and d.transition[0] == PAUSED
    assert decide(p, view(0, PAUSED, p0=v.counts[0]), st, 1).transition is None  # stays paused
    # the operator resumes: the same failures no longer pause, a new one does
    assert decide(p, view(0, RUNNING, p0=v.counts[0]), st, 2) == decide(
        p, view(0, RUNNING, p0={"succeeded": 8, "pending": 10, "failed": 0}), PolicyState(), 2
    )
    d = decide(p, view(0, RUNNING, p0={"failed": 3, "succeeded": 8, "pending": 9}), st, 3)
    assert d.transition is not None and d.transition[0] == PAUSED


def test_settled_phase_below_success_threshold_stops_or_pauses() -> None:
    v = view(0, p0={"succeeded": 18, "failed": 1, "cancelled": 1}, p1={"pending": 10})  # 90 % < 95 %
    d = decide(staged(), v, PolicyState(), 0)
    assert d.transition == (
        CampaignState.STOPPED,
        "success threshold of phase 1 (canary) not reached: 18 of 20 devices succeeded (90.0% < 95%)",
    )
    p, st = staged(on_error="pause"), PolicyState()
    d = decide(p, v, st, 0)
    assert d.transition is not None and d.transition[0] == PAUSED
    d = decide(p, view(0, RUNNING, p0=v.counts[0], p1={"pending": 10}), st, 1)  # resumed: waived
    assert d.advance_to == 1 and d.transition is None


def test_approval_pauses_after_the_phase_and_resume_continues() -> None:
    p = Policy.from_dict({"phases": [{"size": 2, "advance": "approval"}, {}]})
    st = PolicyState()
    d = decide(p, view(0, p0={"succeeded": 2}, p1={"pending": 8}), st, 0)
    assert d.advance_to == 1 and d.notify == 0
    assert d.transition == (
        PAUSED,
        "phase 1 done (2 of 2 devices succeeded); waiting for approval: resume to start phase 2",
    )
    assert decide(p, view(1, PAUSED, p0={"succeeded": 2}, p1={"pending": 8}), st, 1).notify == 0
    d = decide(p, view(1, RUNNING, p0={"succeeded": 2}, p1={"pending": 8}), st, 2)
    assert d.notify == 8 and d.transition is None


def test_completes_when_the_last_phase_is_done() -> None:
    p = staged()
    v = view(2, p0={"succeeded": 15}, p1={"succeeded": 135}, p2={"succeeded": 140, "failed": 5, "skipped": 5})
    d = decide(p, v, PolicyState(), 0)
    assert d.transition == (
        CampaignState.COMPLETED,
        "all 300 devices done: 290 succeeded, 5 failed, 5 skipped",
    )
    low = view(2, p0={"succeeded": 1}, p1={"succeeded": 1}, p2={"succeeded": 8, "cancelled": 2})
    d = decide(p, low, PolicyState(), 0)
    assert d.transition is not None and d.transition[0] == CampaignState.COMPLETED
    assert "below the success threshold of phase 3 (80.0% < 95%)" in d.transition[1]
    assert decide(p, view(2, p2={"succeeded": 9, "installing": 1}), PolicyState(), 0).transition is None


def test_dynamic_campaign_stays_open_for_devices_that_join() -> None:
    p = Policy.from_dict({**staged().to_dict(), "dynamic": True})
    assert p.late_phase == 2
    d = decide(p, view(2, p2={"succeeded": 10}), PolicyState(), 0)
    assert d.transition is None and d.note is not None and "dynamic" in d.note
    assert decide(p, view(2, p2={"succeeded": 10, "pending": 3}), PolicyState(), 0).notify == 3


def test_rate_limit_paces_within_the_minute() -> None:
    p = Policy.from_dict({"rate_per_minute": 60})  # one per second, two at once at most
    st = PolicyState()
    sent = []
    for i in range(120):
        d = decide(p, view(0, p0={"pending": 1000}), st, 1000.0 + i * 0.5)
        st.record_notified(d.notify, 1000.0 + i * 0.5)
        sent.append(d.notify)
    assert sent[0] == 2 and max(sent) == 2
    assert sum(sent) == 60  # 2 + one per second over 60 s, capped by the 60 s window
    assert d.note == "rate limit: 60 devices/minute"


def test_ramp_grows_with_successes_up_to_the_rate() -> None:
    p = Policy.from_dict({"rate_per_minute": 1000, "ramp": {"base": 60, "factor": 2, "every_successes": 50}})
    assert [p.effective_rate(s) for s in (0, 49, 50, 100, 150, 200, 10**9)] == [
        60,
        60,
        120,
        240,
        480,
        960,
        1000,
    ]
    uncapped = Policy.from_dict({"ramp": {"base": 1, "factor": 10, "every_successes": 1}})
    assert uncapped.effective_rate(5) == 100_000 and uncapped.effective_rate(10**6) is None
    assert Policy().effective_rate(10) is None


def test_no_rate_means_no_cap_beyond_the_batch() -> None:
    p = Policy.from_dict({"batch_max": 5000})
    assert decide(p, view(0, p0={"pending": 4000}), PolicyState(), 0).notify == 4000


def test_scheduled_start() -> None:
    p = Policy.from_dict({"start_at": "2026-12-01T02:00:00Z"})
    start = ts("2026-12-01T02:00:00+00:00")
    assert p.initial_state(start - 1) == CampaignState.SCHEDULED
    assert p.initial_state(start) == RUNNING
    d = decide(p, view(0, CampaignState.SCHEDULED, p0={"pending": 5}), PolicyState(), start - 60)
    assert (
        d.transition is None and d.notify == 0 and d.note == "scheduled to start at 2026-12-01T02:00:00+00:00"
    )
    d = decide(p, view(0, CampaignState.SCHEDULED, p0={"pending": 5}), PolicyState(), start)
    assert d.transition == (RUNNING, "scheduled start reached")
    assert Policy().initial_state(0) == RUNNING


def test_window_in_a_time_zone_follows_daylight_saving() -> None:
    p = Policy.from_dict({"window": {"start": "01:00", "end": "05:00", "tz": "Europe/Berlin"}})
    # winter: Berlin is UTC+1
    assert not p.in_window(ts("2026-01-15T23:59:00+00:00"))
    assert p.in_window(ts("2026-01-16T00:00:00+00:00"))
    assert p.in_window(ts("2026-01-16T03:59:59+00:00"))
    assert not p.in_window(ts("2026-01-16T04:00:00+00:00"))
    # summer: UTC+2
    assert p.in_window(ts("2026-07-15T23:00:00+00:00"))
    assert not p.in_window(ts("2026-07-16T03:00:00+00:00"))
    assert p.window_span(ts("2026-07-16T12:00:00+00:00")) == (
        int(ts("2026-07-16T23:00:00+00:00")),
        int(ts("2026-07-17T03:00:00+00:00")),
    )


def test_window_crossing_midnight() -> None:
    p = Policy.from_dict({"window": {"start": "22:00", "end": "02:00", "tz": "UTC"}})
    inside = ["2026-03-01T22:00:00", "2026-03-01T23:30:00", "2026-03-02T00:00:00", "2026-03-02T01:59:59"]
    outside = ["2026-03-01T21:59:59", "2026-03-02T02:00:00", "2026-03-02T12:00:00"]
    assert all(p.in_window(ts(t + "+00:00")) for t in inside)
    assert not any(p.in_window(ts(t + "+00:00")) for t in outside)
    # inside a window that opened yesterday, the span is that window
    assert p.window_span(ts("2026-03-02T01:00:00+00:00")) == (
        int(ts("2026-03-01T22:00:00+00:00")),
        int(ts("2026-03-02T02:00:00+00:00")),
    )


def test_window_inside_the_skipped_hour_does_not_open_that_day() -> None:
    p = Policy.from_dict({"window": {"start": "02:00", "end": "03:00", "tz": "Europe/Berlin"}})
    # 2026-03-29: clocks go from 02:00 to 03:00 in Berlin
    assert not p.in_window(ts("2026-03-29T01:30:00+00:00"))
    assert p.window_span(ts("2026-03-29T00:30:00+00:00"))[0] == int(ts("2026-03-30T00:00:00+00:00"))
    assert p.in_window(ts("2026-03-30T00:30:00+00:00"))


def test_notify_mode_holds_notices_outside_the_window() -> None:
    p = Policy.from_dict({"window": {"start": "01:00", "end": "05:00", "tz": "UTC", "mode": "notify"}})
    d = decide(p, view(0, p0={"pending": 10}), PolicyState(), ts("2026-05-01T12:00:00+00:00"))
    assert d.notify == 0 and d.note == (
        "outside the maintenance window 01:00-05:00 UTC; opens 2026-05-02T01:00+00:00"
    )
    assert decide(p, view(0, p0={"pending": 10}), PolicyState(), ts("2026-05-02T01:00:00+00:00")).notify == 10


def test_install_mode_notifies_now_and_downloaded_devices_wait_for_the_window() -> None:
    p = Policy.from_dict(
        {
            "device_timeout": "10m",
            "window": {"start": "01:00", "end": "05:00", "tz": "UTC", "mode": "install"},
        }
    )
    noon = ts("2026-05-01T12:00:00+00:00")
    assert p.window_mode == "install"
    assert decide(p, view(0, p0={"pending": 10}), PolicyState(), noon).notify == 10
    assert p.window_span(noon) == (int(ts("2026-05-02T01:00:00+00:00")), int(ts("2026-05-02T05:00:00+00:00")))
    assert not p.is_timed_out("downloaded", noon - 3600, noon)  # waiting for the window
    assert p.is_timed_out("downloading", noon - 3600, noon)
    opens = ts("2026-05-02T01:00:00+00:00")
    assert not p.is_timed_out("downloaded", noon, opens + 599)  # its clock starts when the window opens
    assert p.is_timed_out("downloaded", noon, opens + 600)


def test_timeouts_apply_to_in_progress_states_only() -> None:
    p = Policy.from_dict({"device_timeout": "10m"})
    assert p.device_timeout_s == 600
    assert p.timeout_cutoff("notified", 10_000) == 9_400
    assert p.timeout_cutoff("pending", 10_000) is None
    assert p.timeout_cutoff("succeeded", 10_000) is None
    assert p.is_timed_out("installing", 9_400, 10_000) and not p.is_timed_out("installing", 9_401, 10_000)


def test_retries_back_off_exponentially_and_end() -> None:
    p = Policy.from_dict(
        {"retries": {"max_attempts": 4, "backoff": "30s", "factor": 2, "max_backoff": "90s"}}
    )
    assert [p.retry_delay(a) for a in (1, 2, 3, 4, 5)] == [30, 60, 90, None, None]
    assert p.is_transient(4) and p.is_transient(3) and not p.is_transient(8)
    assert p.retry_at(4, 1, 100.0) == 130.0
    assert p.retry_at(None, 2, 100.0) == 160.0  # a timeout is retried too
    assert p.retry_at(8, 1, 100.0) is None  # update failed: not transient
    assert p.retry_at(4, 4, 100.0) is None  # attempts used up
    assert Policy().retry_delay(1) is None  # no retries unless configured
    no_timeouts = Policy.from_dict({"retries": {"max_attempts": 3, "on_timeout": False, "results": [4]}})
    assert no_timeouts.retry_at(None, 1, 0) is None and not no_timeouts.is_transient(3)


def test_flat_counts_keep_the_first_engine_api_working() -> None:
    p = Policy.from_dict({"rate_per_minute": 100, "error_threshold_percent": 10})
    st = PolicyState()
    assert decide(p, Counter(pending=500), st, 0).notify == 3  # paced: 2 s worth of 100/min
    assert finished(p, Counter(succeeded=9, failed=1)) is not None
    assert finished(p, Counter(succeeded=10)) == (
        CampaignState.COMPLETED,
        "all 10 devices done: 10 succeeded",
    )
    assert finished(p, Counter(succeeded=9, notified=1)) is None


def test_terminal_and_draft_campaigns_get_no_decision() -> None:
    for s in (CampaignState.DRAFT, CampaignState.COMPLETED, CampaignState.CANCELLED, CampaignState.STOPPED):
        d = decide(staged(), view(0, s, p0={"pending": 5, "failed": 5}), PolicyState(), 0)
        assert d.notify == 0 and d.transition is None


def test_state_survives_a_restart_through_seed() -> None:
    p = Policy.from_dict({"rate_per_minute": 600})
    assert decide(p, view(0, p0={"pending": 100}), PolicyState(), 1000.0).notify == 20  # 2 s worth
    st = PolicyState()
    st.seed([990.0] * 595)  # notices of the minute before the restart
    assert decide(p, view(0, p0={"pending": 100}), st, 1000.0).notify == 5


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"rate": 5}, "policy: unknown key 'rate'"),
        ({"rate_per_minute": 0}, "rate_per_minute: must be at least 1"),
        ({"phases": []}, "phases: must be a non-empty list"),
        ({"phases": [{}, {}]}, "phases[0]: needs size"),
        ({"phases": [{"size": 1}, {"size": 2}]}, "phases[1]: the last phase takes every remaining device"),
        ({"retries": {"max_attempts": 0}}, "retries.max_attempts: must be at least 1"),
        ({"window": {"start": "1:00", "end": "25:00"}}, "window.end: must be a time of day"),
    ],
)
def test_stored_policy_errors_name_the_key(policy: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(policy)
    assert message in str(exc.value)


def test_stored_form_is_json_and_round_trips() -> None:
    import json

    p = staged(
        rate_per_minute=600,
        ramp={"base": 60, "factor": 2.0, "every_successes": 50},
        start_at="2026-12-01T03:00:00+01:00",
        window={"start": "22:00", "end": "02:00", "tz": "Europe/Berlin", "mode": "install"},
        retries={"max_attempts": 3, "backoff": "30s", "max_backoff": "1h"},
    )
    stored = json.loads(json.dumps(p.to_dict()))
    assert Policy.from_dict(stored) == p
    assert stored["start_at"] == "2026-12-01T02:00:00+00:00"
    assert datetime.fromtimestamp(p.start_at or 0, UTC).hour == 2
