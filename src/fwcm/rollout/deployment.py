"""Deployment rules (pure): what a report, a silence or a campaign decision means for one device.

A deployment is one device in one campaign. Device reports speak LwM2M /5 (state + result);
:func:`state_for_report` maps them onto deployment states, and :func:`apply_report` decides whether
a report changes a deployment at all: reports of an old attempt, duplicates (seq not above the
last applied one) and reports after a terminal state are ignored, which is what makes
at-least-once delivery harmless. :func:`judge_reports` adds the campaign's retry rule to a batch,
:func:`expire` judges deployments that went silent, and :func:`notice_kind` says which notice a
deployment's device should see now. :func:`judge_hellos` holds a device's hello against the image
its last success claimed, so a bootloader fallback the device never reported is still seen. The
store reads the rows these take and writes what they
return; nothing here reads a clock, a database or a socket.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from fwcm.protocol import SKIP_RESULTS, LwState, NoticeKind, Report, Result
from fwcm.rollout.policy import Policy
from fwcm.rollout.states import DEVICE_TERMINAL, IN_PROGRESS, CampaignState, DeviceState


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
    if result == Result.REVERTED:
        return DeviceState.REVERTED
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
    delta: bool = False
    """The deployment installs from a server-made patch (its full image is the fallback)."""


class Change(NamedTuple):
    state: DeviceState
    result: int
    seq: int


def apply_report(current: DeploymentView, report: Report) -> Change | None:
    """The change a report makes to a deployment, or None when it must be ignored.

    A final state is final: a fallback after a success is seen in the device's next hello
    (:func:`judge_hellos`), not from a report of the finished attempt.
    """
    if report.attempt != current.attempt or report.seq <= current.last_seq:
        return None
    if current.state in DEVICE_TERMINAL:
        return None
    new = state_for_report(report.state, report.result)
    if new == DeviceState.NOTIFIED and current.state != DeviceState.PENDING:
        return Change(current.state, int(report.result), report.seq)
    return Change(new, int(report.result), report.seq)


# -- a batch of reports -------------------------------------------------------------------------


class Reported(NamedTuple):
    """A verified report and whose it is (the tenant's id and the device's row id)."""

    tenant_id: int
    device_pk: int
    report: Report


class Applied(NamedTuple):
    """What one report does to its deployment, ready to be written."""

    tenant_id: int
    campaign: int
    device_pk: int
    attempt: int
    state: DeviceState
    """What is stored: ``pending`` again when a failure is retried later."""
    entered: DeviceState | None
    """The state the report entered, for the device's history (None: no new state)."""
    result: int
    seq: int
    retry_at: float | None
    """When the next attempt starts (POSIX seconds), for a failure that is retried."""
    progress: int | None
    detail: str | None
    installed: int | None
    """The sequence a device that succeeded (or reverted) now runs."""
    digest: bytes | None = None
    """The image digest a device that succeeded now runs (its claim), as its report says."""
    boot_hello: int | None = None
    """The seq of the hello of the boot that confirmed the success (its claim), as its report says."""
    full_image: bool = False
    """The device does not run the patch's base: its next attempt gets the full image."""


def judge_reports(
    views: Mapping[tuple[int, int], DeploymentView],
    reports: Iterable[Reported],
    policies: Mapping[int, Policy],
    now: float,
) -> list[Applied]:
    """The changes a batch of reports makes, in seq order per deployment.

    ``views`` holds the current state of each reported (campaign, device) deployment; a report of
    a deployment not in it is ignored. A failure the campaign's retry rule calls transient puts
    the deployment back to ``pending`` with a retry time instead of failing it.
    """
    current = dict(views)
    out: list[Applied] = []
    for r in sorted(reports, key=lambda r: r.report.seq):
        report = r.report
        key = (report.campaign, r.device_pk)
        view = current.get(key)
        if view is None:
            continue
        change = apply_report(view, report)
        if change is None:
            continue
        retry_at = None
        full_image = falls_back(view, change)
        if full_image:
            retry_at = now
        elif change.state == DeviceState.FAILED:
            retry_at = policies[report.campaign].retry_at(change.result, view.attempt, now)
        stored = DeviceState.PENDING if retry_at is not None else change.state
        current[key] = DeploymentView(stored, view.attempt, change.seq, view.delta and not full_image)
        succeeded = change.state == DeviceState.SUCCEEDED
        runs = succeeded or change.state == DeviceState.REVERTED
        out.append(
            Applied(
                tenant_id=r.tenant_id,
                campaign=report.campaign,
                device_pk=r.device_pk,
                attempt=view.attempt,
                state=stored,
                entered=change.state if change.state != view.state else None,
                result=change.result,
                seq=change.seq,
                retry_at=retry_at,
                progress=report.progress,
                detail=report.detail,
                installed=report.installed_sequence if runs else None,
                digest=report.image_digest if succeeded else None,
                boot_hello=report.boot_hello if succeeded else None,
                full_image=full_image,
            )
        )
    return out


