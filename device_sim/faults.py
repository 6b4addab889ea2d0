"""Fault profiles: which simulated devices misbehave, how, and what outcome that must produce.

The choice is a pure function of the device's index in the fleet, so a demo or a test can say in
advance how every device has to end (``expected_outcome``/``expected_result``) and check it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fwcm.protocol import Result

Outcome = Literal["succeeded", "failed", "reverted"]


@dataclass(frozen=True)
class DeviceFaults:
    """How one device misbehaves.  The default is a well-behaved device."""

    online_delay: float = 0.0
    """Seconds before the device first connects."""
    drop_at: float | None = None
    """Fraction of the payload after which the connection drops once (download then resumes)."""
    corrupt: bool = False
    """Payload bytes are altered in transit: the digest check must fail."""
    install_fail: bool = False
    """The install step fails after UPDATING: UPDATE_FAILED, old image kept."""
    boot_fail: bool = False
    """The new image fails its health check on its trial boot: the device resets unconfirmed,
    the bootloader falls back and the device runs (and reports) its previous image."""
    out_of_memory: bool = False
    """The device has not the RAM the update needs: OUT_OF_RAM before downloading."""
    throttle_bps: int | None = None
    """Download rate limit in bytes per second."""
    step_delay: float = 0.0
    """Pause between state changes (verify, downloaded, install)."""
    attest_forged: bool = False
    """Rogue: signs its attestation with a key that is not the one registered for it."""
    attest_replay: bool = False
    """Rogue: answers a nonce with an attestation recorded earlier instead of a fresh one."""
    skip_digest_check: bool = False
    """Nonconformant: installs a downloaded image whatever its SHA-256 (size is still checked)."""
    accept_rollback: bool = False
    """Nonconformant: installs a manifest whose sequence is lower than the installed one."""
    accept_replays: bool = False
    """Nonconformant: acts again on an update notice of an attempt it already finished."""
    consent: str = "accept"
    """How the device's owner answers invitations: accept, decline or ignore."""
    choice: dict[str, str] = field(default_factory=dict)
    """Options chosen when accepting (the first value offered otherwise)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Room for later device-side behaviours (consent answers, rogue attestations, ...)."""

    @property
    def any(self) -> bool:
        return self != DeviceFaults()


@dataclass(frozen=True)
class FaultProfile:
    """A named fault applied to every ``every``-th device starting at ``offset``."""

    name: str
    description: str
    every: int = 10
    offset: int = 3
    failure: Result | None = None
    """Result the affected devices must end with; None means they still succeed."""

    def affected(self, index: int) -> bool:
        if self.name == "none" or self.every <= 0:
            return False
        return index % self.every == self.offset % self.every

    def for_device(self, index: int) -> DeviceFaults:
        if not self.affected(index):
            return DeviceFaults()
        spread = (index // self.every) % 5  # vary parameters a little across affected devices
        match self.name:
            case "flaky":
                return DeviceFaults(drop_at=0.3 + 0.1 * spread)
            case "corrupt":
                return DeviceFaults(corrupt=True)
            case "install-fail":
                return DeviceFaults(install_fail=True)
            case "out-of-memory":
                return DeviceFaults(out_of_memory=True)
            case "boot-fail":
                return DeviceFaults(boot_fail=True)
            case "offline":
                return DeviceFaults(online_delay=2.0 + 0.5 * spread)
            case "slow":
                return DeviceFaults(throttle_bps=48 * 1024, step_delay=0.2 + 0.1 * spread)
            case "rogue":
                return DeviceFaults(attest_forged=spread % 2 == 0, attest_replay=spread % 2 == 1)
            case "consent":
                answer = ("accept", "accept", "accept", "decline", "ignore")[index % 5]
                return DeviceFaults(consent=answer, choice={"variant": ("basic", "pro")[index % 2]})
            case "nonconformant":
                return DeviceFaults(skip_digest_check=True, accept_rollback=True, accept_replays=True)
            case "revoked":
                return DeviceFaults(step_delay=0.3)  # slow enough to be caught mid-update
        return DeviceFaults()

    def expected_result(self, index: int) -> Result:
        if self.failure is not None and self.affected(index):
            return self.failure
        return Result.SUCCESS

    def expected_outcome(self, index: int) -> Outcome:
        result = self.expected_result(index)
        if result == Result.SUCCESS:
            return "succeeded"
        return "reverted" if result == Result.REVERTED else "failed"

    def count_affected(self, devices: int) -> int:
        return sum(1 for i in range(devices) if self.affected(i))


PROFILES: dict[str, FaultProfile] = {
    p.name: p
    for p in (
        FaultProfile("none", "every device behaves", every=0),
        FaultProfile("flaky", "every 5th device loses its connection mid-download once, then resumes", 5, 1),
        FaultProfile(
            "corrupt", "every 10th device receives altered payload bytes", 10, 3, Result.INTEGRITY_FAILURE
        ),
        FaultProfile("install-fail", "every 10th device fails to install", 10, 5, Result.UPDATE_FAILED),
        FaultProfile(
            "out-of-memory", "every 10th device lacks the RAM the update needs", 10, 4, Result.OUT_OF_RAM
        ),
        FaultProfile(
            "boot-fail",
            "every 10th device boots the new image, fails its health check, and its bootloader reverts",
            10,
            6,
            Result.REVERTED,
        ),
        FaultProfile("offline", "every 5th device comes online only after a few seconds", 5, 2),
        FaultProfile("slow", "every 3rd device downloads throttled and pauses between steps", 3, 0),
        FaultProfile(
            "rogue",
            "every 10th device is rogue: a forged attestation key, or a replayed attestation",
            10,
            7,
            Result.ATTESTATION_REFUSED,
        ),
        FaultProfile(
            "nonconformant",
            "every device breaks the protocol: no digest check, no rollback protection, acts on replays",
            every=1,
            offset=0,
        ),
        FaultProfile(
            "revoked",
            "the manifest's signer is revoked while devices update: the rest refuse or never get it",
            every=1,
            offset=0,
        ),
        FaultProfile(
            "consent",
            "owners answer invitations: 3 in 5 accept (basic or pro), 1 declines, 1 ignores it",
            every=1,
            offset=0,
        ),
        FaultProfile(
            "dev-build",
            "a developer build, certified for the hardware IDs of every 2nd device, offered to all",
            2,
            1,
            Result.HARDWARE_NOT_LISTED,
        ),
    )
}
SCENARIOS = ("revoked", "dev-build")
"""Profiles that shape what the server offers (the demo plays them) rather than how devices act."""


def get_profile(name: str) -> FaultProfile:
    """Look a profile up by name; the error lists the valid names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown fault profile {name!r}; choose one of {', '.join(PROFILES)}") from None
