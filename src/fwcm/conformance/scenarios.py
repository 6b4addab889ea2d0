"""The scenarios a device must pass, in the order they run, and the verdict on each.

Each scenario sends the device what the fwcm server would (or what an attacker or a bad network
would), waits for what ``docs/protocol.md`` says the device must answer, and returns a
:class:`Verdict`. The device's installed sequence is followed from its reports (key 9), so each
update offers the next sequence whatever an earlier scenario did to the device.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from fwcm import manifest
from fwcm.conformance.kit import Kit, KitSettings, open_kit
from fwcm.protocol import LwState, NoticeKind, Report, Result


@dataclass(frozen=True)
class Verdict:
    scenario: str
    passed: bool
    expected: str
    detail: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class Failed(Exception):
    """A scenario's expectation was not met; the message says what the device did instead."""


def _describe(r: Report | None) -> str:
    if r is None:
        return "no final report"
    return f"{r.state.name}/{r.result.value} {r.result.name.lower()}" + (f" ({r.detail})" if r.detail else "")


def _check_seqs(reports: list[Report]) -> None:
    seqs = [r.seq for r in reports]
    if any(b <= a for a, b in itertools.pairwise(seqs)):
        raise Failed(f"report seq does not grow: {seqs}")


async def _refused(kit: Kit, campaign: int, expected: Result) -> str:
    """The device answered ``campaign`` with Idle/``expected`` without fetching anything."""
    final = await kit.wait_final(campaign)
    if final is None or final.result != expected:
        raise Failed(_describe(final))
    reports = kit.inbox.campaign(campaign)
    if any(r.state != LwState.IDLE for r in reports):
        raise Failed(f"went on to {[r.state.name for r in reports]} before refusing")
    _check_seqs(reports)
    return _describe(final)


# -- the scenarios -----------------------------------------------------------------------------


async def hello(kit: Kit) -> str:
    """A hello (campaign 0) on connecting, MAC'd with the device secret, saying the installed
    sequence (key 9)."""
    got = await kit.inbox.wait(lambda: bool(kit.inbox.hellos()), kit.settings.hello_timeout)
    if not got:
        refused = f"; refused: {kit.inbox.refused[-1]}" if kit.inbox.refused else ""
        raise Failed(f"no hello within {kit.settings.hello_timeout:.0f} s{refused}")
    first = kit.inbox.hellos()[0].report
    if first.installed_sequence is None:
        raise Failed("hello without the installed sequence (key 9)")
    kit.installed = first.installed_sequence
    return f"runs sequence {first.installed_sequence}"


async def forged_notice(kit: Kit) -> str:
    """An update notice MAC'd with another key is ignored: no report, no download."""
    c = kit.campaign()
    image, sha = kit.publish(c)
    envelope = kit.envelope(image, sha, sequence=kit.installed + 1)
    await kit.notify(kit.seal(NoticeKind.UPDATE, c, envelope, key=hashlib.sha256(b"not the secret").digest()))
    await asyncio.sleep(kit.settings.quiet)
    if kit.inbox.campaign(c) or kit.store.of(sha):
        raise Failed(f"acted on it: {_describe(kit.final(c))}, {len(kit.store.of(sha))} fetches")
    return "ignored"


async def bad_signature(kit: Kit) -> str:
    """A manifest whose signature does not verify: Idle/12, nothing fetched."""
    c = kit.campaign()
    image, sha = kit.publish(c)
    good = kit.envelope(image, sha, sequence=kit.installed + 1)
    sig = manifest.decode_envelope(good).signatures[0].signature
    await kit.notify(kit.seal(NoticeKind.UPDATE, c, good.replace(sig, sig[:-1] + bytes([sig[-1] ^ 1]))))
    detail = await _refused(kit, c, Result.SIGNATURE_INVALID)
    if kit.store.of(sha):
        raise Failed("fetched the payload of an unverified manifest")
    return detail


async def wrong_class(kit: Kit) -> str:
    """A manifest for another device class: Idle/13, nothing fetched."""
    c = kit.campaign()
    image, sha = kit.publish(c)
    other = manifest.class_id_for(kit.settings.vendor_id, "fwcm-conformance-other-class")
    await kit.notify(
        kit.seal(NoticeKind.UPDATE, c, kit.envelope(image, sha, sequence=kit.installed + 1, class_id=other))
    )
    detail = await _refused(kit, c, Result.CONDITION_MISMATCH)
    if kit.store.of(sha):
        raise Failed("fetched the payload of a manifest for another class")
    return detail


async def _update(kit: Kit, c: int, image: bytes, sha: str) -> Report:
    """Wait for a successful update of ``campaign`` to ``kit.installed + 1`` (the notice is sent)."""
    target = kit.installed + 1
    final = await kit.wait_final(c)
    if final is None or final.result != Result.SUCCESS:
        raise Failed(_describe(final))
    reports = kit.inbox.campaign(c)
    _check_seqs(reports)
    states = [r.state for r in reports]
    for needed in (LwState.DOWNLOADING, LwState.DOWNLOADED, LwState.UPDATING):
        if needed not in states:
            raise Failed(f"success without a {needed.name} report: {[s.name for s in states]}")
    if final.installed_sequence != target:
        raise Failed(f"success reports sequence {final.installed_sequence}, expected {target}")
    if not kit.store.of(sha):
        raise Failed("success without fetching the payload")
    kit.last_update = (c, hashlib.sha256(image).digest(), target)
    return final


