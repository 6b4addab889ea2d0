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
