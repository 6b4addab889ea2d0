"""Rollout policy (pure): how many devices to notify now, and when a campaign ends.

The policy sees only deployment counts per state, its own small state (what it notified when)
and the current time; the engine supplies all three and carries out the decision.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fwcm.rollout.states import DEVICE_TERMINAL, CampaignState, DeviceState

DEFAULT_BATCH = 1000


class PolicyError(ValueError):
    pass


@dataclass
class PolicyState:
    """What the policy remembers between decisions: notification times for the rate limit."""

    notified_at: list[tuple[float, int]] = field(default_factory=list)

    def record_notified(self, n: int, now: float) -> None:
        self.notified_at.append((now, n))

    def notified_since(self, since: float) -> int:
        self.notified_at = [(t, n) for t, n in self.notified_at if t > since]
        return sum(n for _, n in self.notified_at)


@dataclass(frozen=True)
class Decision:
    notify: int


@dataclass(frozen=True)
class Policy:
    rate_per_minute: float | None = None
    batch_max: int = DEFAULT_BATCH
    error_threshold_percent: float | None = None
    error_min_devices: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        try:
            rate = d.get("rate_per_minute")
            err = d.get("error_threshold_percent")
            return cls(
                rate_per_minute=float(rate) if rate is not None else None,
                batch_max=int(d.get("batch_max", DEFAULT_BATCH)),
                error_threshold_percent=float(err) if err is not None else None,
                error_min_devices=int(d.get("error_min_devices", 1)),
            )
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"invalid policy: {exc}") from exc

    def decide(self, counts: Counter[str], state: PolicyState, now: float) -> Decision:
        pending = counts.get(DeviceState.PENDING.value, 0)
        budget = min(pending, self.batch_max)
        if self.rate_per_minute is not None:
            allowed = int(self.rate_per_minute) - state.notified_since(now - 60.0)
            budget = min(budget, max(allowed, 0))
        return Decision(notify=budget)

    def finished(self, counts: Counter[str]) -> tuple[CampaignState, str | None] | None:
        total = sum(counts.values())
        failed = counts.get(DeviceState.FAILED.value, 0) + counts.get(DeviceState.TIMED_OUT.value, 0)
        if self.error_threshold_percent is not None and total and failed >= self.error_min_devices:
            pct = 100.0 * failed / total
            if pct >= self.error_threshold_percent:
                return CampaignState.STOPPED, (
                    f"error threshold: {failed} of {total} devices failed ({pct:.1f}% >= "
                    f"{self.error_threshold_percent:g}%)"
                )
        done = sum(n for st, n in counts.items() if DeviceState(st) in DEVICE_TERMINAL)
        if done == total:
            return CampaignState.COMPLETED, None
        return None
