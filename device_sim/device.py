"""What a simulated device is: its provisioning, its status, and what the parts of its agent share.

The agent (:mod:`device_sim.agent`) is one device; its parts (the update job, attestation,
consent) each see the device through :class:`Device` only: its provisioning, flash, faults and
status, the reports it queues, and the few things only the connection can do (reboot, drop the
link, deliver queued reports first).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from fwcm import protocol
from fwcm.protocol import LwState, Notice, Report, Result

from .faults import DeviceFaults
from .flash import Flash
from .transports import SharedClients

Transport = Literal["mqtt", "coap", "lwm2m"]


@dataclass
class DeviceConfig:
    """Everything a simulated device is provisioned with."""

    name: str
    tenant: str
    secret: bytes
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    transport: Transport
    trust_anchors: list[bytes]
    """PEM public keys the device accepts manifest signatures from."""
    state_dir: Path
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_ca_file: Path | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    """The device's broker account as registration returned it; when not given, derived from
    tenant, name and secret (``protocol.broker_username`` / ``device_password``), as firmware may."""
    coap_url: str = "coap://127.0.0.1:5683"
    lwm2m_url: str = "coap://127.0.0.1:5783"
    """The LwM2M server an ``lwm2m`` device registers with."""
    installed_sequence: int = 0
    hardware_id: str | None = None
    trust_root: bytes | None = None
    """PEM of the operator root CA: when set, manifests must carry a chain that leads to it."""
    attest_key: bytes | None = None
    """PEM private attestation key made at provisioning (its public half is registered)."""
    firmware_name: str = "fwcm-sim"
    index: int = 0
    flash_size: int = 16 * 1024 * 1024
    """Capacity of one slot; larger images are refused with NOT_ENOUGH_FLASH."""
    base_image: bytes | None = None
    """The image the device ships with, when it is a release the fleet shares (delta updates
    patch from it); None: a factory image of its own."""

    def mqtt_credentials(self) -> tuple[str, str]:
        return (
            self.mqtt_username or protocol.broker_username(self.tenant, self.name),
            self.mqtt_password or protocol.device_password(self.secret, self.tenant, self.name),
        )

    @property
    def device_dir(self) -> Path:
        return self.state_dir / self.name

    def factory_image(self) -> bytes:
        """The image the device ships with (slot A): ``base_image``, or one distinct per device."""
        if self.base_image is not None:
            return self.base_image
        line = f"fwcm-sim factory image device={self.name} sequence={self.installed_sequence}\n".encode()
        return line * 16


@dataclass
class AgentStatus:
    """What a device is doing, for progress displays and checks (not persisted)."""

    name: str
    index: int
    transport: str
    connected: bool = False
    connects: int = 0
    campaign: int = 0
    attempt: int = 0
    state: LwState = LwState.IDLE
    result: Result = Result.INITIAL
    installed_sequence: int = 0
    reports_sent: int = 0
    pending_reports: int = 0
    """Reports queued but not yet acknowledged by the server."""
    detail: str | None = None
    credentials: int = 0
    """Installation credentials held."""
    removed: int = 0
    """Time-limited installs removed again."""
    results: dict[int, Result] = field(default_factory=dict)
    """Final result per campaign (latest attempt)."""


class Refusal(Exception):
    """Ends an update attempt with IDLE + ``result``."""

    def __init__(self, result: Result, detail: str) -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail


class Device(Protocol):
    """The device as each part of its agent sees it."""

    config: DeviceConfig
    flash: Flash
    faults: DeviceFaults
    status: AgentStatus
    clients: SharedClients
    rng: random.Random
    """The device's one random stream (backoff jitter), seeded by its name."""

    @property
    def stopping(self) -> bool:
        """The agent was told to stop."""

    def report(
        self,
        campaign: int,
        attempt: int,
        state: LwState,
        result: Result = Result.INITIAL,
        *,
        progress: int | None = None,
        detail: str | None = None,
        finish: bool = False,
        extra: dict[int, object] | None = None,
    ) -> Report:
        """Queue a report: its seq is taken and the outbox persisted before anything is sent."""

    async def flush_outbox(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until every queued report was delivered."""

    def request_reboot(self) -> None:
        """Close the connection, boot the inactive slot and connect again."""

    async def drop_link(self) -> None:
        """Drop the connection (fault injection) and wait until it is back."""

    def requeue(self, notice: Notice) -> None:
        """Handle ``notice`` again, after the notices already waiting."""
