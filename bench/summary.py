"""Medians of repeated runs with their spread: how bench/run prints every figure.

A single run on a shared machine says little: other work slows some runs down.  Every figure is
the median of the runs, printed with the range of the runs and the spread (half the range, as a
share of the median), so that a reader sees at once how far a figure can be trusted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """The runs of one figure; runs that failed (NaN) are counted but left out of the median."""

    values: tuple[float, ...]

    @property
    def ok(self) -> list[float]:
        return [v for v in self.values if not math.isnan(v)]

    @property
    def failed(self) -> int:
        return len(self.values) - len(self.ok)

    @property
    def median(self) -> float:
        return statistics.median(self.ok) if self.ok else float("nan")

    @property
    def lo(self) -> float:
        return min(self.ok, default=float("nan"))

    @property
    def hi(self) -> float:
        return max(self.ok, default=float("nan"))

    @property
    def spread(self) -> float:
        """Half the range of the runs as a share of the median (0.03 for ±3 %)."""
        if self.hi == self.lo:
            return 0.0
        return (self.hi - self.lo) / 2 / self.median if self.median else float("nan")


def summarize(values: Iterable[float]) -> Summary:
    return Summary(tuple(float(v) for v in values))


def number(x: float, digits: int = 0) -> str:
    """``9,822`` or ``0.81``: thousands separated, ``digits`` decimals."""
    return "n/a" if math.isnan(x) else f"{x:,.{digits}f}"


def percent(share: float) -> str:
    if math.isnan(share):
        return "n/a"
    return f"±{share * 100:.0f}%" if share * 100 >= 1 or share == 0 else f"±{share * 100:.1f}%"


def significant(x: float, figures: int = 3) -> int:
    """Decimals that show ``x`` with about ``figures`` significant figures (1.23, 123; at most 3)."""
    if math.isnan(x) or x == 0:
        return 0
    return min(3, max(0, figures - 1 - math.floor(math.log10(abs(x)))))


def figure(s: Summary, unit: str = "", digits: int | None = None) -> str:
    """The figure of a line: ``9,822/s (median of 3; runs 9,500-10,100, spread ±3%)``; ``digits``
    decimals, or about three significant figures when None."""
    if not s.ok:
        return f"failed ({len(s.values)} runs)"
    digits = significant(s.median) if digits is None else digits
    value = number(s.median, digits) + unit
    failed = f"; {s.failed} failed" if s.failed else ""
    if len(s.ok) == 1:
        return f"{value} (1 run{failed})"
    runs = f"runs {number(s.lo, digits)}-{number(s.hi, digits)}"
    return f"{value} (median of {len(s.ok)}{failed}; {runs}, spread {percent(s.spread)})"
