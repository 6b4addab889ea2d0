"""Webhook rules: URL and event checks, backoff, signatures, and how stored rows become events."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from fwcm import webhooks as rules
from fwcm.errors import Invalid
from fwcm.rollout import planner
from fwcm.rollout.policy import Policy
from fwcm.rollout.states import CampaignState

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000/hook", "https://hooks.example.com/fwcm?x=1", "https://[::1]:8443/"]
)
def test_http_and_https_urls_are_accepted(url: str) -> None:
    assert rules.check_url(f"  {url} ") == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/x", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("javascript:alert(1)", "only http and https"),
        ("http:///path", "names no host"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://example.com/a b", "spaces"),
        ("https://example.com/#frag", "fragment"),
        ("https://example.com:99999/", "url:"),
        ("https://example.com/" + "a" * rules.MAX_URL, "longer than"),
        ("", "required"),
        (17, "required"),
    ],
)
def test_other_urls_are_refused_naming_why(url: object, why: str) -> None:
    with pytest.raises(Invalid, match=why):
        rules.check_url(url)


def test_events_are_checked_and_put_in_canonical_order() -> None:
    assert rules.check_events(None) is None
    assert rules.check_events([]) is None
    assert rules.check_events([rules.DEVICE_FAILED, rules.CAMPAIGN_STATE, rules.DEVICE_FAILED]) == [
        rules.CAMPAIGN_STATE,
        rules.DEVICE_FAILED,
    ]
    with pytest.raises(Invalid, match=r"unknown campaign\.nope"):
        rules.check_events(["campaign.nope"])
    with pytest.raises(Invalid, match="list"):
        rules.check_events("campaign.state_changed")


def test_backoff_doubles_up_to_a_cap_then_gives_up() -> None:
    delays = [rules.backoff(n, 10.0) for n in range(1, rules.MAX_ATTEMPTS + 1)]
    assert delays[:4] == [10.0, 20.0, 40.0, 80.0]
    assert delays[-1] is None  # the last try failed: given up
    assert all(d is not None for d in delays[:-1])
    assert rules.backoff(3, 1000.0) == rules.MAX_BACKOFF_S
    assert rules.backoff(2, 1.0, max_attempts=2) is None


def test_signature_is_hmac_sha256_over_timestamp_and_exact_body() -> None:
    body = b'{"id":"e5","type":"campaign.state_changed"}'
    sig = rules.signature("s3cret", 1764590400, body)
    expected = hmac.new(b"s3cret", b"1764590400." + body, hashlib.sha256).hexdigest()
    assert sig == f"sha256={expected}"
    assert rules.verify("s3cret", 1764590400, body, sig)
    assert not rules.verify("s3cret", 1764590401, body, sig)  # a replay with a new timestamp
    assert not rules.verify("s3cret", 1764590400, body + b" ", sig)
    assert not rules.verify("other", 1764590400, body, sig)
    h = rules.headers("s3cret", "e5", rules.CAMPAIGN_STATE, 1764590400, body)
    assert h[rules.SIGNATURE_HEADER] == sig and h[rules.TIMESTAMP_HEADER] == "1764590400"
    assert h[rules.ID_HEADER] == "e5" and h[rules.EVENT_HEADER] == rules.CAMPAIGN_STATE


def _row(id: int, state: str, reason: str | None, kind: str | None = None) -> rules.CampaignEventRow:
    return rules.CampaignEventRow(id, 7, "spring", T0, state, reason, kind)


def test_campaign_event_rows_become_typed_events() -> None:
    started = rules.campaign_event(_row(1, "running", "started with 3 devices"))
    assert started is not None and started.type == rules.CAMPAIGN_STATE
    assert started.data == {
        "campaign": {"id": 7, "name": "spring"},
        "state": "running",
        "reason": "started with 3 devices",
    }
    phase = rules.campaign_event(_row(2, "running", "phase 2 begins", "phase"))
    assert phase is not None and phase.type == rules.PHASE_ADVANCED
    assert phase.data["phase"] == "phase 2 begins"
    assert rules.campaign_event(_row(3, "running", "consent granted: 3 of 3", "note")) is None
    cancelled = rules.campaign_event(_row(4, "cancelled", "cancel requested"))
    assert cancelled is not None and cancelled.type == rules.CAMPAIGN_STATE


def _decision_reason(counts: dict[str, int], on_error: str, **phase: object) -> tuple[CampaignState, str]:
    """The transition the planner makes for phase 1 of two with these counts."""
    policy = Policy.from_dict({"on_error": on_error, "phases": [{"size": 3, **phase}, {}]})
    view = planner.CampaignView(CampaignState.RUNNING, 0, {0: Counter(counts), 1: Counter(pending=5)})
    d = planner.decide(policy, view, planner.PolicyState(), T0.timestamp())
    assert d.transition is not None
    return d.transition


def test_the_engines_threshold_stops_are_recognised() -> None:
    """The classification follows the engine's own reasons: if the planner words them otherwise,
    this fails."""
    state, reason = _decision_reason(
        {"failed": 2, "succeeded": 1}, "stop", error_threshold="50%", error_min_devices=1
    )
    assert state == CampaignState.STOPPED and rules.is_threshold_stop(reason)
    ev = rules.campaign_event(_row(9, state.value, reason))
    assert ev is not None and ev.type == rules.THRESHOLD_STOPPED
    state, reason = _decision_reason({"failed": 2, "succeeded": 1}, "pause", success_threshold="90%")
    assert state == CampaignState.PAUSED and rules.is_threshold_stop(reason)
    assert not rules.is_threshold_stop("cancel requested")
    assert not rules.is_threshold_stop(None)
    manual = rules.campaign_event(_row(10, "stopped", "stopped by operator"))
    assert manual is not None and manual.type == rules.CAMPAIGN_STATE


def _failure(id: int, campaign: int, device: str, state: str = "failed") -> rules.FailureRow:
    at = T0 + timedelta(seconds=id)
    return rules.FailureRow(id, campaign, f"c{campaign}", device, at, state, 5, "boom")


def test_failures_are_batched_per_campaign_and_bounded() -> None:
    rows = [_failure(i, 1, f"d{i}") for i in range(1, 6)] + [_failure(10, 2, "x", "timed_out")]
    events = rules.failure_events(rows, limit=3)
    assert [e.type for e in events] == [rules.DEVICE_FAILED, rules.DEVICE_FAILED]
    first, second = events
    assert first.data["campaign"] == {"id": 1, "name": "c1"}
    assert first.data["count"] == 5 and first.data["truncated"] is True
    assert [d["name"] for d in first.data["devices"]] == ["d1", "d2", "d3"]
    assert first.at == rows[4].at and first.key == "d1-5"
    assert second.data["count"] == 1 and second.data["devices"][0]["state"] == "timed_out"
    assert second.data["truncated"] is False


def test_a_timeout_with_a_retry_ahead_is_not_a_failure() -> None:
    assert rules.is_failure("failed", None)
    assert rules.is_failure("timed_out", "timed out")
    assert not rules.is_failure("timed_out", "retry scheduled")
    assert not rules.is_failure("succeeded", None)


def test_body_is_compact_json_with_id_type_tenant_time_and_data() -> None:
    ev = rules.Event(rules.CAMPAIGN_STATE, T0, "c3", {"state": "running"})
    eid = rules.event_id()
    assert eid != rules.event_id() and len(eid) == 36
    raw = rules.body(eid, "acme", ev)
    assert json.loads(raw) == {
        "id": eid,
        "type": rules.CAMPAIGN_STATE,
        "tenant": "acme",
        "at": "2026-12-01T12:00:00Z",
        "data": {"state": "running"},
    }
    assert b" " not in raw and rules.body(eid, "acme", ev) == raw


def test_errors_are_kept_short_on_one_line() -> None:
    assert rules.short_error("a\n  b") == "a b"
    long = rules.short_error("x" * 1000)
    assert len(long) == rules.MAX_ERROR and long.endswith("…")
