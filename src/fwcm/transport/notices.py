"""The contract every device transport implements to carry notices to devices.

The server builds each device's notice (:class:`fwcm.server.notices.Notifier`) and hands it to the
sender of the device's transport; the sender only carries it. MQTT publishes the notice retained
on the device's notice topic; CoAP wakes the device's observation, or pushes the notice to the
endpoint the device last observed from; LwM2M writes the device's Package URI and follows its
Firmware Update object (``transport/lwm2m.py``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

Render = Callable[[], bytes]
"""Seals the device's notice as it stands when called."""


class NoticeSender(abc.ABC):
    """Carries notices to the devices of one transport."""

    @abc.abstractmethod
    def send_notice(self, tenant: str, device: str, render: Render) -> bool:
        """Tell ``tenant/device`` that its notice changed.

        A sender that delivers the notice itself calls ``render()`` at once; one whose device
        reads its notice when woken may never call it (the device gets it from the resource it
        observes). Returns False when the device cannot be reached now: it reads its notice when
        it comes back.
        """

    def send_notices(self, notices: Sequence[tuple[str, str, Render]]) -> None:
        """``send_notice`` for each ``(tenant, device, render)`` of one step of a campaign; a
        sender that can carry them together (MQTT: one write) does so."""
        for tenant, device, render in notices:
            self.send_notice(tenant, device, render)

    def clear_notice(self, tenant: str, device: str) -> None:  # noqa: B027 (optional to implement)
        """Withdraw whatever notice ``tenant/device`` could still read (it was decommissioned).

        Senders that keep nothing for a device have nothing to do."""
