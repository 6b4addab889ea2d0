"""Rollout groups: filter phases, count and share phases filled in a chosen order."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwcm.rollout import launch
from fwcm.rollout.groups import Member, assign, seed_of, shuffled
from fwcm.rollout.policy import Policy
from fwcm.rollout.values import PolicyError

RING = 'tag.ring == "canary"'


def test_filter_phase_takes_its_group_and_count_phases_fill_from_the_rest() -> None:
    policy = Policy.from_dict(
        {
            "order": "registration",
            "phases": [{"filter": RING}, {"size": 2}, {"until": "50%"}, {}],
        }
    )
    members = [Member(i, 0 if i in (7, 9) else None) for i in range(1, 11)]
    phase = assign(policy, members, seed=1)
    assert [phase[i] for i in range(1, 11)] == [1, 1, 2, 3, 3, 3, 0, 3, 0, 3]
    # until = 50 % counts the group: 2 in the group + 2 + 1 = 5 of 10
    assert Counter(phase.values()) == {0: 2, 1: 2, 2: 1, 3: 5}


def test_first_matching_group_wins_and_an_empty_group_is_passed_through() -> None:
    policy = Policy.from_dict({"phases": [{"filter": RING}, {"filter": 'tag.ring == "beta"'}, {}]})
    assert policy.groups == {0: RING, 1: 'tag.ring == "beta"'}
    phase = assign(policy, [Member(1, 1), Member(2, None), Member(3, 1)], seed=5)
    assert phase == {1: 1, 2: 2, 3: 1}
    assert policy.phase_sizes(3, {1: 2}) == [0, 2, 1]


def test_registration_order_is_the_old_behaviour() -> None:
    policy = Policy.from_dict({"order": "registration", "phases": [{"until": "10%"}, {"until": "50%"}, {}]})
    phase = assign(policy, [Member(i) for i in range(20)], seed=3)
    assert [phase[i] for i in range(20)] == [0] * 2 + [1] * 8 + [2] * 10


def test_default_order_is_a_shuffle_seeded_by_the_campaign() -> None:
    policy = Policy.from_dict({"phases": [{"size": 5}, {}]})
    assert policy.order == "shuffle" and seed_of(policy, 42) == 42
    members = [Member(i) for i in range(1000)]
    canary = sorted(i for i, p in assign(policy, members, seed=42).items() if p == 0)
    assert len(canary) == 5 and canary != [0, 1, 2, 3, 4]
    assert canary == sorted(i for i, p in assign(policy, members, seed=42).items() if p == 0)
    other = sorted(i for i, p in assign(policy, members, seed=43).items() if p == 0)
    assert other != canary
    assert seed_of(Policy.from_dict({"seed": 7}), 42) == 7


def test_start_plan_carries_the_groups_and_the_order() -> None:
    stored = launch.stored_policy({"seed": 11, "phases": [{"filter": "tag.ring == 'canary'"}, {}]})
    assert stored["phases"][0]["filter"] == RING and stored["order"] == "shuffle"
    plan = launch.start_plan(stored, 4, now=0.0)
    assert plan.groups == {0: RING}
    assert plan.assign([Member(1, 0), Member(2), Member(3)], campaign_id=9) == {1: 0, 2: 1, 3: 1}
    assert plan.describe_order(9) == "in a shuffle seeded 11"
    registration = launch.start_plan(launch.stored_policy({"order": "registration"}), 1, now=0.0)
    assert registration.describe_order(9) == "in registration order"


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ([{"filter": RING}], "phases[0]: the last phase takes every remaining device"),
        ([{"filter": RING, "size": 3}, {}], "phases[0]: give size"),
        ([{"filter": "tag.ring = 'x'"}, {}], "phases[0].filter: "),
        ([{"filter": 3}, {}], "phases[0].filter: must be a device filter"),
    ],
)
def test_bad_groups_are_refused_naming_the_phase(phases: list[dict[str, object]], message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Policy.from_dict({"phases": phases})


def test_bad_order_and_seed_are_refused() -> None:
    with pytest.raises(PolicyError, match="order: must be one of 'shuffle', 'registration'"):
        Policy.from_dict({"order": "random"})
    with pytest.raises(PolicyError, match="seed: must be a whole number"):
        Policy.from_dict({"seed": "x"})


# -- properties ---------------------------------------------------------------------------------


@st.composite
def grouped_policies(draw: st.DrawFn) -> Policy:
    phases: list[dict[str, object]] = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["filter", "size", "share", "until"]))
        if kind == "filter":
            phases.append({"filter": f'tag.ring == "r{len(phases)}"'})
        elif kind == "size":
            phases.append({"size": draw(st.integers(0, 50))})
        elif kind == "share":
            phases.append({"size": f"{draw(st.integers(0, 100))}%"})
        else:
            phases.append({"until": f"{draw(st.integers(0, 100))}%"})
    phases.append({})
    order = draw(st.sampled_from(["shuffle", "registration"]))
    return Policy.from_dict({"order": order, "phases": phases})


@st.composite
def subsets(draw: st.DrawFn, policy: Policy) -> list[Member]:
    ids = draw(st.lists(st.integers(1, 10**9), unique=True, max_size=200).map(sorted))
    choices = [None, *policy.groups]
    return [Member(i, draw(st.sampled_from(choices))) for i in ids]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), policy=grouped_policies(), seed=st.integers(0, 2**63 - 1))
def test_every_device_lands_in_exactly_one_phase(data: st.DataObject, policy: Policy, seed: int) -> None:
    members = data.draw(subsets(policy))
    phase = assign(policy, members, seed)
    assert sorted(phase) == sorted(m.device_id for m in members)
    assert all(0 <= p < len(policy.phases) for p in phase.values())
    for m in members:
        in_group = policy.phases[phase[m.device_id]].filter is not None
        # filter phases hold only (and all) their matching devices
        assert in_group == (m.group is not None)
        if in_group:
            assert phase[m.device_id] == m.group
    sizes = policy.phase_sizes(len(members), Counter(m.group for m in members if m.group is not None))
    assert sum(sizes) == len(members)
    assert Counter(phase.values()) == {i: n for i, n in enumerate(sizes) if n}
    assert phase == assign(policy, members, seed)  # reproducible


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(), unique=True, max_size=300), seed=st.integers(0, 2**63 - 1))
def test_the_shuffle_is_a_reproducible_permutation(ids: list[int], seed: int) -> None:
    out = shuffled(ids, seed)
    assert sorted(out) == sorted(ids)
    assert out == shuffled(ids, seed)