async def valid_update(kit: Kit) -> str:
    """A signed manifest of the next sequence: Downloading, Downloaded, Updating, Idle/1 running
    the new sequence."""
    c = kit.campaign()
    image, sha = kit.publish(c)
    await kit.notify(kit.seal(NoticeKind.UPDATE, c, kit.envelope(image, sha, sequence=kit.installed + 1)))
    final = await _update(kit, c, image, sha)
    return f"runs sequence {final.installed_sequence}"


async def trial_boot(kit: Kit) -> str:
    """After the reboot the device says hello with the new sequence (and image digest, key 15)
    before it confirms and reports success, which carries that digest and names that hello
    (key 16)."""
    if kit.last_update is None:
        raise Failed("no successful update to judge")
    c, digest, sequence = kit.last_update
    received = kit.inbox.reports
    updating = next(
        i for i, r in enumerate(received) if r.report.campaign == c and r.report.state == LwState.UPDATING
    )  # valid-update saw both, or it would not have recorded last_update
    success = next(
        i for i, r in enumerate(received) if r.report.campaign == c and r.report.result == Result.SUCCESS
    )
    boot = [r.report for r in received[updating:success] if r.report.campaign == 0]
    if not boot:
        raise Failed("no hello between Updating and success: success was not sent after a reboot")
    if boot[-1].installed_sequence != sequence:
        raise Failed(f"hello after reboot runs sequence {boot[-1].installed_sequence}, not {sequence}")
    said = received[success].report.image_digest
    if said is not None and said != digest:
        raise Failed("success reports another image digest (key 15) than the manifest's")
    if boot[-1].image_digest is not None and boot[-1].image_digest != digest:
        raise Failed("hello after reboot reports another image digest (key 15)")
    named = received[success].report.boot_hello
    if named is not None and named != boot[-1].seq:
        raise Failed(f"success names hello {named} as its boot's (key 16), but that boot sent {boot[-1].seq}")
    return (
        "hello, then success"
        + (" with the image digest" if said is not None else " (no key 15)")
        + (" naming its boot's hello" if named is not None else " (no key 16)")
    )


async def replayed_notice(kit: Kit) -> str:
    """The notice of a finished update delivered again: nothing fetched or installed (re-sending
    the same final report is allowed)."""
    if kit.last_update is None or kit.last_notice is None:
        raise Failed("no finished update to replay")
    c = kit.last_update[0]
    before = len(kit.inbox.campaign(c))
    fetches = len(kit.store.fetches)
    await kit.side.notify(kit.last_notice)
    await asyncio.sleep(kit.settings.quiet)
    after = kit.inbox.campaign(c)[before:]
    wrong = [r for r in after if (r.state, r.result) != (LwState.IDLE, Result.SUCCESS)]
    if wrong or len(kit.store.fetches) > fetches:
        got = ", ".join(f"{r.state.name}/{r.result.value}" for r in wrong)
        raise Failed(f"acted on the replay: {got or 'no report'}, {len(kit.store.fetches) - fetches} fetches")
    return "ignored" if not after else "final report repeated"


async def duplicate_notice(kit: Kit) -> str:
    """The same update notice twice while downloading: one download, one install, one success."""
    c = kit.campaign()
    gate = asyncio.Event()
    image, sha = kit.publish(c, gate=gate)
    sealed = kit.seal(NoticeKind.UPDATE, c, kit.envelope(image, sha, sequence=kit.installed + 1))
    await kit.notify(sealed)
    try:
        if not await kit.wait_for(lambda: bool(kit.store.of(sha))):
            raise Failed(f"never started downloading: {_describe(kit.final(c))}")
        await kit.side.notify(sealed)
        await asyncio.sleep(min(1.0, kit.settings.quiet))
    finally:
        gate.set()
    await _update(kit, c, image, sha)
    states = [r.state for r in kit.inbox.campaign(c)]
    starts = [f.start for f in kit.store.of(sha)]
    if states.count(LwState.UPDATING) != 1 or starts.count(0) != 1:
        raise Failed(f"acted twice: {states.count(LwState.UPDATING)} installs, downloads from {starts}")
    return "one download, one install"


async def tampered_image(kit: Kit) -> str:
    """The payload served differs from the manifest's digest: Idle/5, the old image kept."""
    c = kit.campaign()
    before = kit.installed
    image, sha = kit.publish(c, tampered=True)
    await kit.notify(kit.seal(NoticeKind.UPDATE, c, kit.envelope(image, sha, sequence=before + 1)))
    final = await kit.wait_final(c)
    if final is None or final.result != Result.INTEGRITY_FAILURE:
        raise Failed(_describe(final))
    reports = kit.inbox.campaign(c)
    _check_seqs(reports)
    if any(r.state == LwState.UPDATING for r in reports):
        raise Failed("installed the image before refusing it")
    if final.installed_sequence not in (None, before):
        raise Failed(f"runs sequence {final.installed_sequence} after refusing, not {before}")
    return _describe(final)


