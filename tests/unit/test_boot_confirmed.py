"""Boot-confirmed success on made-up rows: the revert rules (``rollout.deployment``), how reverts
count (``rollout.planner``), the exit code of an ended campaign (``rollout.outcome``) and the
refusal of an empty start (``rollout.launch``). No database, no clock."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwcm import filters
from fwcm.protocol import REPORT_BOOT_HELLO, REPORT_IMAGE_DIGEST, LwState, ProtocolError, Report, Result
from fwcm.rollout import deployment as dep
from fwcm.rollout import launch
from fwcm.rollout.deployment import Claim, DeploymentView, DeviceRecord, Reported
from fwcm.rollout.outcome import CampaignExit, ended, exit_code
from fwcm.rollout.planner import CampaignView, PolicyState, decide
from fwcm.rollout.policy import Policy
from fwcm.rollout.states import AGAINST_ERRORS, CampaignState, DeviceState

TENANT, DEVICE, CAMPAIGN = 3, 11, 7
OLD, NEW = b"\x01" * 32, b"\x02" * 32


def hello(seq: int, sequence: int | None, digest: bytes | None = None) -> Reported:
    extra = {REPORT_IMAGE_DIGEST: digest} if digest is not None else {}
    return Reported(
        TENANT, DEVICE, Report("d", 0, 0, seq, LwState.IDLE, Result.INITIAL, None, None, sequence, extra)
    )


def judge(record: DeviceRecord, *hellos: Reported) -> list[dep.Reverted]:
    return dep.judge_hellos({DEVICE: record}, hellos)


CLAIM = Claim(CAMPAIGN, 2, NEW)


def test_idle_reverted_report_ends_the_deployment_reverted() -> None:
    assert dep.state_for_report(LwState.IDLE, Result.REVERTED) == DeviceState.REVERTED
    change = dep.apply_report(
        DeploymentView(DeviceState.INSTALLING, 1, 3),
        Report("d", CAMPAIGN, 1, 4, LwState.IDLE, Result.REVERTED),
    )
    assert change is not None and change.state == DeviceState.REVERTED and change.result == 21


def test_success_carries_the_claimed_digest_and_a_revert_the_sequence_it_runs() -> None:
    view = {(CAMPAIGN, DEVICE): DeploymentView(DeviceState.INSTALLING, 1, 3)}
    ok = Report("d", CAMPAIGN, 1, 4, LwState.IDLE, Result.SUCCESS, None, None, 2, {REPORT_IMAGE_DIGEST: NEW})
    [applied] = dep.judge_reports(view, [Reported(TENANT, DEVICE, ok)], {CAMPAIGN: Policy.from_dict({})}, 0)
    assert (applied.state, applied.installed, applied.digest) == (DeviceState.SUCCEEDED, 2, NEW)
    back = Report(
        "d", CAMPAIGN, 1, 4, LwState.IDLE, Result.REVERTED, None, None, 1, {REPORT_IMAGE_DIGEST: OLD}
    )
    [applied] = dep.judge_reports(view, [Reported(TENANT, DEVICE, back)], {CAMPAIGN: Policy.from_dict({})}, 0)
    assert (applied.state, applied.installed, applied.digest) == (DeviceState.REVERTED, 1, None)


def test_a_hello_with_an_older_image_than_the_claim_reverts_the_deployment() -> None:
    [r] = judge(DeviceRecord(5, CLAIM), hello(6, 1, OLD))
    assert (r.campaign, r.device_pk, r.tenant_id) == (CAMPAIGN, DEVICE, TENANT)
    assert "sequence 1" in r.detail and "claimed sequence 2" in r.detail


def test_same_sequence_but_another_digest_reverts() -> None:
    assert judge(DeviceRecord(5, CLAIM), hello(6, 2, OLD))
    assert not judge(DeviceRecord(5, CLAIM), hello(6, 2, NEW))
    assert not judge(DeviceRecord(5, CLAIM), hello(6, 2))  # no digest said: nothing to hold against


def test_a_newer_image_is_no_revert_and_nothing_without_a_claim() -> None:
    assert not judge(DeviceRecord(5, CLAIM), hello(6, 3, OLD))
    assert not judge(DeviceRecord(5, None), hello(6, 1, OLD))
    assert not dep.judge_hellos({}, [hello(6, 1, OLD)])  # an unknown device


def test_a_late_hello_says_nothing_and_a_claim_reverts_once() -> None:
    assert not judge(DeviceRecord(9, CLAIM), hello(8, 1, OLD))  # older than the newest hello applied
    assert len(judge(DeviceRecord(5, CLAIM), hello(7, 1, OLD), hello(6, 1, OLD), hello(8, 1, OLD))) == 1


def test_a_hello_sent_before_the_confirming_boot_says_nothing_however_late() -> None:
    """Hellos and reports reach replicas by different paths: the hello a device sent before it
    installed can arrive after its success. The success names its boot's hello (key 16)."""
    booted = Claim(CAMPAIGN, 2, NEW, hello_seq=7)
    assert not judge(DeviceRecord(5, booted), hello(6, 1, OLD))  # sent before the boot, arrived late
    assert not judge(DeviceRecord(5, booted), hello(7, 2, NEW), hello(6, 1, OLD))
    [r] = judge(DeviceRecord(7, booted), hello(8, 1, OLD))  # a later boot fell back: a revert
    assert "claimed sequence 2" in r.detail


