"""Consent rules (pure): quorum verdicts, group commit, the [consent] table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwcm.rollout.consent import ConsentSpec, Group, Quorum, Tally, group_verdict, quorum_verdict
from fwcm.rollout.definition import load_definition
from fwcm.rollout.values import PolicyError


def verdict(rule: object, total: int, accepted: int, declined: int, passed: bool) -> str:
    q = Quorum.parse(rule, "quorum")
    return quorum_verdict(q, Tally(total, accepted, declined), deadline_passed=passed)[0]


@pytest.mark.parametrize(
    ("rule", "total", "accepted", "declined", "passed", "expected"),
    [
        ("all", 4, 2, 1, False, "wait"),
        ("all", 4, 3, 1, False, "grant"),  # everyone answered
        ("all", 4, 3, 0, True, "refuse"),  # one silent at the deadline
        ("all", 3, 0, 3, False, "refuse"),  # all declined: nothing to install
        (2, 5, 2, 0, False, "grant"),
        (2, 5, 1, 0, False, "wait"),
        (2, 5, 1, 0, True, "refuse"),
        (3, 4, 1, 2, False, "refuse"),  # can no longer be reached
        ("50%", 6, 3, 0, False, "grant"),
        ("50%", 6, 2, 3, False, "wait"),  # the one silent device could still make it 3
        ("50%", 6, 2, 4, False, "refuse"),
        ("any", 5, 3, 0, False, "wait"),  # "any" waits for the deadline
        ("any", 5, 1, 2, True, "grant"),
        ("any", 5, 0, 2, True, "refuse"),
        ("any", 2, 0, 2, False, "refuse"),  # everyone declined before the deadline
    ],
)
def test_quorum_rules(
    rule: object, total: int, accepted: int, declined: int, passed: bool, expected: str
) -> None:
    assert verdict(rule, total, accepted, declined, passed) == expected


tallies = st.integers(1, 50).flatmap(
    lambda total: st.tuples(st.just(total), st.integers(0, total)).flatmap(
        lambda ta: st.tuples(st.just(ta[0]), st.just(ta[1]), st.integers(0, ta[0] - ta[1]))
    )
)
rules = st.one_of(
    st.sampled_from(["all", "any"]), st.integers(1, 60), st.sampled_from(["10%", "50%", "100%"])
)


@given(tallies, rules, st.booleans())
def test_quorum_properties(t: tuple[int, int, int], rule: object, passed: bool) -> None:
    total, accepted, declined = t
    v = verdict(rule, total, accepted, declined, passed)
    if v == "grant":
        assert accepted >= 1  # never goes on with nobody
    if passed:
        assert v != "wait"  # the deadline always decides
    if rule == "all" and v == "grant":
        assert accepted + declined == total
    if v == "refuse" and not passed:
        # refused early only when no later answer could change it: not even if every silent
        # device accepted
        silent = total - accepted - declined
        assert verdict(rule, total, accepted + silent, declined, False) == "refuse"


@pytest.mark.parametrize(
    ("members", "prepared", "failed", "passed", "expected"),
    [
        (3, 3, 0, False, "commit"),
        (3, 2, 0, False, "wait"),
        (3, 2, 1, False, "abort"),
        (3, 2, 0, True, "abort"),
        (3, 3, 0, True, "commit"),  # all ready exactly at the deadline still commits
    ],
)
def test_group_two_phase_commit(
    members: int, prepared: int, failed: int, passed: bool, expected: str
) -> None:
    assert group_verdict(Group(members, prepared, failed), deadline_passed=passed)[0] == expected


@given(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20), st.booleans())
def test_group_never_commits_with_a_failed_or_unprepared_member(m: int, p: int, f: int, passed: bool) -> None:
    v, _ = group_verdict(Group(m, min(p, m), f), deadline_passed=passed)
    if v == "commit":
        assert f == 0 and min(p, m) == m and m > 0


def spec(**kw: object) -> ConsentSpec:
    base: dict[str, object] = {"deadline": "1m"}
    base.update(kw)
    return ConsentSpec.parse(base)


def test_variants_choose_the_manifest_by_option_or_class() -> None:
    s = spec(options={"variant": ["basic", "pro"]}, variant_option="variant", variants={"basic": 1, "pro": 2})
    assert s.manifest_for({"variant": "pro"}, "c", 9) == 2
    assert s.manifest_for({}, "c", 9) is None
    assert s.check_choice({"variant": "gold"}) is not None and s.check_choice({"variant": "pro"}) is None
    by_class = spec(variant_option="class", variants={"class-a": 4})
    assert by_class.manifest_for({}, "class-a", 9) == 4 and by_class.manifest_for({}, "class-b", 9) is None
    assert spec().manifest_for({}, "x", 9) == 9


def test_spec_round_trip_and_peers() -> None:
    s = spec(
        quorum="50%",
        group=True,
        prepare_within="30s",
        accounting_every="5s",
        max_uses=3,
        expires_after="1h",
        initiator="gw",
        peers=["s1", "s2"],
    )
    assert ConsentSpec.from_stored(s.to_dict()) == s
    assert s.peer_filter() == 'name in ["gw", "s1", "s2"]'


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({}, "deadline"),
        ({"deadline": "0s"}, "longer than zero"),
        ({"deadline": "1m", "quorum": "most"}, "quorum"),
        ({"deadline": "1m", "variants": {"a": 1}}, "variant_option"),
        (
            {"deadline": "1m", "options": {"v": ["a", "b"]}, "variant_option": "v", "variants": {"a": 1}},
            "no manifest",
        ),
        ({"deadline": "1m", "max_uses": 0}, "max_uses"),
        ({"deadline": "1m", "peers": "all"}, "peers"),
        ({"deadline": "1m", "peers": ["s1\n"]}, "not a device name"),
        ({"deadline": "1m", "colour": "red"}, "colour"),
    ],
)
def test_bad_consent_tables_name_the_key(table: dict[str, object], needle: str) -> None:
    with pytest.raises(PolicyError, match=needle):
        ConsentSpec.parse(table)


def test_campaign_definition_with_a_consent_table() -> None:
    d = load_definition(
        """
        [campaign]
        name = "opt-in"
        [consent]
        deadline = "2m"
        quorum = 3
        options = { variant = ["basic", "pro"] }
        variant_option = "variant"
        variants = { basic = 1, pro = 2 }
        """
    )
    assert d.consent is not None and d.consent["quorum"] == 3 and d.consent["deadline"] == 120
