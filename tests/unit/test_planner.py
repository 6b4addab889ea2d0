"""The engine's planner (``rollout.planner.plan``) on made-up snapshots: no database, no clock.

A small simulated campaign (a dict of deployments, the test's own) carries plans out the way the
engine does, so properties hold over whole runs: a plan never notifies a device outside the
campaign's subset or beyond the started phases, never above the rate, and expires only what was
silent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as strat

from fwcm.rollout import planner
from fwcm.rollout.deployment import Silent
from fwcm.rollout.planner import CampaignView, PolicyState, Snapshot
from fwcm.rollout.policy import Policy
from fwcm.rollout.states import CampaignState, DeviceState


@dataclass
class Campaign:
    """The deployments of one simulated campaign: device → (phase, state)."""

    phase_sizes: list[int]
    deployments: dict[int, tuple[int, DeviceState]] = field(default_factory=dict)
    notified_at: list[tuple[float, int]] = field(default_factory=list)
    phase: int = 0
    state: CampaignState = CampaignState.RUNNING

    def __post_init__(self) -> None:
        device = 0
        for p, size in enumerate(self.phase_sizes):
            for _ in range(size):
                self.deployments[device] = (p, DeviceState.PENDING)
                device += 1

    def snapshot(self, silent: tuple[Silent, ...] = ()) -> Snapshot:
        rows: Counter[tuple[int, str]] = Counter((p, st.value) for p, st in self.deployments.values())
        view = CampaignView.from_rows(self.state.value, self.phase, [(p, s, n) for (p, s), n in rows.items()])
        return Snapshot(view, silent)

    def apply(self, step: planner.Plan, now: float) -> list[int]:
        """What the engine's apply does with a plan, on the simulated rows."""
        eligible = sorted(
            d for d, (p, st) in self.deployments.items() if st == DeviceState.PENDING and p <= step.max_phase
        )
        taken = eligible[: step.decision.notify]
        for d in taken:
            self.deployments[d] = (self.deployments[d][0], DeviceState.NOTIFIED)
        self.notified_at += [(now, d) for d in taken]
        if step.decision.advance_to is not None:
            self.phase = step.decision.advance_to
        if step.decision.transition is not None:
            self.state = step.decision.transition[0]
        return taken

    def devices_report(self, outcome: DeviceState) -> None:
        for d, (p, st) in self.deployments.items():
            if st == DeviceState.NOTIFIED:
                self.deployments[d] = (p, outcome)


policies = strat.builds(
    lambda rate, batch, phases: Policy.from_dict(
        {"rate_per_minute": rate, "batch_max": batch, "phases": [{"size": n} for n in phases[:-1]] + [{}]}
    ),
    rate=strat.one_of(strat.none(), strat.integers(1, 600)),
    batch=strat.integers(1, 500),
    phases=strat.lists(strat.integers(1, 40), min_size=1, max_size=4),
)


@settings(max_examples=60, deadline=None)
@given(
    policy=policies, total=strat.integers(0, 300), ticks=strat.integers(1, 80), gap=strat.floats(0.05, 5.0)
)
def test_a_plan_never_notifies_outside_the_subset_the_started_phases_or_the_rate(
    policy: Policy, total: int, ticks: int, gap: float
) -> None:
    campaign = Campaign(policy.phase_sizes(total))
    memory = PolicyState()
    now = 1_000_000.0
    for _ in range(ticks):
        before = {d: st for d, (_p, st) in campaign.deployments.items()}
        step = planner.plan(policy, campaign.snapshot(), memory, now)
        eligible = [
            d
            for d, (p, st) in campaign.deployments.items()
            if st == DeviceState.PENDING and p <= campaign.phase
        ]
        assert step.decision.notify <= len(eligible)
        taken = campaign.apply(step, now)
        memory.record_notified(len(taken), now)
        assert all(
            d in before and before[d] == DeviceState.PENDING for d in taken
        )  # only the subset's pending
        campaign.devices_report(DeviceState.SUCCEEDED)
        now += gap
    if policy.rate_per_minute is not None:  # any 60 s holds at most a minute's worth plus the burst
        times = sorted(t for t, _d in campaign.notified_at)
        allowed = policy.rate_per_minute + policy.rate_per_minute * 2.0 / 60 + 1
        for i, t in enumerate(times):
            assert sum(1 for u in times[i:] if u < t + 60) <= allowed