def test_a_success_records_the_hello_of_its_boot() -> None:
    view = {(CAMPAIGN, DEVICE): DeploymentView(DeviceState.INSTALLING, 1, 3)}
    extra = {REPORT_IMAGE_DIGEST: NEW, REPORT_BOOT_HELLO: 7}
    ok = Report("d", CAMPAIGN, 1, 4, LwState.IDLE, Result.SUCCESS, None, None, 2, extra)
    [applied] = dep.judge_reports(view, [Reported(TENANT, DEVICE, ok)], {CAMPAIGN: Policy.from_dict({})}, 0)
    assert applied.boot_hello == 7
    with pytest.raises(ProtocolError):
        Report.from_map(ok.to_map() | {REPORT_BOOT_HELLO: -1})


@given(
    claimed=st.integers(0, 50),
    running=st.integers(0, 50),
    same_digest=st.booleans(),
    seqs=st.lists(st.integers(0, 20), min_size=1, max_size=6),
    newest=st.one_of(st.none(), st.integers(0, 20)),
    booted=st.one_of(st.none(), st.integers(0, 20)),
)
def test_hello_rule_properties(
    claimed: int, running: int, same_digest: bool, seqs: list[int], newest: int | None, booted: int | None
) -> None:
    """At most one revert per claim; only for hellos newer than the newest applied and than the
    claim's boot hello; exactly when the device runs an older sequence, or the claimed one with
    another digest."""
    claim = Claim(CAMPAIGN, claimed, NEW, booted)
    digest = NEW if same_digest else OLD
    out = judge(DeviceRecord(newest, claim), *(hello(q, running, digest) for q in seqs))
    fresh = [q for q in seqs if (newest is None or q > newest) and (booted is None or q > booted)]
    other = running < claimed or (running == claimed and not same_digest)
    assert len(out) == (1 if fresh and other else 0)


def phase_view(**counts: int) -> CampaignView:
    return CampaignView(CampaignState.RUNNING, 0, {0: Counter(counts)})


def test_reverted_counts_against_the_error_threshold_and_says_so() -> None:
    p = Policy.from_dict({"error_threshold": "10%", "error_min_devices": 1})
    d = decide(p, phase_view(succeeded=8, reverted=2, pending=5), PolicyState(), 0)
    assert d.transition is not None and d.transition[0] == CampaignState.STOPPED
    assert "2 of 10 devices failed or reverted (0 failed, 2 reverted)" in d.transition[1]
    assert DeviceState.REVERTED in AGAINST_ERRORS


