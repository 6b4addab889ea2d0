"""The one event type every transport turns a device message into."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fwcm.protocol import ProtocolError


@dataclass(slots=True)
class Inbound:
    """A raw device message and the topic/path identity it arrived under.

    ``on_done`` is called once the message is durable (``None``) or refused (the error): MQTT
    sends its PUBACK then, CoAP answers the request then. Not frozen: one is made per message on
    the network thread, and a frozen dataclass costs five times as much to create.
    """

    transport: str
    kind: str
    """``status`` (a sealed report), ``report`` (an unsealed report map the transport built for a
    device it authenticated: LwM2M), ``presence`` (b"1"/b"0") or ``refused:<reason>``."""
    tenant: str
    device: str
    payload: bytes
    on_done: Callable[[ProtocolError | None], None]