async def rollback(kit: Kit) -> str:
    """A manifest older than the installed sequence: Idle/14, nothing fetched."""
    if kit.installed < 1:
        raise Failed("the device runs sequence 0: no older sequence to offer")
    c = kit.campaign()
    image, sha = kit.publish(c)
    await kit.notify(kit.seal(NoticeKind.UPDATE, c, kit.envelope(image, sha, sequence=kit.installed - 1)))
    detail = await _refused(kit, c, Result.ROLLBACK_REFUSED)
    if kit.store.of(sha):
        raise Failed("fetched the payload of an older sequence")
    return detail


async def cancel(kit: Kit) -> str:
    """A cancel notice while downloading: Idle/10, nothing installed."""
    c = kit.campaign()
    before = kit.installed
    gate = asyncio.Event()
    image, sha = kit.publish(c, gate=gate)
    await kit.notify(kit.seal(NoticeKind.UPDATE, c, kit.envelope(image, sha, sequence=before + 1)))
    try:
        if not await kit.wait_for(lambda: bool(kit.store.of(sha))):
            raise Failed(f"never started downloading: {_describe(kit.final(c))}")
        await kit.notify(kit.seal(NoticeKind.CANCEL, c))
        final = await kit.wait_final(c)
    finally:
        gate.set()
    if final is None or final.result != Result.CANCELLED:
        raise Failed(_describe(final))
    if any(r.state == LwState.UPDATING for r in kit.inbox.campaign(c)):
        raise Failed("installed although cancelled while downloading")
    if final.installed_sequence not in (None, before):
        raise Failed(f"runs sequence {final.installed_sequence} after the cancel, not {before}")
    return _describe(final)


async def resume(kit: Kit) -> str:
    """The payload transfer breaks half-way once: the device fetches the rest from where it was
    (HTTP Range, or the next CoAP block), not from the start, and installs."""
    c = kit.campaign()
    image, sha = kit.publish(c, drop_at=kit.settings.image_size // 2)
    await kit.notify(kit.seal(NoticeKind.UPDATE, c, kit.envelope(image, sha, sequence=kit.installed + 1)))
    await _update(kit, c, image, sha)
    fetches = kit.store.of(sha)
    payload = kit.store.payloads[sha]
    if not payload.dropped:
        raise Failed("the transfer was never interrupted")
    later = [f.start for f in fetches if f.at > payload.dropped_when]
    if not later or min(later) == 0:
        raise Failed(f"downloaded again from byte 0 (requests from {[f.start for f in fetches]})")
    return f"resumed at byte {min(later)}"


Scenario = Callable[[Kit], Awaitable[str]]
SCENARIOS: dict[str, Scenario] = {
    "hello": hello,
    "forged-notice": forged_notice,
    "bad-signature": bad_signature,
    "wrong-class": wrong_class,
    "valid-update": valid_update,
    "trial-boot": trial_boot,
    "replayed-notice": replayed_notice,
    "duplicate-notice": duplicate_notice,
    "tampered-image": tampered_image,
    "rollback": rollback,
    "cancel": cancel,
    "resume": resume,
}
"""Every scenario, in the order it runs."""
REQUIRES = {"trial-boot": "valid-update", "replayed-notice": "valid-update"}
"""Scenarios that judge what another one did, which runs with them."""


def expectation(name: str) -> str:
    """A scenario's expectation: the first sentence of its docstring."""
    doc = (SCENARIOS[name].__doc__ or "").strip()
    return " ".join(doc.split())


async def run(
    settings: KitSettings, only: list[str] | None = None, *, listening: Callable[[], object] | None = None
) -> list[Verdict]:
    """Run the scenarios (``only`` these and what they require, in their order; ``hello`` always
    runs first) against the device; a device that never says hello fails every scenario.
    ``listening`` is called once the kit's servers are up, which is when the device should start."""
    wanted = set(SCENARIOS if only is None else only) | {"hello"}
    wanted |= {REQUIRES[n] for n in wanted if n in REQUIRES}
    names = [n for n in SCENARIOS if n in wanted]
    verdicts: list[Verdict] = []
    async with open_kit(settings) as kit:
        if listening is not None:
            listening()
        for name in names:
            started = time.monotonic()
            try:
                detail, passed = await asyncio.wait_for(SCENARIOS[name](kit), settings.timeout * 2), True
            except Failed as exc:
                detail, passed = str(exc), False
            except TimeoutError:
                detail, passed = f"no outcome within {settings.timeout * 2:.0f} s", False
            verdicts.append(
                Verdict(name, passed, expectation(name), f"{detail} [{time.monotonic() - started:.1f} s]")
            )
            if name == "hello" and not passed:
                rest = [n for n in names if n != "hello"]
                verdicts += [Verdict(n, False, expectation(n), "not run: no hello") for n in rest]
                break
            await kit.settle()
    return verdicts


def all_passed(verdicts: list[Verdict]) -> bool:
    return bool(verdicts) and all(v.passed for v in verdicts)