def test_success_counts_only_confirmed_devices_and_skips_are_named_apart() -> None:
    p = Policy.from_dict({"phases": [{"size": 10, "success_threshold": "95%"}, {}]})

    def staged(**counts: int) -> CampaignView:
        return CampaignView(CampaignState.RUNNING, 0, {0: Counter(counts), 1: Counter(pending=5)})

    d = decide(p, staged(skipped=9, failed=1), PolicyState(), 0)
    assert d.transition is not None
    reason = d.transition[1]
    assert "9 of 10 devices succeeded or were not for them (0 succeeded, 9 skipped)" in reason
    assert "9 of 10 devices succeeded (" not in reason
    d = decide(p, staged(succeeded=9, reverted=1), PolicyState(), 0)
    assert d.transition is not None and "9 of 10 devices succeeded (90.0% < 95%)" in d.transition[1]
    done = decide(Policy.from_dict({}), phase_view(succeeded=9, reverted=1), PolicyState(), 0)
    assert done.transition is not None and "9 succeeded, 1 reverted" in done.transition[1]


@pytest.mark.parametrize(
    ("state", "counts", "code"),
    [
        ("completed", {"succeeded": 9, "skipped": 1}, CampaignExit.COMPLETED),
        ("completed", {"succeeded": 9, "failed": 1}, CampaignExit.COMPLETED_WITH_FAILURES),
        ("completed", {"succeeded": 9, "timed_out": 1}, CampaignExit.COMPLETED_WITH_FAILURES),
        ("completed", {"succeeded": 8, "failed": 1, "reverted": 1}, CampaignExit.COMPLETED_WITH_REVERTS),
        ("stopped", {"succeeded": 1, "failed": 3}, CampaignExit.STOPPED),
        ("cancelled", {"cancelled": 3}, CampaignExit.CANCELLED),
    ],
)
def test_exit_codes(state: str, counts: dict[str, int], code: CampaignExit) -> None:
    assert ended(state, counts)
    assert exit_code(state, counts) == code


@given(
    counts=st.dictionaries(st.sampled_from([s.value for s in DeviceState]), st.integers(0, 5)),
    state=st.sampled_from([s.value for s in CampaignState]),
)
def test_exit_zero_only_for_a_clean_completion(counts: dict[str, int], state: str) -> None:
    code = exit_code(state, counts)
    clean = state == "completed" and not any(counts.get(s.value, 0) for s in AGAINST_ERRORS)
    assert (code == CampaignExit.COMPLETED) == clean
    assert len({c.value for c in CampaignExit}) == len(CampaignExit)  # each end its own code


def test_an_empty_start_is_refused_naming_the_filter_unless_dynamic_or_allowed() -> None:
    plan = launch.start_plan({}, 0, 0.0)
    why = launch.empty_refusal('tag.regoin == "eu"', 0, plan, allow_empty=False)
    assert why is not None and 'tag.regoin == "eu"' in why and "--allow-empty" in why
    assert launch.empty_refusal('tag.regoin == "eu"', 0, plan, allow_empty=True) is None
    assert launch.empty_refusal("", 3, plan, allow_empty=False) is None
    dynamic = launch.start_plan({"dynamic": True}, 0, 0.0)
    assert launch.empty_refusal("", 0, dynamic, allow_empty=False) is None


def test_a_filter_naming_an_unknown_tag_key_is_warned_with_the_keys_in_use() -> None:
    named = filters.tag_keys(
        filters.parse('tag.regoin == "eu" and not (tag.ring in ["a"] or version == "1")')
    )
    assert named == {"regoin", "ring"}
    [w] = launch.unknown_tag_warnings(named, {"region", "ring"})
    assert "tag.regoin" in w and "region, ring" in w
    assert launch.unknown_tag_warnings({"region"}, {"region"}) == []


def test_the_image_digest_key_is_bounded() -> None:
    base = {1: "d", 2: 0, 3: 0, 4: 1, 5: 0, 6: 0}
    assert Report.from_map({**base, 15: NEW}).image_digest == NEW
    for bad in (b"\x00" * 31, b"\x00" * 33, "ab" * 32, 5):
        with pytest.raises(ProtocolError):
            Report.from_map({**base, 15: bad})