def falls_back(view: DeploymentView, change: Change) -> bool:
    """A device that refuses a server-made patch because it does not run the patch's base is not
    failing: it gets the full image at once, in a new attempt that the retry limit does not count
    against (a device refusing its campaign's own delta manifest fails like any other refusal)."""
    return view.delta and change.state == DeviceState.FAILED and change.result == Result.BASE_MISMATCH


# -- hellos against the image a success claimed ----------------------------------------------


class Claim(NamedTuple):
    """What a device's last success said it runs: the campaign, the sequence, the image digest."""

    campaign: int
    sequence: int | None
    digest: bytes | None
    hello_seq: int | None = None
    """The hello of the boot that confirmed it: hellos up to this one were sent before."""


class DeviceRecord(NamedTuple):
    """A device as a hello is judged against it: the newest hello applied, and its claim."""

    hello_seq: int | None
    claim: Claim | None


class Reverted(NamedTuple):
    """A succeeded deployment whose device, by its own hello, no longer runs what it claimed."""

    tenant_id: int
    device_pk: int
    campaign: int
    detail: str


def runs_other_image(claim: Claim, sequence: int | None, digest: bytes | None) -> bool:
    """True when a hello's image is not the one the claim names: an older sequence, or the same
    sequence with another digest. A newer sequence is an image installed since, not a fallback."""
    if sequence is not None and claim.sequence is not None:
        if sequence < claim.sequence:
            return True
        if sequence > claim.sequence:
            return False
    return digest is not None and claim.digest is not None and digest != claim.digest


def shows_revert(claim: Claim, hello: Report) -> bool:
    """A hello shows the claim reverted when it was sent after the boot that confirmed the claim
    (when the success said which boot that was) and names another image."""
    if claim.hello_seq is not None and hello.seq <= claim.hello_seq:
        return False
    return runs_other_image(claim, hello.installed_sequence, hello.image_digest)


def judge_hellos(devices: Mapping[int, DeviceRecord], hellos: Iterable[Reported]) -> list[Reverted]:
    """The deployments hellos show reverted. Hellos are taken in seq order per device; one not
    above the newest hello applied is late and says nothing, nor does one the device sent before
    the boot that confirmed the claim; a reverting hello ends the claim."""
    current = dict(devices)
    out: list[Reverted] = []
    for h in sorted(hellos, key=lambda h: h.report.seq):
        record = current.get(h.device_pk)
        if record is None:
            continue
        if record.hello_seq is not None and h.report.seq <= record.hello_seq:
            continue
        claim = record.claim
        report = h.report
        if claim is not None and shows_revert(claim, report):
            out.append(Reverted(h.tenant_id, h.device_pk, claim.campaign, _revert_detail(claim, report)))
            claim = None
        current[h.device_pk] = DeviceRecord(report.seq, claim)
    return out


def _revert_detail(claim: Claim, hello: Report) -> str:
    def image(sequence: int | None, digest: bytes | None) -> str:
        said = [f"sequence {sequence}"] if sequence is not None else []
        return " ".join(said + ([f"image {digest.hex()[:12]}"] if digest is not None else [])) or "?"

    running = image(hello.installed_sequence, hello.image_digest)
    claimed = image(claim.sequence, claim.digest)
    return f"hello reports {running} after success claimed {claimed}"


# -- silence ------------------------------------------------------------------------------------


class Silent(NamedTuple):
    """An in-progress deployment whose last report is older than its state's cutoff."""

    tenant_id: int
    device_pk: int
    attempt: int
    state: DeviceState


