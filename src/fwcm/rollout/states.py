"""The vocabulary of campaign and deployment states (pure), and the campaign transition table.

Every layer (store, API, CLI, demo, simulator displays) names states through these enums; the rules
that move a deployment between them are in :mod:`fwcm.rollout.deployment`.
"""

from __future__ import annotations

import enum


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
    # an ended campaign runs again when its failed devices are retried; a stopped one also when an
    # operator resumes it after review
    CampaignState.COMPLETED: frozenset({CampaignState.RUNNING}),
    CampaignState.CANCELLED: frozenset(),
    CampaignState.STOPPED: frozenset({CampaignState.RUNNING}),
}


ACTIONS: dict[str, CampaignState] = {
    "pause": CampaignState.PAUSED,
    "resume": CampaignState.RUNNING,
    "cancel": CampaignState.CANCELLED,
}
"""What an operator's action asks a campaign to become."""
RESUMABLE = frozenset({CampaignState.PAUSED, CampaignState.STOPPED})
"""Resume continues a campaign that paused, or one that stopped, after review; a draft or
scheduled one is started instead, a completed one has its failed devices retried."""
RETRYABLE = frozenset(
    {CampaignState.RUNNING, CampaignState.PAUSED, CampaignState.STOPPED, CampaignState.COMPLETED}
)
"""Campaigns whose failed and timed-out devices may get a new attempt."""


class InvalidTransition(ValueError):
    pass


def action_transition(current: str, action: str) -> CampaignState:
    """The state an operator's action takes a campaign to, by the one transition table; raise
    InvalidTransition naming the states the action needs."""
    cur, target = CampaignState(current), ACTIONS[action]
    allowed = [st for st in CampaignState if target in CAMPAIGN_TRANSITIONS[st]]
    if action == "resume":
        allowed = [st for st in allowed if st in RESUMABLE]
    if cur not in allowed:
        needs = " or ".join(st.value for st in sorted(allowed, key=lambda st: st != CampaignState.RUNNING))
        raise InvalidTransition(f"campaign is {cur.value}; {action} needs a campaign that is {needs}")
    return target


def retry_transition(current: str) -> CampaignState:
    """The state a campaign takes when its failed devices are retried: an ended one runs again,
    a running or paused one stays as it is; InvalidTransition otherwise."""
    cur = CampaignState(current)
    if cur not in RETRYABLE:
        needs = ", ".join(st.value for st in CampaignState if st in RETRYABLE)
        raise InvalidTransition(f"campaign is {cur.value}; retry needs a campaign that is {needs}")
    if cur in CAMPAIGN_TERMINAL:
        assert CampaignState.RUNNING in CAMPAIGN_TRANSITIONS[cur]
        return CampaignState.RUNNING
    return cur


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
    REVERTED = "reverted"
    """The new image failed its trial boot and the bootloader fell back: the device runs its
    previous image (reported by the device, or seen by the server in a later hello)."""


DEVICE_TERMINAL = frozenset(
    {
        DeviceState.SUCCEEDED,
        DeviceState.FAILED,
        DeviceState.SKIPPED,
        DeviceState.TIMED_OUT,
        DeviceState.CANCELLED,
        DeviceState.DECLINED,
        DeviceState.NO_ANSWER,
        DeviceState.REVERTED,
    }
)
AGAINST_ERRORS = frozenset({DeviceState.FAILED, DeviceState.TIMED_OUT, DeviceState.REVERTED})
"""Ends that count against a phase's error threshold (and make ``watch`` exit non-zero)."""
NOT_FOR_ME = frozenset({DeviceState.SKIPPED, DeviceState.DECLINED, DeviceState.NO_ANSWER})
"""Ends that are no failure: the update was not for this device, or its owner said no."""
IN_PROGRESS = frozenset(
    {DeviceState.NOTIFIED, DeviceState.DOWNLOADING, DeviceState.DOWNLOADED, DeviceState.INSTALLING}
)
NOT_STARTED_INSTALL = frozenset(
    {DeviceState.PENDING, DeviceState.NOTIFIED, DeviceState.DOWNLOADING, DeviceState.DOWNLOADED}
)
RETRIED = frozenset({DeviceState.FAILED, DeviceState.TIMED_OUT})
"""Deployment states a retry gives a new attempt."""
