"""What the console draws, computed from counts the store already returned (pure, no I/O):
phase gauges against their thresholds, the stacked bar of device states and the completions
chart as inline SVG geometry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fwcm.rollout.policy import Policy
from fwcm.rollout.states import AGAINST_ERRORS, NOT_FOR_ME, DeviceState
from fwcm.store.console import Bucket

BAR_ORDER = (
    "succeeded",
    "skipped",
    "declined",
    "no_answer",
    "installing",
    "downloaded",
    "downloading",
    "notified",
    "invited",
    "pending",
    "cancelled",
    "reverted",
    "timed_out",
    "failed",
)
"""Left to right in the stacked bar: what ended well, what is under way, what went wrong."""
FAILED = frozenset(st.value for st in AGAINST_ERRORS)
GOOD = frozenset({DeviceState.SUCCEEDED.value} | {st.value for st in NOT_FOR_ME})


@dataclass(frozen=True)
class Segment:
    state: str
    count: int
    percent: float


def stacked_bar(counts: Mapping[str, int]) -> list[Segment]:
    """Non-empty states in ``BAR_ORDER`` with their share of the total (percent)."""
    total = sum(counts.values())
    if total == 0:
        return []
    order = list(BAR_ORDER) + sorted(set(counts) - set(BAR_ORDER))
    return [Segment(st, counts[st], 100.0 * counts[st] / total) for st in order if counts.get(st, 0) > 0]


@dataclass(frozen=True)
class PhaseGauge:
    label: str
    size: int
    current: bool
    success_pct: float
    """Succeeded (or not for the device) of the phase's devices, as the success threshold counts."""
    success_threshold: float
    error_pct: float
    """Failed, timed out or reverted of the notified devices, as the error threshold counts."""
    error_threshold: float | None
    advance: str
    segments: list[Segment]


def _pct(n: int, of: int) -> float:
    return 100.0 * n / of if of else 0.0


def phase_gauges(
    policy: Policy | None, phases: Mapping[str, Mapping[str, int]], current: int
) -> list[PhaseGauge]:
    """One gauge per phase of the policy (or per phase seen, when the policy cannot be read)."""
    count = len(policy.phases) if policy is not None else 0
    indices = sorted(set(range(count)) | {int(p) for p in phases})
    out = []
    for i in indices:
        c = phases.get(str(i), {})
        size = sum(c.values())
        notified = size - c.get(DeviceState.PENDING.value, 0)
        ph = policy.phases[i] if policy is not None and i < count else None
        out.append(
            PhaseGauge(
                label=policy.label(i) if policy is not None and i < count else f"phase {i + 1}",
                size=size,
                current=i == current,
                success_pct=_pct(sum(n for st, n in c.items() if st in GOOD), size),
                success_threshold=ph.success_threshold if ph is not None else 100.0,
                error_pct=_pct(sum(n for st, n in c.items() if st in FAILED), notified),
                error_threshold=ph.error_threshold if ph is not None else None,
                advance=ph.advance if ph is not None else "auto",
                segments=stacked_bar(c),
            )
        )
    return out


@dataclass(frozen=True)
class Chart:
    """Done and failed per bucket as SVG polylines in a ``width`` x ``height`` box."""

    width: int
    height: int
    bucket_s: int
    peak: int
    done: str
    failed: str
    first: float | None
    last: float | None
    total_done: int
    total_failed: int


def bucket_size(span_s: float, max_buckets: int = 120) -> int:
    """Whole minutes per bucket so that ``span_s`` takes at most ``max_buckets`` buckets."""
    minutes = max(1, -(-int(span_s) // (60 * max_buckets)))
    return 60 * minutes


def completions_chart(
    buckets: Sequence[Bucket], start: float, end: float, bucket_s: int, width: int = 600, height: int = 120
) -> Chart:
    """Polylines of succeeded (and not-for-me) and failed devices per bucket from ``start`` to ``end``."""
    first = int(start // bucket_s)
    slots = max(1, int(end // bucket_s) - first + 1)
    done = [0] * slots
    failed = [0] * slots
    for b in buckets:
        i = int(b.start // bucket_s) - first
        if 0 <= i < slots:
            if b.state in FAILED:
                failed[i] += b.count
            else:
                done[i] += b.count
    peak = max([*done, *failed, 1])
    step = width / max(slots - 1, 1)

    def line(values: list[int]) -> str:
        return " ".join(f"{i * step:.1f},{height - height * v / peak:.1f}" for i, v in enumerate(values))

    return Chart(
        width=width,
        height=height,
        bucket_s=bucket_s,
        peak=peak,
        done=line(done),
        failed=line(failed),
        first=first * bucket_s if buckets else None,
        last=(first + slots - 1) * bucket_s if buckets else None,
        total_done=sum(done),
        total_failed=sum(failed),
    )