class Expired(NamedTuple):
    """What the device timeout does to a silent deployment."""

    tenant_id: int
    device_pk: int
    attempt: int
    was: DeviceState
    """The state it was silent in (it changes only if still in it when written)."""
    state: DeviceState
    """``pending`` (a retry at ``retry_at``) or ``timed_out``."""
    retry_at: float | None
    detail: str


RESEND_SILENT_S = 20.0
"""A deployment in progress without a report for this long gets its notice again: its last report
may have been lost (a replica died holding it)."""
QUEUE_S_PER_DEVICE = 0.005
"""What one deployment in progress costs the server, the broker and the payload path, about (a few
ms of CPU per device for a whole update: docs/operations.md, Sizing)."""


def resend_silence(in_progress: int, device_timeout_s: float) -> float:
    """How long a deployment in progress may stay silent before its notice is repeated.

    With many in progress at once the last of them waits its turn behind the others (downloads,
    reports) for about their number times what each costs; a repeat sooner finds a device that
    is still working, and only lengthens the queue (at 50,000 devices notified at once, repeats
    were four notices in five). So the silence grows with the deployments in progress, and stays
    under a third of the device timeout, so that a lost report is repeated before it times out.
    """
    return min(RESEND_SILENT_S + in_progress * QUEUE_S_PER_DEVICE, device_timeout_s / 3)


def silence_allowed(seen: Sequence[tuple[float, int]], now: float, device_timeout_s: float) -> float:
    """:func:`resend_silence` for the queue a silent deployment joined, not the one left now.

    ``seen`` holds (time, deployments in progress) as the engine counted them. A deployment
    silent for ``s`` seconds has waited behind what was in progress ``s`` seconds ago, and that
    queue drains while it waits: judged by today's shorter queue alone, the last of 50,000
    devices notified at once had its notice repeated (one in five) while still waiting its turn.
    So the silence allowed covers the most in progress over the time it spans.
    """
    allowed = resend_silence(seen[-1][1] if seen else 0, device_timeout_s)
    while True:
        queued = max((n for t, n in seen if t >= now - allowed), default=0)
        longer = resend_silence(queued, device_timeout_s)
        if longer <= allowed:
            return allowed
        allowed = longer


def timeout_cutoffs(policy: Policy, now: float) -> dict[DeviceState, float]:
    """Per in-progress state, the time before which a deployment's last report makes it silent
    (states without a cutoff never time out now: an install window waits for its opening)."""
    cutoffs = {st: policy.timeout_cutoff(st.value, now) for st in IN_PROGRESS}
    return {st: c for st, c in cutoffs.items() if c is not None}


def expire(silent: Sequence[Silent], policy: Policy, now: float) -> list[Expired]:
    """Silent deployments: retried later when the retry rule allows, timed out otherwise."""
    out = []
    for d in silent:
        at = policy.retry_at(None, d.attempt, now)
        out.append(
            Expired(
                tenant_id=d.tenant_id,
                device_pk=d.device_pk,
                attempt=d.attempt,
                was=d.state,
                state=DeviceState.PENDING if at is not None else DeviceState.TIMED_OUT,
                retry_at=at,
                detail=f"no report for {policy.device_timeout_s:g} s while {d.state.value}",
            )
        )
    return out


# -- which notice a device sees -----------------------------------------------------------------


def notice_kind(state: DeviceState, campaign: CampaignState, group_decision: str | None) -> NoticeKind:
    """The notice a deployment's device should see now (its notice resource, a repeated notice).

    Invited devices see the invitation; a withdrawn deployment or a cancelled campaign shows a
    cancel (an abort, when a group install was aborted); a group member that downloaded sees the
    commit once the group committed; every other deployment in progress sees its update.
    """
    if state == DeviceState.INVITED:
        return NoticeKind.INVITE
    if state == DeviceState.CANCELLED or campaign == CampaignState.CANCELLED:
        return NoticeKind.ABORT if group_decision == "abort" else NoticeKind.CANCEL
    if group_decision == "commit" and state == DeviceState.DOWNLOADED:
        return NoticeKind.COMMIT
    return NoticeKind.UPDATE


def notice_reason(kind: NoticeKind, detail: str | None) -> str | None:
    """A withdrawal (cancel, abort) carries why the deployment was withdrawn; no other notice does."""
    return detail if kind in (NoticeKind.CANCEL, NoticeKind.ABORT) else None
