"""What the console draws from counts: the stacked bar, phase gauges as the planner counts them,
the completions chart."""

from __future__ import annotations

import pytest

from fwcm.console.charts import bucket_size, completions_chart, phase_gauges, stacked_bar
from fwcm.rollout.policy import Policy
from fwcm.store.console import Bucket


def test_stacked_bar_orders_states_and_drops_empty_ones() -> None:
    bar = stacked_bar({"failed": 1, "pending": 2, "succeeded": 7, "installing": 0})
    assert [(s.state, s.count) for s in bar] == [("succeeded", 7), ("pending", 2), ("failed", 1)]
    assert sum(s.percent for s in bar) == pytest.approx(100.0)
    assert stacked_bar({"pending": 0}) == []


def test_phase_gauges_count_like_the_thresholds() -> None:
    policy = Policy.from_dict(
        {
            "phases": [
                {"name": "canary", "size": 4, "success_threshold": "75%", "error_threshold": "50%"},
                {"name": "rest", "error_threshold": "10%", "error_min_devices": 3},
            ]
        }
    )
    phases = {
        "0": {"succeeded": 2, "skipped": 1, "failed": 1},
        "1": {"pending": 6, "timed_out": 1, "notified": 3},
    }
    canary, rest = phase_gauges(policy, phases, current=1)
    assert canary.label == "phase 1 (canary)" and canary.size == 4 and not canary.current
    assert canary.success_pct == pytest.approx(75.0)  # a skipped device counts toward success
    assert canary.error_pct == pytest.approx(25.0) and canary.error_threshold == 50.0
    assert rest.current and rest.size == 10 and rest.error_min_devices == 3
    assert rest.error_pct == pytest.approx(25.0)  # of the 4 notified, not of the 10
    assert rest.success_threshold == 100.0


def test_phase_gauges_without_a_readable_policy_show_the_phases_seen() -> None:
    (only,) = phase_gauges(None, {"2": {"succeeded": 1}}, current=2)
    assert only.label == "phase 3" and only.success_pct == 100.0 and only.error_threshold is None


def test_completions_chart_stacks_failed_on_done_per_bucket() -> None:
    start = 6000.0
    rows = [
        Bucket(6000.0, "succeeded", 4),
        Bucket(6000.0, "failed", 1),
        Bucket(6120.0, "skipped", 2),
        Bucket(6120.0, "timed_out", 2),
    ]
    chart = completions_chart(rows, start, 6150.0, 60, width=800, height=100)
    assert chart is not None
    assert [(c.done, c.failed) for c in chart.columns] == [(4, 1), (0, 0), (2, 2)]
    assert chart.peak == 5 and chart.total_done == 6 and chart.total_failed == 3
    first = chart.columns[0]
    assert first.done_h == pytest.approx(80.0) and first.failed_h == pytest.approx(20.0)
    assert completions_chart([], start, 6150.0, 60) is None


def test_bucket_size_keeps_at_most_120_buckets() -> None:
    assert bucket_size(0) == 60
    assert bucket_size(7200) == 60
    assert bucket_size(7201) == 120
    assert bucket_size(3 * 86400) == 60 * 36