def test_a_plan_that_changes_nothing_is_idle() -> None:
    policy = Policy.from_dict({})
    campaign = Campaign([3])
    memory = PolicyState()
    busy = planner.plan(policy, campaign.snapshot(), memory, 0.0)
    assert busy.decision.notify == 3 and not busy.idle
    campaign.apply(busy, 0.0)
    quiet = planner.plan(policy, campaign.snapshot(), memory, 1.0, note_before=busy.note)
    assert quiet.idle and quiet.decision.notify == 0


def test_a_plan_expires_exactly_the_silent_deployments_it_was_shown() -> None:
    policy = Policy.from_dict({"device_timeout": "1m", "retries": {"max_attempts": 2, "backoff": "10s"}})
    campaign = Campaign([2])
    silent = (Silent(1, 0, 1, DeviceState.DOWNLOADING), Silent(1, 1, 2, DeviceState.NOTIFIED))
    step = planner.plan(policy, campaign.snapshot(silent), PolicyState(), 500.0)
    assert [(e.device_pk, e.state) for e in step.expired] == [
        (0, DeviceState.PENDING),
        (1, DeviceState.TIMED_OUT),
    ]
    assert not step.idle
    assert planner.plan(policy, campaign.snapshot(), PolicyState(), 500.0).expired == ()


def test_housekeeping_is_planned_only_when_due() -> None:
    policy = Policy.from_dict({"dynamic": True})
    campaign = Campaign([0])
    quiet = planner.plan(policy, campaign.snapshot(), PolicyState(), 10.0)
    assert not (quiet.join or quiet.invite or quiet.close_invitations)
    due = planner.plan(
        policy, campaign.snapshot(), PolicyState(), 10.0, join=True, consent_due=True, deadline=20.0
    )
    assert due.join and due.invite and not due.close_invitations and not due.idle
    late = planner.plan(policy, campaign.snapshot(), PolicyState(), 30.0, consent_due=True, deadline=20.0)
    assert late.close_invitations


def test_the_first_look_seeds_the_rate_window_from_recent_notifications() -> None:
    policy = Policy.from_dict({"rate_per_minute": 60})
    campaign = Campaign([100])
    recent = tuple(float(t) for t in range(1000, 1060))  # a minute's worth already went out
    step = planner.plan(policy, Snapshot(campaign.snapshot().view, (), recent), PolicyState(), 1060.0)
    assert step.decision.notify <= 1
    fresh = planner.plan(policy, campaign.snapshot(), PolicyState(), 1060.0)
    assert fresh.decision.notify > step.decision.notify


def test_a_stopped_campaign_resumed_after_review_does_not_stop_again_for_the_same_failures() -> None:
    from fwcm.rollout.planner import review

    policy = Policy.from_dict({"error_threshold": "10%", "on_error": "stop"})
    rows = [(0, "failed", 3), (0, "succeeded", 5), (0, "pending", 12)]
    view = CampaignView.from_rows("running", 0, rows)
    assert planner.decide(policy, view, PolicyState(), 0.0).transition is not None  # as before
    memory = PolicyState()
    memory.accept_review(review(rows, 0))
    assert planner.decide(policy, view, memory, 0.0).transition is None
    worse = CampaignView.from_rows("running", 0, [(0, "failed", 4), (0, "succeeded", 5), (0, "pending", 11)])
    assert planner.decide(policy, worse, memory, 0.0).transition == (
        CampaignState.STOPPED,
        "error threshold of phase 1 crossed: 4 of 9 devices failed (44.4% >= 10%)",
    )


def test_in_progress_counts_every_phase_and_no_ended_state() -> None:
    view = planner.CampaignView.from_rows(
        "running",
        1,
        [(0, "succeeded", 5), (0, "downloading", 2), (1, "notified", 3), (1, "pending", 4), (1, "failed", 1)],
    )
    assert view.in_progress == 5
