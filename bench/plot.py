"""The scaling curve of the e2e runs as a PNG: end-to-end time, server peak RSS and CPU seconds per
device (server, broker, simulators; in ms) against the fleet size, medians with the range of the runs."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

INSTALL = 'pip install -e ".[bench]"'
CPU_OF = (("server", "server"), ("broker", "broker"), ("simulators", "fleets"))
Value = Callable[[dict[str, Any], int], float]
"""A figure of one run at a fleet size."""


def require_matplotlib() -> None:
    """Fail before any benchmark runs when the plot could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"bench/run --plot needs matplotlib: {INSTALL}") from None


def cpu_ms_per_device(who: str) -> Value:
    return lambda run, devices: 1000 * float(run["cpu_s"][who]) / devices


def _series(by_size: dict[int, list[dict[str, Any]]], value: Value) -> tuple[list[float], list[list[float]]]:
    """Medians and (below, above) error bars of ``value(run, size)`` at each size."""
    med, lo, hi = [], [], []
    for size, runs in sorted(by_size.items()):
        vals = [value(r, size) for r in runs]
        m = statistics.median(vals)
        med.append(m)
        lo.append(m - min(vals))
        hi.append(max(vals) - m)
    return med, [lo, hi]


def plot_scaling(path: str, by_size: dict[int, list[dict[str, Any]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(by_size)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels: list[tuple[str, list[tuple[str, Value]]]] = [
        ("end to end (s)", [("campaign", lambda r, _n: float(r["end_to_end_s"]))]),
        ("server peak RSS (MB)", [("server", lambda r, _n: float(r["server_peak_rss_mb"]))]),
        (
            "CPU time per device (ms)",
            [(who, cpu_ms_per_device(key)) for who, key in CPU_OF],
        ),
    ]
    for ax, (ylabel, lines) in zip(axes, panels, strict=True):
        for label, value in lines:
            med, err = _series(by_size, value)
            ax.errorbar(sizes, med, yerr=err, marker="o", capsize=4, label=label)
        if len(sizes) > 1 and sizes[-1] / sizes[0] >= 10:
            ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("devices")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if len(lines) > 1:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
