"""Where device messages travel: MQTT topics, CoAP paths and the payload path."""

from __future__ import annotations

from fwcm.protocol.fields import ProtocolError

PROTOCOL_VERSION = 1
TOPIC_PREFIX = f"fwcm/v{PROTOCOL_VERSION}"


def notice_topic(tenant: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{tenant}/{device}/notice"


def status_topic(tenant: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{tenant}/{device}/status"


def presence_topic(tenant: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{tenant}/{device}/presence"


STATUS_SUBSCRIPTION = f"{TOPIC_PREFIX}/+/+/status"
PRESENCE_SUBSCRIPTION = f"{TOPIC_PREFIX}/+/+/presence"


def parse_device_topic(topic: str) -> tuple[str, str, str]:
    """``fwcm/v1/{tenant}/{device}/{leaf}`` → (tenant, device, leaf)."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_PREFIX:
        raise ProtocolError("topic", f"unexpected topic {topic!r}")
    return parts[2], parts[3], parts[4]


def coap_notice_path(tenant: str, device: str) -> tuple[str, ...]:
    return ("n", tenant, device)


def coap_status_path(tenant: str, device: str) -> tuple[str, ...]:
    return ("s", tenant, device)


def payload_path(sha256_hex: str) -> str:
    """Path of a payload on both the HTTP and the CoAP server."""
    return f"/p/{sha256_hex}"
