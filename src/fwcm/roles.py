"""Who may do what with an API key: the roles and the rule that maps a request to the role it needs.

Three roles, each allowing everything the one before allows:

* ``viewer`` reads (GET and HEAD) everything of its tenant except its API keys;
* ``operator`` also changes what a fleet runs: payloads, manifests, devices, campaigns;
* ``admin`` also manages the tenant's API keys and the signers it trusts.

The rule looks only at the HTTP method and the route template, so every route is covered by
the rule of its kind, including routes added later.  Pure logic: no I/O.
"""

from __future__ import annotations

import enum
import re
from datetime import timedelta


class Role(enum.IntEnum):
    """Ordered: a role allows what every lower role allows."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        """``viewer``, ``operator`` or ``admin`` (ValueError naming them otherwise)."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown role {text!r}: use viewer, operator or admin") from None


ROLES = tuple(r.label for r in Role)
READS = frozenset({"GET", "HEAD", "OPTIONS"})
ADMIN_AREAS = ("/keys", "/signers", "/webhooks")
"""Route prefixes (after ``/api/v1``) whose every operation, reads included for keys, needs admin:
signers decide what devices accept; webhooks send the tenant's events (and hold their secrets)."""


def is_mutation(method: str) -> bool:
    """Whether a request of this method may change state (and so is audited)."""
    return method.upper() not in READS


def _area(route: str) -> str:
    """``/api/v1/keys/{name}`` -> ``/keys``."""
    rest = route.removeprefix("/api/v1")
    return "/" + rest.lstrip("/").split("/", 1)[0]


def required_role(method: str, route: str) -> Role:
    """The least role a request of ``method`` on the route template ``route`` needs."""
    area = _area(route)
    if area == "/keys":
        return Role.ADMIN
    if not is_mutation(method):
        return Role.VIEWER
    if area in ADMIN_AREAS:
        return Role.ADMIN
    return Role.OPERATOR


def refusal(role: Role, needed: Role, method: str, route: str) -> str | None:
    """Why a key of ``role`` may not make this request, or None when it may."""
    if role >= needed:
        return None
    return f"{method.upper()} {route} needs the {needed.label} role; this key has the {role.label} role"


_DURATION = re.compile(r"^\s*(\d{1,6})\s*([mhdw])\s*$")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def parse_duration(text: str) -> timedelta:
    """``90m``, ``12h``, ``30d`` or ``8w`` as a timedelta (ValueError otherwise)."""
    m = _DURATION.match(text)
    if m is None or int(m.group(1)) == 0:
        raise ValueError(f"invalid duration {text!r}: a positive number and m, h, d or w, e.g. 30d")
    return int(m.group(1)) * _UNITS[m.group(2)]
