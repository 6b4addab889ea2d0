"""Rollout groups (pure): which phase each device of a frozen subset joins when a campaign starts.

A phase with a ``filter`` is a rollout group: it takes every device of the subset that matches its
filter and no earlier group's (the store evaluates the filters and hands over, per device, the
first group it matches). The count and share phases are filled from the other devices in the
policy's ``order``: ``"shuffle"`` (default) is a shuffle seeded with the policy's ``seed`` or else
the campaign's id, so a canary is a sample of the fleet rather than its oldest devices, and the
same campaign always draws the same sample; ``"registration"`` keeps the order devices registered
in (their ids).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from fwcm.rollout.policy import Policy


@dataclass(frozen=True)
class Member:
    """A device of the frozen subset, as the store reads it."""

    device_id: int
    group: int | None = None
    """Index of the first filter phase the device matches; None: it matches none."""


def shuffled(ids: Sequence[int], seed: int) -> list[int]:
    """A permutation of ``ids`` that depends only on ``seed`` and the ids' order."""
    out = list(ids)
    random.Random(seed).shuffle(out)
    return out


def seed_of(policy: Policy, campaign_id: int) -> int:
    """The shuffle's seed: the policy's own, else the campaign's id (stable for that campaign)."""
    return policy.seed if policy.seed is not None else campaign_id


def assign(policy: Policy, members: Sequence[Member], seed: int) -> dict[int, int]:
    """The phase (0-based index) of every member, by device id.

    ``members`` come in registration order (ascending id). Group members keep their group; the
    others fill the count and share phases in the policy's order, sized by ``Policy.phase_sizes``.
    """
    groups = policy.groups
    phase: dict[int, int] = {}
    taken: dict[int, int] = {}
    rest: list[int] = []
    for m in members:
        if m.group is not None and m.group in groups:
            phase[m.device_id] = m.group
            taken[m.group] = taken.get(m.group, 0) + 1
        else:
            rest.append(m.device_id)
    if policy.order == "shuffle":
        rest = shuffled(rest, seed)
    sizes = policy.phase_sizes(len(members), taken)
    queue = iter(rest)
    for i, n in enumerate(sizes):
        if i in groups:
            continue
        for _ in range(n):
            phase[next(queue)] = i
    return phase
