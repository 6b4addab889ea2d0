"""Consent on the device: answering invitations, group installs, and the use of installed software.

An invite notice asks the device's owner; the fault profile decides how they answer (accept with
their preferred options, decline, or ignore it). A group install downloads and verifies
everywhere first, then installs only on the group's commit. Software installed with usage limits
counts its uses, reports them (accounting), and removes itself at its limit: the device boots its
previous image again and says so.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fwcm import protocol
from fwcm.protocol import Accounting, Answer, LwState, Notice, Result, UsageLimits

from .device import Device, Refusal
from .flash import Job

log = logging.getLogger(__name__)

GROUP_COMMIT, GROUP_ABORT = "commit", "abort"


class Consent:
    """Invitations, group decisions and usage of one device."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._group: dict[int, str] = {}
        """Group installs: the server's decision per campaign ("commit" or "abort")."""
        self._group_changed = asyncio.Event()
        self._usage_started = asyncio.Event()

    # -- invitations ------------------------------------------------------------------------

    async def on_invite(self, n: Notice) -> None:
        """Answer an invitation as this device's owner would (the fault profile decides)."""
        device = self.device
        if device.flash.state.is_finished(n.campaign, n.attempt):
            return
        invitation = n.invitation
        offered = invitation.options if invitation is not None and invitation.options else {}
        answer = device.faults.consent
        if answer == "ignore":
            log.info("%s: invitation to campaign %d left unanswered", device.config.name, n.campaign)
            return
        if answer == "decline":
            device.report(
                n.campaign,
                n.attempt,
                LwState.IDLE,
                Result.DECLINED,
                extra={protocol.REPORT_ANSWER: Answer(accepted=False).to_map()},
                finish=True,
            )
            return
        choice = {}
        for option, values in offered.items():
            wanted = device.faults.choice.get(option)
            choice[option] = wanted if wanted in values else values[0]
        device.report(
            n.campaign,
            n.attempt,
            LwState.IDLE,
            extra={protocol.REPORT_ANSWER: Answer(accepted=True, choice=choice).to_map()},
            finish=True,
        )

    # -- group installs ---------------------------------------------------------------------

    def decide(self, campaign: int, decision: str) -> None:
        """The group's decision arrived (a commit or abort notice)."""
        self._group[campaign] = decision
        self._group_changed.set()

    async def wait_for_commit(self, n: Notice) -> None:
        """Group install: prepared (downloaded and verified); install only on the group's commit."""
        log.info(
            "%s: prepared for group install of campaign %d; waiting for commit",
            self.device.config.name,
            n.campaign,
        )
        while n.campaign not in self._group:
            self._group_changed.clear()
            await self._group_changed.wait()
        if self._group[n.campaign] != GROUP_COMMIT:
            raise Refusal(Result.CANCELLED, "group aborted: the image is discarded")

    # -- usage of installed software --------------------------------------------------------

    def begin_usage(self, job: Job) -> None:
        """The software ``job`` installed has usage limits: count its use from now."""
        if not job.limits:
            return
        now = time.time()
        self._usage_started.set()
        self.device.flash.state.usage[str(job.campaign)] = {
            "attempt": job.attempt,
            "since": now,
            "last": now,
            "uses": 0,
            **job.limits,
        }

    async def run_usage(self) -> None:
        """Installed software in use: count uses, send accounting, remove it at its limit."""
        while True:
            st = self.device.flash.state
            if not st.usage:  # nothing installed with limits: sleep until something is
                self._usage_started.clear()
                await self._usage_started.wait()
            await asyncio.sleep(0.25)
            for key, u in list(st.usage.items()):
                now = time.time()
                every = float(u.get("every") or 1.0)
                if now - u["last"] < every:
                    continue
                u["last"] = now
                u["uses"] += 1
                expired = "expires" in u and now - u["since"] >= u["expires"]
                used_up = "max_uses" in u and u["uses"] >= u["max_uses"]
                if expired or used_up:
                    self._remove(int(key), u, "use limit reached" if used_up else "time limit reached")
                elif u.get("every"):
                    self._account(int(key), u, "interim")
                else:
                    self.device.flash.save()

    def _account(self, campaign: int, u: dict[str, float], kind: str, detail: str | None = None) -> None:
        record = Accounting(kind, int(u["uses"]), int(time.time() - u["since"]), detail or None)
        self.device.report(
            campaign,
            int(u["attempt"]),
            LwState.IDLE,
            Result.SUCCESS,
            extra={protocol.REPORT_ACCOUNTING: record.to_map()},
        )

    def _remove(self, campaign: int, u: dict[str, float], why: str) -> None:
        """Time-limited install ended: boot the previous slot again and say so."""
        device = self.device
        st = device.flash.state
        try:
            device.flash.activate()
        except RuntimeError:
            log.warning("%s: nothing to return to; keeping the installed software", device.config.name)
        st.usage.pop(str(campaign), None)
        device.status.installed_sequence = st.installed_sequence
        device.status.removed += 1
        log.info(
            "%s: software of campaign %d removed (%s); back on sequence %d",
            device.config.name,
            campaign,
            why,
            st.installed_sequence,
        )
        self._account(campaign, u, "removed", why)


def usage_limits(limits: UsageLimits | None) -> dict[str, float] | None:
    """Usage limits and accounting interval from an update notice, as the job persists them."""
    if limits is None:
        return None
    given = {
        "max_uses": limits.max_uses,
        "expires": limits.expires_after_s,
        "every": limits.accounting_every_s,
    }
    out = {name: float(x) for name, x in given.items() if x is not None and x > 0}
    return out or None
