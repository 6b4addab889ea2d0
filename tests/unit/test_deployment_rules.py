"""The deployment rules (``rollout.deployment``) on made-up rows: no database, no clock."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwcm.protocol import LwState, NoticeKind, Report, Result
from fwcm.rollout import deployment as dep
from fwcm.rollout.deployment import DeploymentView, Reported, Silent
from fwcm.rollout.policy import Policy
from fwcm.rollout.states import DEVICE_TERMINAL, IN_PROGRESS, CampaignState, DeviceState

CAMPAIGN, DEVICE, TENANT = 7, 11, 3
ONCE = Policy.from_dict({})
RETRIED = Policy.from_dict({"retries": {"max_attempts": 3, "backoff": "30s", "factor": 2}})

states = st.sampled_from(list(DeviceState))
lw_states = st.sampled_from(list(LwState))
results = st.sampled_from(list(Result))


def report(seq: int, state: LwState, result: Result = Result.INITIAL, attempt: int = 1) -> Report:
    return Report("d", CAMPAIGN, attempt, seq, state, result)


def judged(
    view: DeploymentView, *reports: Report, policy: Policy = ONCE, now: float = 1000.0
) -> list[dep.Applied]:
    incoming = [Reported(TENANT, DEVICE, r) for r in reports]
    return dep.judge_reports({(CAMPAIGN, DEVICE): view}, incoming, {CAMPAIGN: policy}, now)


@pytest.mark.parametrize(
    ("lw", "result", "expected"),
    [
        (LwState.DOWNLOADING, Result.INITIAL, DeviceState.DOWNLOADING),
        (LwState.DOWNLOADED, Result.INITIAL, DeviceState.DOWNLOADED),
        (LwState.UPDATING, Result.INITIAL, DeviceState.INSTALLING),
        (LwState.IDLE, Result.SUCCESS, DeviceState.SUCCEEDED),
        (LwState.IDLE, Result.CANCELLED, DeviceState.CANCELLED),
        (LwState.IDLE, Result.DECLINED, DeviceState.DECLINED),
        (LwState.IDLE, Result.UP_TO_DATE, DeviceState.SKIPPED),
        (LwState.IDLE, Result.CONDITION_MISMATCH, DeviceState.SKIPPED),
        (LwState.IDLE, Result.INITIAL, DeviceState.NOTIFIED),
        (LwState.IDLE, Result.INTEGRITY_FAILURE, DeviceState.FAILED),
        (LwState.IDLE, Result.SIGNER_REVOKED, DeviceState.FAILED),
    ],
)
def test_state_for_report(lw: LwState, result: Result, expected: DeviceState) -> None:
    assert dep.state_for_report(lw, result) == expected


def test_an_idle_report_does_not_move_a_deployment_back() -> None:
    downloading = DeploymentView(DeviceState.DOWNLOADING, 1, 3)
    change = dep.apply_report(downloading, report(4, LwState.IDLE))
    assert change == dep.Change(DeviceState.DOWNLOADING, 0, 4)  # seq taken, state kept
    pending = DeploymentView(DeviceState.PENDING, 1, -1)
    assert dep.apply_report(pending, report(0, LwState.IDLE)) == dep.Change(DeviceState.NOTIFIED, 0, 0)


@given(
    state=states,
    attempt=st.integers(1, 5),
    last=st.integers(-1, 50),
    seq=st.integers(0, 60),
    lw=lw_states,
    res=results,
)
def test_a_duplicate_or_out_of_order_report_never_changes_a_deployment(
    state: DeviceState, attempt: int, last: int, seq: int, lw: LwState, res: Result
) -> None:
    view = DeploymentView(state, attempt, last)
    change = dep.apply_report(view, report(seq, lw, res, attempt))
    if seq <= last:
        assert change is None  # already seen (a duplicate) or older than what was applied
    if change is not None:  # applied once: the same report again changes nothing
        after = DeploymentView(change.state, attempt, change.seq)
        assert dep.apply_report(after, report(seq, lw, res, attempt)) is None


@given(state=states, attempt=st.integers(1, 5), other=st.integers(0, 5), lw=lw_states, res=results)
def test_reports_of_another_attempt_are_ignored(
    state: DeviceState, attempt: int, other: int, lw: LwState, res: Result
) -> None:
    if other != attempt:
        assert dep.apply_report(DeploymentView(state, attempt, -1), report(0, lw, res, other)) is None


@given(state=st.sampled_from(sorted(DEVICE_TERMINAL)), lw=lw_states, res=results, seq=st.integers(0, 99))
def test_terminal_states_are_final(state: DeviceState, lw: LwState, res: Result, seq: int) -> None:
    assert dep.apply_report(DeploymentView(state, 1, -1), report(seq, lw, res)) is None


@given(
    steps=st.lists(st.tuples(lw_states, results), min_size=1, max_size=6),
    order=st.randoms(use_true_random=False),
    duplicates=st.integers(0, 3),
)
def test_a_batch_ends_the_same_whatever_order_and_duplicates_it_arrives_in(
    steps: list[tuple[LwState, Result]], order: object, duplicates: int
) -> None:
    reports = [report(i, lw, res) for i, (lw, res) in enumerate(steps)]
    shuffled = reports + reports[:duplicates]
    order.shuffle(shuffled)  # type: ignore[attr-defined]
    view = DeploymentView(DeviceState.NOTIFIED, 1, -1)
    in_order = judged(view, *reports)
    assert judged(view, *shuffled) == in_order
    assert len({a.seq for a in in_order}) == len(in_order)  # each report applied at most once


def test_a_transient_failure_is_retried_while_attempts_last() -> None:
    view = DeploymentView(DeviceState.DOWNLOADING, 1, 2)
    [a] = judged(view, report(3, LwState.IDLE, Result.CONNECTION_LOST), policy=RETRIED)
    assert (a.state, a.entered, a.retry_at) == (DeviceState.PENDING, DeviceState.FAILED, 1030.0)
    [b] = judged(view._replace(attempt=2), report(3, LwState.IDLE, Result.CONNECTION_LOST, 2), policy=RETRIED)
    assert b.retry_at == 1060.0  # the backoff doubles
    [c] = judged(view._replace(attempt=3), report(3, LwState.IDLE, Result.CONNECTION_LOST, 3), policy=RETRIED)
    assert (c.state, c.retry_at) == (DeviceState.FAILED, None)  # attempts used up
    [d] = judged(view, report(3, LwState.IDLE, Result.INTEGRITY_FAILURE), policy=RETRIED)
    assert (d.state, d.retry_at) == (DeviceState.FAILED, None)  # not transient
    [e] = judged(view, report(3, LwState.IDLE, Result.CONNECTION_LOST), policy=ONCE)
    assert e.state == DeviceState.FAILED


def test_success_records_what_the_device_now_runs_and_the_history_only_new_states() -> None:
    view = DeploymentView(DeviceState.INSTALLING, 1, 5)
    done = Report("d", CAMPAIGN, 1, 6, LwState.IDLE, Result.SUCCESS, installed_sequence=4)
    [a] = judged(view, done)
    assert (a.state, a.entered, a.installed) == (DeviceState.SUCCEEDED, DeviceState.SUCCEEDED, 4)
    progress = Report("d", CAMPAIGN, 1, 6, LwState.UPDATING, Result.INITIAL, progress=50)
    [b] = judged(view, progress)
    assert (b.state, b.entered, b.progress) == (DeviceState.INSTALLING, None, 50)


def test_a_report_of_an_unknown_deployment_is_ignored() -> None:
    incoming = [Reported(TENANT, DEVICE + 1, report(1, LwState.DOWNLOADING))]
    view = DeploymentView(DeviceState.NOTIFIED, 1, -1)
    assert dep.judge_reports({(CAMPAIGN, DEVICE): view}, incoming, {CAMPAIGN: ONCE}, 0.0) == []


def test_silent_deployments_are_retried_or_time_out() -> None:
    policy = Policy.from_dict({"device_timeout": "10m", "retries": {"max_attempts": 2, "backoff": "1m"}})
    cutoffs = dep.timeout_cutoffs(policy, 10_000.0)
    assert set(cutoffs) == set(IN_PROGRESS) and all(c == 10_000.0 - 600 for c in cutoffs.values())
    first = Silent(TENANT, DEVICE, 1, DeviceState.DOWNLOADING)
    last = Silent(TENANT, DEVICE + 1, 2, DeviceState.INSTALLING)
    retried, timed_out = dep.expire([first, last], policy, 10_000.0)
    assert (retried.state, retried.retry_at, retried.was) == (
        DeviceState.PENDING,
        10_060.0,
        DeviceState.DOWNLOADING,
    )
    assert (timed_out.state, timed_out.retry_at) == (DeviceState.TIMED_OUT, None)
    assert "600 s while installing" in timed_out.detail


def test_an_install_window_holds_the_timeout_of_downloaded_devices() -> None:
    policy = Policy.from_dict({"window": {"start": "02:00", "end": "04:00", "tz": "UTC", "mode": "install"}})
    noon = 1_700_000_000.0 - 1_700_000_000.0 % 86400 + 12 * 3600
    assert DeviceState.DOWNLOADED not in dep.timeout_cutoffs(policy, noon)
    assert DeviceState.DOWNLOADING in dep.timeout_cutoffs(policy, noon)


@pytest.mark.parametrize(
    ("state", "campaign", "group", "kind"),
    [
        (DeviceState.INVITED, CampaignState.RUNNING, None, NoticeKind.INVITE),
        (DeviceState.CANCELLED, CampaignState.RUNNING, None, NoticeKind.CANCEL),
        (DeviceState.NOTIFIED, CampaignState.CANCELLED, None, NoticeKind.CANCEL),
        (DeviceState.CANCELLED, CampaignState.RUNNING, "abort", NoticeKind.ABORT),
        (DeviceState.DOWNLOADED, CampaignState.RUNNING, "commit", NoticeKind.COMMIT),
        (DeviceState.DOWNLOADING, CampaignState.RUNNING, "commit", NoticeKind.UPDATE),
        (DeviceState.NOTIFIED, CampaignState.PAUSED, None, NoticeKind.UPDATE),
    ],
)
def test_notice_kind(
    state: DeviceState, campaign: CampaignState, group: str | None, kind: NoticeKind
) -> None:
    assert dep.notice_kind(state, campaign, group) == kind
    reason = dep.notice_reason(kind, "why")
    assert reason == ("why" if kind in (NoticeKind.CANCEL, NoticeKind.ABORT) else None)


def test_every_in_progress_state_has_a_notice() -> None:
    for state, campaign in itertools.product(IN_PROGRESS, CampaignState):
        assert isinstance(dep.notice_kind(state, campaign, None), NoticeKind)


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_base_mismatch_on_a_server_patch_falls_back_to_the_full_image_at_once(max_attempts: int) -> None:
    policy = Policy.from_dict({"retries": {"max_attempts": max_attempts, "backoff": "1h"}})
    view = DeploymentView(DeviceState.NOTIFIED, 1, 0, delta=True)
    [a] = judged(view, report(1, LwState.IDLE, Result.BASE_MISMATCH), policy=policy, now=500.0)
    assert (a.state, a.entered, a.retry_at, a.full_image) == (
        DeviceState.PENDING,
        DeviceState.FAILED,
        500.0,
        True,
    )


def test_a_base_mismatch_without_a_server_patch_is_a_failure_like_any_other() -> None:
    view = DeploymentView(DeviceState.NOTIFIED, 1, 0)
    [a] = judged(view, report(1, LwState.IDLE, Result.BASE_MISMATCH), now=500.0)
    assert (a.state, a.retry_at, a.full_image) == (DeviceState.FAILED, None, False)


def test_only_a_base_mismatch_falls_back() -> None:
    view = DeploymentView(DeviceState.DOWNLOADING, 1, 0, delta=True)
    [a] = judged(view, report(1, LwState.IDLE, Result.INTEGRITY_FAILURE), now=500.0)
    assert (a.state, a.full_image) == (DeviceState.FAILED, False)


# -- repeating the notice of silent deployments -------------------------------------------------


def test_a_lone_deployment_is_repeated_after_the_base_silence() -> None:
    assert dep.resend_silence(1, 3600) == pytest.approx(dep.RESEND_SILENT_S, abs=0.01)


def test_the_silence_grows_with_the_deployments_in_progress() -> None:
    # 50,000 notified at once: the last waits minutes for its turn, not 20 s
    assert dep.resend_silence(50_000, 3600) > 10 * dep.resend_silence(10, 3600)


@given(st.integers(0, 10**7), st.integers(0, 10**7), st.floats(1, 10**6))
def test_the_silence_is_monotone_and_under_a_third_of_the_device_timeout(
    a: int, b: int, timeout: float
) -> None:
    lo, hi = sorted((a, b))
    assert dep.resend_silence(lo, timeout) <= dep.resend_silence(hi, timeout)
    assert dep.resend_silence(hi, timeout) <= timeout / 3


def test_a_draining_queue_keeps_the_silence_of_the_queue_a_deployment_joined() -> None:
    # 50,000 notified at t=0, finishing at 340 a second: at t=110 s 12,600 are still in progress
    seen = [(float(t), 50_000 - 340 * t) for t in range(0, 111, 5)]
    now = 110.0
    today = dep.resend_silence(seen[-1][1], 3600)
    assert today < now  # by today's queue alone, those silent since t=0 would be repeated
    assert dep.silence_allowed(seen, now, 3600) == pytest.approx(dep.resend_silence(50_000, 3600))


def test_a_queue_long_gone_no_longer_lengthens_the_silence() -> None:
    # a burst an hour ago, one deployment in progress since: the base silence again
    seen = [(0.0, 50_000), *((float(t), 1) for t in range(3000, 3601, 5))]
    assert dep.silence_allowed(seen, 3600.0, 3600) == pytest.approx(dep.resend_silence(1, 3600))
    assert dep.silence_allowed([], 0.0, 3600) == pytest.approx(dep.resend_silence(0, 3600))


@given(
    st.lists(st.tuples(st.floats(0, 10_000), st.integers(0, 10**6)), max_size=50),
    st.floats(1, 10**5),
)
def test_the_silence_allowed_is_between_todays_and_the_largest_queues(
    samples: list[tuple[float, int]], timeout: float
) -> None:
    seen = sorted(samples)
    now = seen[-1][0] if seen else 0.0
    allowed = dep.silence_allowed(seen, now, timeout)
    today = dep.resend_silence(seen[-1][1] if seen else 0, timeout)
    most = dep.resend_silence(max((n for _t, n in seen), default=0), timeout)
    assert today <= allowed <= most <= timeout / 3
    # the allowance covers the most in progress within it
    assert allowed >= dep.resend_silence(max((n for t, n in seen if t >= now - allowed), default=0), timeout)
