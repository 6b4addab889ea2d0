"""e2e: a whole MQTT campaign with real processes (bench/e2e_campaign.py), at one or more fleet sizes.

Each run starts a fresh broker, server (SQLite) and fleet: 2 ``device_sim`` processes register the
devices and say hello; the campaign is timed from its start request until every device has ended.
Beyond 15,000 devices the devices connect to Mosquitto edges bridged to the server's broker, one
edge and one ``device_sim`` process per 15,000 (a process may hold 20,000 open files here).
CPU seconds are counted over that time for the server, the brokers (edges included) and the
simulator processes; peak RSS (VmHWM) covers the whole run, registration included.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import e2e_campaign

FLEETS = 2
IMAGE_SIZE = 64 * 1024


def e2e_once(devices: int, timeout: float = 600) -> dict[str, Any]:
    ns = argparse.Namespace(
        devices=devices,
        transport="mqtt",
        image_size=IMAGE_SIZE,
        fleets=FLEETS,
        edges=-1,  # e2e_campaign.EDGE_DEVICES per edge beyond that many devices
        database_url="",
        timeout=timeout,
        delta=False,
        json=False,
        verbose=False,
    )
    return dict(asyncio.run(e2e_campaign.main(ns)))


def e2e_runs(devices: int, reps: int) -> list[dict[str, Any]]:
    """``reps`` runs of ``devices`` devices: every run."""
    return [e2e_once(devices) for _ in range(reps)]


def outcome(runs: list[dict[str, Any]]) -> str:
    """``every run completed: succeeded 2,000`` or each run's state and counts."""
    states = {(r["campaign_state"], tuple(sorted(r["counts"].items()))) for r in runs}
    if len(states) == 1:
        state, counts = states.pop()
        what = ", ".join(f"{k} {v:,}" for k, v in counts)
        return f"every run {state}: {what}" if len(runs) > 1 else f"{state}: {what}"
    return "; ".join(f"{r['campaign_state']} {r['counts']}" for r in runs)
