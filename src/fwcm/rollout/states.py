"""Campaign and device deployment state machines (pure).

Device reports speak LwM2M /5 (state + result); ``state_for_report`` maps them onto deployment
states, and ``apply_report`` decides whether a report changes a deployment at all: reports of an
old attempt, duplicates (seq not above the last applied one) and reports after a terminal state
are ignored, which is what makes at-least-once delivery harmless.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from fwcm.protocol import SKIP_RESULTS, LwState, Report, Result


class CampaignState(enum.StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    STOPPED = "stopped"


CAMPAIGN_TERMINAL = frozenset({CampaignState.COMPLETED, CampaignState.CANCELLED, CampaignState.STOPPED})

CAMPAIGN_TRANSITIONS: dict[CampaignState, frozenset[CampaignState]] = {
    CampaignState.DRAFT: frozenset({CampaignState.SCHEDULED, CampaignState.RUNNING, CampaignState.CANCELLED}),
    CampaignState.SCHEDULED: frozenset(
        {CampaignState.RUNNING, CampaignState.PAUSED, CampaignState.CANCELLED}
    ),
    CampaignState.RUNNING: frozenset(
        {CampaignState.PAUSED, CampaignState.COMPLETED, CampaignState.CANCELLED, CampaignState.STOPPED}
    ),
    CampaignState.PAUSED: frozenset(
        {CampaignState.RUNNING, CampaignState.CANCELLED, CampaignState.STOPPED, CampaignState.COMPLETED}
    ),
    CampaignState.COMPLETED: frozenset(),
    CampaignState.CANCELLED: frozenset(),
    CampaignState.STOPPED: frozenset(),
}


class InvalidTransition(ValueError):
    pass


def campaign_transition(current: str, target: str) -> CampaignState:
    """Validate a campaign state change; raise InvalidTransition naming both states."""
    cur, tgt = CampaignState(current), CampaignState(target)
    if tgt not in CAMPAIGN_TRANSITIONS[cur]:
        raise InvalidTransition(f"campaign is {cur.value}; it cannot become {tgt.value}")
    return tgt


class DeviceState(enum.StrEnum):
    PENDING = "pending"
    INVITED = "invited"
    """Consent campaigns: asked, no answer yet (an accepting device goes back to pending)."""
    NOTIFIED = "notified"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    INSTALLING = "installing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    DECLINED = "declined"
    NO_ANSWER = "no_answer"


DEVICE_TERMINAL = frozenset(
    {
        DeviceState.SUCCEEDED,
        DeviceState.FAILED,
        DeviceState.SKIPPED,
        DeviceState.TIMED_OUT,
        DeviceState.CANCELLED,
        DeviceState.DECLINED,
        DeviceState.NO_ANSWER,
    }
)
NOT_FOR_ME = frozenset({DeviceState.SKIPPED, DeviceState.DECLINED, DeviceState.NO_ANSWER})
"""Ends that are no failure: the update was not for this device, or its owner said no."""
IN_PROGRESS = frozenset(
    {DeviceState.NOTIFIED, DeviceState.DOWNLOADING, DeviceState.DOWNLOADED, DeviceState.INSTALLING}
)
NOT_STARTED_INSTALL = frozenset(
    {DeviceState.PENDING, DeviceState.NOTIFIED, DeviceState.DOWNLOADING, DeviceState.DOWNLOADED}
)


def state_for_report(state: LwState, result: Result) -> DeviceState:
    """Map an LwM2M state/result pair onto a deployment state."""
    if state == LwState.DOWNLOADING:
        return DeviceState.DOWNLOADING
    if state == LwState.DOWNLOADED:
        return DeviceState.DOWNLOADED
    if state == LwState.UPDATING:
        return DeviceState.INSTALLING
    if result == Result.SUCCESS:
        return DeviceState.SUCCEEDED
    if result == Result.CANCELLED:
        return DeviceState.CANCELLED
    if result == Result.DECLINED:
        return DeviceState.DECLINED
    if result in SKIP_RESULTS:
        return DeviceState.SKIPPED
    if result == Result.INITIAL:
        return DeviceState.NOTIFIED  # idle, nothing happened yet: the device has the notice
    return DeviceState.FAILED


class DeploymentView(NamedTuple):
    """What a report is judged against (immutable; a tuple: one is made per report ingested)."""

    state: DeviceState
    attempt: int
    last_seq: int


class Change(NamedTuple):
    state: DeviceState
    result: int
    seq: int


def apply_report(current: DeploymentView, report: Report) -> Change | None:
    """The change a report makes to a deployment, or None when it must be ignored."""
    if report.attempt != current.attempt or report.seq <= current.last_seq:
        return None
    if current.state in DEVICE_TERMINAL:
        return None
    new = state_for_report(report.state, report.result)
    if new == DeviceState.NOTIFIED and current.state != DeviceState.PENDING:
        return Change(current.state, int(report.result), report.seq)
    return Change(new, int(report.result), report.seq)
