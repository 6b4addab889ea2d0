"""What the benchmarks read of a process and of a server's metrics: CPU seconds, memory, counters."""

from __future__ import annotations

import os
import re
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
