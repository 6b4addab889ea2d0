"""Names of tenants, signers, devices and serials (pure): one rule, checked where a name enters.

A name becomes one MQTT topic level and one CoAP or URL path segment, so it is 1-64 characters of
letters, digits, '.', '_' or '-', starting with a letter or digit (``protocol.NAME_RE``).
"""

from __future__ import annotations

from typing import Any

from fwcm.errors import Invalid
from fwcm.protocol import NAME_RE


def check_name(value: Any, what: str = "name") -> str:
    """``value`` when it is a valid name; Invalid naming ``what`` otherwise."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise Invalid(
            f"{what} {value!r} is not valid: 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value
