"""Webhook rules (pure): which URLs a tenant may register, which events exist and how they are
rendered, how a body is signed, and when a failed delivery is tried again.

The server (``fwcm.server.webhooks``) tails what it already records in the transaction of each
change (campaign events, device history) and turns it into deliveries with these rules; the store
(``fwcm.store.webhooks``) keeps webhooks and deliveries. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from fwcm.errors import Invalid

MAX_URL = 2048
"""Longest webhook URL accepted."""
PER_TENANT = 10
"""Webhooks a tenant may register."""
MAX_ATTEMPTS = 8
"""Tries of one delivery before it is given up (logged as ``failed``)."""
MAX_BACKOFF_S = 3600.0
MAX_DEVICES_PER_EVENT = 100
"""Failed devices listed by name in one ``device.failed`` event; the rest are only counted."""
MAX_ERROR = 200
"""Characters of a delivery error kept in the log."""

CAMPAIGN_STATE = "campaign.state_changed"
PHASE_ADVANCED = "campaign.phase_advanced"
THRESHOLD_STOPPED = "campaign.threshold_stopped"
DEVICE_FAILED = "device.failed"
EVENT_TYPES = (CAMPAIGN_STATE, PHASE_ADVANCED, THRESHOLD_STOPPED, DEVICE_FAILED)

SIGNATURE_HEADER = "X-Fwcm-Signature"
TIMESTAMP_HEADER = "X-Fwcm-Timestamp"
EVENT_HEADER = "X-Fwcm-Event"
ID_HEADER = "X-Fwcm-Event-Id"

FAILED_STATES = frozenset({"failed", "timed_out", "reverted"})
"""Device states that end a device's part in a campaign badly (``device.failed``)."""
_THRESHOLD = re.compile(r"\b(error|success) threshold of .* (crossed|not reached)")


def check_url(url: Any) -> str:
    """A URL the server may call: http or https, with a host, no credentials, bounded."""
    if not isinstance(url, str) or not url.strip():
        raise Invalid("url: required")
    url = url.strip()
    if len(url) > MAX_URL:
        raise Invalid(f"url: longer than {MAX_URL} characters")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise Invalid("url: must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Invalid(f"url: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise Invalid("url: only http and https URLs are allowed")
    if not parts.hostname:
        raise Invalid("url: names no host")
    if parts.username is not None or parts.password is not None:
        raise Invalid("url: must not carry credentials (the signature authenticates the server)")
    if parts.fragment:
        raise Invalid("url: must not have a fragment")
    if port == 0:
        raise Invalid("url: port 0 is not a port")
    return url


def check_events(events: Any) -> list[str] | None:
    """The event types a webhook subscribes to; None (or empty) means all of them."""
    if events is None:
        return None
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise Invalid("events: must be a list of event types")
    unknown = sorted({e for e in events if e not in EVENT_TYPES})
    if unknown:
        raise Invalid(f"events: unknown {', '.join(unknown)}; choose from {', '.join(EVENT_TYPES)}")
    chosen = [t for t in EVENT_TYPES if t in events]
    return chosen or None


def wants(events: Sequence[str] | None, event_type: str) -> bool:
    return events is None or event_type in events


def backoff(attempt: int, base_s: float, max_attempts: int = MAX_ATTEMPTS) -> float | None:
    """Seconds to wait after failed try number ``attempt`` (1-based): ``base_s`` doubled each
    time, at most an hour; None once ``max_attempts`` tries failed (the delivery is given up)."""
    if attempt >= max_attempts:
        return None
    return min(base_s * 2 ** (attempt - 1), MAX_BACKOFF_S)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 with the webhook's secret over ``<timestamp>.<body>``.

    The timestamp (``X-Fwcm-Timestamp``, Unix seconds of this attempt) is signed with the body, so
    a receiver that refuses old timestamps and remembers event ids refuses replays.
    """
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: int, body: bytes, header: str) -> bool:
    """What a receiver does (and the tests): recompute and compare in constant time."""
    return hmac.compare_digest(signature(secret, timestamp, body), header)


def headers(secret: str, event_id: str, event_type: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "fwcm-webhooks/1",
        EVENT_HEADER: event_type,
        ID_HEADER: event_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


@dataclass(frozen=True)
class CampaignEventRow:
    """One stored campaign event (``campaign_events``) as the renderer needs it."""

    id: int
    campaign_id: int
    campaign_name: str
    at: datetime
    state: str
    reason: str | None
    kind: str | None


@dataclass(frozen=True)
class FailureRow:
    """One stored device history entry in a failed state (``device_events``)."""

    id: int
    campaign_id: int
    campaign_name: str
    device: str
    at: datetime
    state: str
    result: int
    detail: str | None


@dataclass(frozen=True)
class Event:
    """An event to deliver: its type, when it happened and its ``data``; ``key`` names the stored
    rows it came from (``c<id>`` a campaign event, ``d<first>-<last>`` device history)."""

    type: str
    at: datetime
    key: str
    data: dict[str, Any]


def campaign_event(row: CampaignEventRow) -> Event | None:
    """The event a campaign event row is, or None for rows that are notes, not changes."""
    campaign = {"id": row.campaign_id, "name": row.campaign_name}
    if row.kind == "phase":
        return Event(PHASE_ADVANCED, row.at, f"c{row.id}", {"campaign": campaign, "phase": row.reason})
    if row.kind == "note":
        return None
    data = {"campaign": campaign, "state": row.state, "reason": row.reason}
    kind = CAMPAIGN_STATE
    if row.state in ("stopped", "paused") and is_threshold_stop(row.reason):
        kind = THRESHOLD_STOPPED
    return Event(kind, row.at, f"c{row.id}", data)


def is_threshold_stop(reason: str | None) -> bool:
    """The engine's reason for stopping or pausing on an error or success threshold."""
    return reason is not None and _THRESHOLD.search(reason) is not None


def is_failure(state: str, detail: str | None) -> bool:
    """A device history entry that is a failure to report (a timeout with a retry ahead is not)."""
    return state in FAILED_STATES and detail != "retry scheduled"


def failure_events(rows: Iterable[FailureRow], limit: int = MAX_DEVICES_PER_EVENT) -> list[Event]:
    """One ``device.failed`` event per campaign for a batch of failures, listing at most ``limit``
    devices (the count says how many there were)."""
    by_campaign: dict[int, list[FailureRow]] = {}
    for r in rows:
        by_campaign.setdefault(r.campaign_id, []).append(r)
    out = []
    for cid, group in by_campaign.items():
        devices = [
            {"name": r.device, "state": r.state, "result": r.result, "detail": r.detail, "at": _ts(r.at)}
            for r in group[:limit]
        ]
        data = {
            "campaign": {"id": cid, "name": group[0].campaign_name},
            "count": len(group),
            "devices": devices,
            "truncated": len(group) > limit,
        }
        out.append(Event(DEVICE_FAILED, group[-1].at, f"d{group[0].id}-{group[-1].id}", data))
    return out


def body(event_id: str, tenant: str, event: Event) -> bytes:
    """The exact JSON bytes sent (and signed): kept as stored, so every retry sends the same."""
    doc = {"id": event_id, "type": event.type, "tenant": tenant, "at": _ts(event.at), "data": event.data}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def event_id() -> str:
    """A new event id: stored with the delivery, so every retry (by any replica) keeps it."""
    return str(uuid.uuid4())


def short_error(text: str) -> str:
    text = " ".join(text.split())
    return text[: MAX_ERROR - 1] + "…" if len(text) > MAX_ERROR else text


def _ts(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")
