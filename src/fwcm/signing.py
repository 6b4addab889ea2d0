"""Release policy of the signing service (pure): who may ask a server-held signer for a signature,
and whose approvals count before the signature is made.

A production signer needs ``approvals`` approvals from keys of at least ``approver_role`` (four
eyes: the requester and one approver by default); a developer signer (its certificate lists
hardware IDs) signs on request.  An approval by the requesting key never counts: it is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fwcm.roles import Role

MAX_APPROVALS = 5
PRODUCTION_APPROVALS = 1
"""Approvals a production signer needs unless its policy says otherwise (requester + 1 = four eyes)."""


@dataclass(frozen=True)
class Policy:
    approvals: int
    approver_role: Role = Role.ADMIN
    requester_role: Role = Role.OPERATOR

    def __post_init__(self) -> None:
        if not 0 <= self.approvals <= MAX_APPROVALS:
            raise ValueError(f"approvals must be between 0 and {MAX_APPROVALS}")


def default_policy(developer: bool) -> Policy:
    """Developer builds sign on request; production builds need a second person."""
    return Policy(0 if developer else PRODUCTION_APPROVALS)


def request_refusal(policy: Policy, role: Role) -> str | None:
    """Why a key of ``role`` may not ask this signer for a signature, or None."""
    if role < policy.requester_role:
        return (
            f"requesting a signature needs the {policy.requester_role.label} role; this key has {role.label}"
        )
    return None


def approval_refusal(policy: Policy, requested_by: str, key_name: str, role: Role) -> str | None:
    """Why this key's approval cannot count, or None."""
    if key_name == requested_by:
        return "the requester's own approval does not count: another key must approve"
    if role < policy.approver_role:
        return f"approving needs the {policy.approver_role.label} role; this key has {role.label}"
    return None


def counted(policy: Policy, requested_by: str, approvals: Iterable[tuple[str, Role]]) -> int:
    """How many distinct keys' approvals count (a key of too low a role, or the requester, doesn't)."""
    keys = {name for name, role in approvals if approval_refusal(policy, requested_by, name, role) is None}
    return len(keys)


def ready(policy: Policy, requested_by: str, approvals: Iterable[tuple[str, Role]]) -> bool:
    return counted(policy, requested_by, approvals) >= policy.approvals
