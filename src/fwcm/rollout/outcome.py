"""How a campaign ended, as one exit code (pure): what ``fwcm campaign watch`` and
``fwcm campaign status --wait`` exit with, so a script can tell a clean rollout from one that
completed with failures, reverts, a threshold stop or a cancel (``docs/rollout.md`` lists them).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from fwcm.rollout.states import AGAINST_ERRORS, CAMPAIGN_TERMINAL, IN_PROGRESS, CampaignState, DeviceState


class CampaignExit(enum.IntEnum):
    """Exit codes of the commands that wait for a campaign to end."""

    COMPLETED = 0
    """Completed, and no device failed, timed out or reverted."""
    STOPPED = 1
    """A threshold stopped it (``stop_reason`` says which)."""
    GAVE_UP = 2
    """The command's ``--timeout`` passed first; the campaign goes on."""
    CANCELLED = 3
    """An operator cancelled it."""
    COMPLETED_WITH_FAILURES = 4
    """Completed, but devices failed or timed out (none reverted)."""
    COMPLETED_WITH_REVERTS = 5
    """Completed, but devices reverted to their previous image after a failed trial boot (others
    may have failed too)."""


def ended(state: str, counts: Mapping[str, int]) -> bool:
    """A campaign has ended for a watcher once it is final and no device is still working."""
    busy = sum(counts.get(st.value, 0) for st in IN_PROGRESS)
    return CampaignState(state) in CAMPAIGN_TERMINAL and busy == 0


def exit_code(state: str, counts: Mapping[str, int]) -> CampaignExit:
    """The exit code of a campaign that has ended (see :func:`ended`)."""
    st = CampaignState(state)
    if st == CampaignState.STOPPED:
        return CampaignExit.STOPPED
    if st == CampaignState.CANCELLED:
        return CampaignExit.CANCELLED
    if st != CampaignState.COMPLETED:
        return CampaignExit.GAVE_UP
    if counts.get(DeviceState.REVERTED.value, 0):
        return CampaignExit.COMPLETED_WITH_REVERTS
    if any(counts.get(s.value, 0) for s in AGAINST_ERRORS):
        return CampaignExit.COMPLETED_WITH_FAILURES
    return CampaignExit.COMPLETED
