"""``campaign watch`` renders one screen that fits 80 columns with every header spelled out."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from fwcm.cli.watch import render

STATES = ("pending", "notified", "downloading", "downloaded", "installing", "succeeded", "failed")
STATES += ("skipped", "timed_out", "cancelled", "invited", "declined", "no_answer")


def stats(**over: Any) -> dict[str, Any]:
    counts = dict.fromkeys(STATES, 0) | {"pending": 38, "notified": 2, "succeeded": 9, "failed": 1}
    base: dict[str, Any] = {
        "id": 12,
        "name": "a campaign with a rather long name that goes on and on",
        "state": "running",
        "stop_reason": None,
        "note": "rate limit: 12 devices/minute",
        "phase": 1,
        "phase_label": "phase 2 (early adopters in every region)",
        "total": 50,
        "counts": counts,
        "phases": {"0": {"succeeded": 4, "failed": 1}, "1": {"succeeded": 5, "notified": 2, "pending": 38}},
        "phase_names": ["phase 1 (canary)", "phase 2 (early adopters in every region)"],
        "per_minute": 11.5,
        "eta_s": 200.0,
        "eta_scope": None,
        "eta_note": None,
        "failures": [{"result": 5, "name": "bad_signature", "count": 1}],
        "consent": None,
    }
    return base | over


def screen(s: dict[str, Any]) -> list[str]:
    console = Console(width=80, record=True, color_system=None, file=io.StringIO())
    console.print(render(s))
    return console.export_text().splitlines()


def test_fits_80_columns_with_full_state_names() -> None:
    lines = screen(stats())
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    for st in ("pending", "notified", "downloading", "downloaded", "installing"):
        assert f" {st}" in text
    for st in ("succeeded", "failed", "skipped", "timed_out", "cancelled"):
        assert f" {st}" in text
    header = next(line for line in lines if "RUNNING" in line)
    assert "RUNNING   phase 2/2 (early adopters" in header
    assert "10/50 done   pace 11.5/min   ETA 3m20s" in text  # succeeded, failed, skipped, timed out
    assert "rate limit: 12 devices/minute" in text


def test_no_consent_columns_without_consent_and_cancels_are_not_done() -> None:
    text = "\n".join(screen(stats()))
    assert "invited" not in text and "no_answer" not in text
    consent = stats(consent={"stage": "granted"})
    assert "no_answer" in "\n".join(screen(consent))
    counts = dict.fromkeys(STATES, 0) | {"succeeded": 2, "cancelled": 48}
    over = screen(stats(state="cancelled", counts=counts, per_minute=None, eta_s=None))
    assert any("2/50 done, 48 cancelled   pace —" in line for line in over)
    assert not any("ETA" in line for line in over)


def test_says_why_there_is_no_eta() -> None:
    paused = stats(state="paused", eta_s=None, eta_note="waiting for approval of phase 2")
    text = "\n".join(screen(paused))
    assert "ETA —" in text and "waiting for approval of phase 2" in text
    gated = stats(eta_scope="end of phase 1 (canary)", eta_note="then waiting for approval of phase 2")
    text = "\n".join(screen(gated))
    assert "ETA 3m20s to end of phase 1 (canary)" in text


def test_a_delta_campaign_shows_its_bytes_and_saving() -> None:
    b = {"delta": 35_010, "full": 659_200, "without_deltas": 6_592_000, "devices_on_delta": 90}
    lines = screen(stats(bytes=b))
    assert max(len(line) for line in lines) <= 80
    assert any("bytes 694,210 sent (35,010 as patches to 90); saved 89% of 6,592,000" in ln for ln in lines)
    assert not any(line.strip("│ ").startswith("bytes") for line in screen(stats()))
