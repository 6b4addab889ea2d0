"""What ``fwcm demo`` reports: how every device ended, counted apart (a revert is neither a success
nor hidden among failures), checked against what its fault profile calls for."""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from rich.table import Table

ENDS = ("succeeded", "reverted", "failed", "timed_out", "skipped", "cancelled")
"""How devices ended, each counted apart in the result."""


class Setup(Protocol):
    """The demo's options the result repeats."""

    devices: int
    transport: str
    faults: str


def summarize(
    setup: Setup,
    profile: Any,
    stats: dict[str, Any],
    devices: list[dict[str, Any]],
    installed: dict[str, int],
    duration: float,
    total_s: float,
) -> dict[str, Any]:
    """Compare every device's end with what its fault profile calls for.

    A succeeded device must run the new firmware (sequence 2); a failed or reverted one must still
    run the old one (sequence 1), as the devices themselves say.
    """
    by_state = Counter(d["state"] for d in devices)
    ended_early = stats["state"] in ("stopped", "cancelled")
    unexpected = []
    for d in devices:
        index = int(d["device"].split("-")[1])
        expected = profile.expected_outcome(index)
        ok = d["state"] == expected and (
            expected == "succeeded" or d["result"] == int(profile.expected_result(index))
        )
        if not ok and ended_early and d["state"] in ("pending", "cancelled"):
            ok = True
        if profile.name == "revoked":  # installed before the revocation, or refused/withdrawn after
            ok = d["state"] in ("succeeded", "cancelled", "pending") or (
                d["state"] == "failed" and d["result"] == 17  # SIGNER_REVOKED
            )
        running = installed.get(d["device"])
        if (
            ok
            and d["state"] in ("succeeded", "failed", "reverted")
            and running != (2 if d["state"] == "succeeded" else 1)
        ):
            ok = False
        if not ok:
            unexpected.append(
                {
                    "device": d["device"],
                    "state": d["state"],
                    "result": d["result"],
                    "expected": expected,
                    "running_sequence": running,
                }
            )
    failures = Counter(d["result_name"] for d in devices if d["state"] == "failed")
    skips = Counter(d["result_name"] for d in devices if d["state"] == "skipped")
    return {
        "devices": setup.devices,
        "transport": setup.transport,
        "faults": setup.faults,
        "campaign_state": stats.get("state"),
        "stop_reason": stats.get("stop_reason"),
        "notified": sum(1 for d in devices if d["attempt"] > 0),
        **{st: by_state.get(st, 0) for st in ENDS},
        "kept_old_firmware": sum(
            1 for d in devices if d["state"] in ("failed", "reverted") and installed.get(d["device"]) == 1
        ),
        "by_state": dict(sorted(by_state.items())),
        "failure_reasons": dict(failures),
        "skip_reasons": dict(skips),
        "unexpected": unexpected[:20],
        "unexpected_count": len(unexpected),
        "ok": not unexpected and stats.get("state") in ("completed", "stopped", "cancelled"),
        "duration_s": round(duration, 2),
        "total_s": round(total_s, 2),
    }


def summary_table(result: dict[str, Any]) -> Table:
    t = Table(title="fwcm demo — result")
    t.add_column("")
    t.add_column("", justify="right")
    for k in (
        "devices",
        "transport",
        "faults",
        "campaign_state",
        "stop_reason",
        "notified",
        *ENDS,
        "kept_old_firmware",
        "duration_s",
    ):
        t.add_row("reason" if k == "stop_reason" else k, str(result.get(k)))
    for st, n in result["by_state"].items():
        t.add_row(f"state {st}", str(n))
    for reason, n in result["failure_reasons"].items():
        t.add_row(f"failure {reason}", str(n))
    for reason, n in result["skip_reasons"].items():
        t.add_row(f"skipped {reason}", str(n))
    if "delta" in result:
        d = result["delta"]
        t.add_row(
            "bytes sent", f"{d['sent']:,} ({d['delta']:,} in patches to {d['devices_on_delta']} devices)"
        )
        t.add_row("bytes without deltas", f"{d['without_deltas']:,} (sent {d['share']:.1%} of it)")
    t.add_row("as expected", "yes" if result["ok"] else f"NO ({result['unexpected_count']} devices)")
    return t


def small_change(image: bytes) -> bytes:
    """Release 2.0 of the delta demo: release 1.0 with a few hundred bytes changed and a little
    code added, as a small fix changes firmware."""
    changed = bytearray(image)
    middle = len(changed) // 2
    changed[middle : middle + 256] = bytes(b ^ 0x5A for b in changed[middle : middle + 256])
    return bytes(changed) + b"fwcm demo 2.0: new code\n" * 16


def delta_summary(result: dict[str, Any], stats: dict[str, Any], devices: int) -> None:
    """``--delta``: the bytes the fleet fetched with patches and without; every device must have
    succeeded and the fleet fetched at most a third of the full-image bytes."""
    b = stats.get("bytes") or {"delta": 0, "full": 0, "without_deltas": 0, "devices_on_delta": 0}
    sent = b["delta"] + b["full"]
    share = sent / b["without_deltas"] if b["without_deltas"] else 1.0
    result["delta"] = {**b, "sent": sent, "share": round(share, 4)}
    result["ok"] = result["ok"] and result["succeeded"] == devices and share <= 1 / 3


def consent_summary(
    result: dict[str, Any],
    stats: dict[str, Any],
    devices: list[dict[str, Any]],
    profile: Any,
    accounting: dict[str, Any],
) -> None:
    """Every device must end as its owner answered: accepted → installed, declined, or no answer."""
    consent = stats.get("consent") or {}
    result.update(
        faults="consent",
        consent=True,
        accepted=consent.get("accepted", 0),
        declined=consent.get("declined", 0),
        no_answer=consent.get("no_answer", 0),
        accounting={k: accounting.get(k, 0) for k in ("reporting", "total_uses", "removed")},
    )
    expected = {"accept": "succeeded", "decline": "declined", "ignore": "no_answer"}
    wrong = [
        d
        for d in devices
        if d["state"] != expected[profile.for_device(int(d["device"].split("-")[1])).consent]
    ]
    result["unexpected"] = [{"device": d["device"], "state": d["state"]} for d in wrong[:20]]
    result["unexpected_count"] = len(wrong)
    result["ok"] = (
        not wrong
        and result["succeeded"] == result["accepted"] > 0
        and result["declined"] > 0
        and result["accounting"]["removed"] == result["succeeded"]
    )
