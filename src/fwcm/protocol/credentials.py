"""The credentials a device presents where a MAC cannot be sent (broker login, CoAP observation)."""

from __future__ import annotations

import base64
import hmac

DEVICE_PASSWORD_LABEL = b"fwcm device password v1"


def broker_username(tenant: str, device: str) -> str:
    """The device's MQTT username, ``{tenant}/{device}``: unambiguous, as neither name holds ``/``."""
    return f"{tenant}/{device}"


def device_password(secret: bytes, tenant: str, device: str) -> str:
    """The password a device presents where a MAC cannot be sent: its MQTT broker account and its
    CoAP notice observation (``?k=``). Base64url (no padding, 43 characters) of HMAC-SHA-256 keyed
    with the device secret over the label, a zero byte and ``tenant/device``.

    Derived, so a device claimed from a manufacturer's record and the server agree without storing
    anything new; bound to the name, so a tenant that held a claimed device (and saw its password,
    never its secret) cannot log in as it once it belongs to another tenant.
    """
    message = DEVICE_PASSWORD_LABEL + b"\x00" + broker_username(tenant, device).encode()
    return base64.urlsafe_b64encode(hmac.digest(secret, message, "sha256")).rstrip(b"=").decode()
