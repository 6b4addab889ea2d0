"""What the benchmarks read of a process, of the machine and of a server's metrics: CPU seconds,
memory, counters, the processes busy besides the benchmark."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path


def proc_status_mb(pid: int, field_name: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, in MB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    m = re.search(rf"{field_name}:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples in an exposition text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _cpu_ticks() -> dict[int, int]:
    """User + system clock ticks of every process now (those that vanish are skipped)."""
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
    return ticks


def command_line(pid: int, width: int = 60) -> str:
    """A process's command line (``[name]`` for kernel threads), cut to ``width`` characters."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        cmd = cmd or "[" + Path(f"/proc/{pid}/comm").read_text().strip() + "]"
    except OSError:
        return "?"
    return cmd if len(cmd) <= width else cmd[: width - 3] + "..."


def cpu_use(interval: float = 1.0, exclude: frozenset[int] = frozenset()) -> list[tuple[int, float]]:
    """The processes that used CPU over the next ``interval`` seconds, as (pid, share of one CPU),
    busiest first."""
    before = _cpu_ticks()
    time.sleep(interval)
    after = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    used = [
        (pid, (t - before[pid]) / hz / interval)
        for pid, t in after.items()
        if pid in before and pid not in exclude and t > before[pid]
    ]
    return sorted(used, key=lambda u: -u[1])


def reference_loop_ms() -> float:
    """Milliseconds a fixed pure-Python loop takes (best of three): how fast this machine runs
    Python right now. A shared machine's speed drifts by tens of percent over an hour; figures
    of runs with different reference times are not comparable."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        sum(range(5_000_000))
        best = min(best, time.perf_counter() - t0)
    return best * 1000
