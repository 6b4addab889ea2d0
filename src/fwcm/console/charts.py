"""What the console draws, computed from counts the store already returned (pure, no I/O):
phase gauges against their thresholds (counted as ``rollout.planner`` counts them), the stacked
bar of device states and the completions chart as inline SVG geometry."""

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
    error_min_devices: int
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
                error_min_devices=ph.error_min_devices if ph is not None else 1,
                advance=ph.advance if ph is not None else "auto",
                segments=stacked_bar(c),
            )
        )
    return out


@dataclass(frozen=True)
class Column:
    """One bucket of the chart: its x and width, and the heights of its done and failed parts."""

    x: float
    width: float
    done: int
    failed: int
    done_h: float
    failed_h: float


@dataclass(frozen=True)
class Chart:
    """Done and failed devices per bucket as stacked columns in a ``width`` x ``height`` box."""

    width: int
    height: int
    bucket_s: int
    peak: int
    columns: list[Column]
    total_done: int
    total_failed: int


def bucket_size(span_s: float, max_buckets: int = 120) -> int:
    """Whole minutes per bucket so that ``span_s`` takes at most ``max_buckets`` buckets."""
    minutes = max(1, -(-int(span_s) // (60 * max_buckets)))
    return 60 * minutes


def completions_chart(
    buckets: Sequence[Bucket], start: float, end: float, bucket_s: int, width: int = 600, height: int = 120
) -> Chart | None:
    """Devices done (succeeded, or not for them) and failed per bucket from ``start`` to ``end``;
    None before anything completed."""
    if not buckets:
        return None
    first = int(start // bucket_s)
    slots = max(1, int(end // bucket_s) - first + 1)
    done = [0] * slots
    failed = [0] * slots
    for b in buckets:
        i = min(max(int(b.start // bucket_s) - first, 0), slots - 1)
        if b.state in FAILED:
            failed[i] += b.count
        else:
            done[i] += b.count
    peak = max(d + f for d, f in zip(done, failed, strict=True)) or 1
    step = width / max(slots, 8)  # a young campaign's few columns stay narrow
    columns = [
        Column(i * step, max(step - 2, 1), d, f, height * d / peak, height * f / peak)
        for i, (d, f) in enumerate(zip(done, failed, strict=True))
    ]
    return Chart(width, height, bucket_s, peak, columns, sum(done), sum(failed))
