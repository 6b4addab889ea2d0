"""The nested maps of notices and reports: each value type writes the documented map and reads
back what it wrote, refusing what is out of range."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwcm import protocol
from fwcm.protocol import (
    NOTICE_INVITATION,
    NOTICE_LIMITS,
    REPORT_ACCOUNTING,
    REPORT_ANSWER,
    Accounting,
    Answer,
    Invitation,
    LwState,
    Notice,
    NoticeKind,
    ProtocolError,
    Report,
    Result,
    UsageLimits,
)

KEY = bytes(range(32))


def test_invitation_map_is_the_documented_one() -> None:
    invitation = Invitation("Acme", "spring", {"variant": ("basic", "pro")}, 1_700_000_600, "")
    assert invitation.to_map() == {
        1: "Acme",
        2: "spring",
        3: {"variant": ["basic", "pro"]},
        4: 1_700_000_600,
        5: "",
    }
    assert Invitation.from_map(invitation.to_map()) == invitation


def test_an_invitation_says_only_what_it_knows() -> None:
    assert Invitation().to_map() == {}
    assert Invitation.from_map({}) == Invitation()
    assert Invitation.from_map({2: "spring"}) == Invitation(campaign_name="spring")


def test_usage_limits_leave_out_what_is_unlimited() -> None:
    assert UsageLimits(3, 3600, 60).to_map() == {1: 3, 2: 3600, 3: 60}
    assert UsageLimits(max_uses=3).to_map() == {1: 3}
    assert UsageLimits().to_map() == {}
    assert UsageLimits.from_map({2: 3600}) == UsageLimits(expires_after_s=3600)


def test_answer_maps() -> None:
    assert Answer(accepted=False).to_map() == {1: False}
    assert Answer(accepted=True, choice={}).to_map() == {1: True, 2: {}}
    accepted = Answer(accepted=True, choice={"variant": "pro"})
    assert accepted.to_map() == {1: True, 2: {"variant": "pro"}}
    assert Answer.from_map(accepted.to_map()) == accepted
    assert Answer.from_map({1: False}) == Answer(accepted=False)


def test_accounting_maps() -> None:
    assert Accounting("interim", 5, 60).to_map() == {1: "interim", 2: 5, 3: 60}
    removed = Accounting("removed", 7, 90, "use limit reached")
    assert removed.to_map() == {1: "removed", 2: 7, 3: 90, 4: "use limit reached"}
    assert Accounting.from_map(removed.to_map()) == removed


@pytest.mark.parametrize(
    ("decode", "value", "needle"),
    [
        (Invitation.from_map, {3: {"variant": []}}, "values"),
        (Invitation.from_map, {4: -1}, "deadline"),
        (Invitation.from_map, {1: 7}, "key 1"),
        (Invitation.from_map, [1, 2], "map"),
        (UsageLimits.from_map, {3: 1.5}, "key 3"),
        (UsageLimits.from_map, {4: 1}, "keys other than"),
        (Answer.from_map, {2: {}}, "needs keys"),
        (Answer.from_map, {1: "yes"}, "true or false"),
        (Accounting.from_map, {1: "daily", 2: 1, 3: 1}, "key 1"),
        (Accounting.from_map, {1: "final", 2: -1, 3: 1}, "uses"),
    ],
)
def test_out_of_range_is_refused(decode: Callable[[Any], object], value: object, needle: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(value)
    assert e.value.reason == "shape"
    assert needle in str(e.value)


def test_messages_read_their_nested_maps_by_name() -> None:
    invitation = Invitation("Acme", "spring", {"variant": ("basic", "pro")}, 1_700_000_600, "ops")
    limits = UsageLimits(max_uses=3)
    notice = Notice(
        NoticeKind.INVITE,
        "dev-1",
        7,
        1,
        1_700_000_000,
        extra={NOTICE_INVITATION: invitation.to_map(), NOTICE_LIMITS: limits.to_map()},
    )
    decoded = protocol.decode_notice(protocol.encode_notice(KEY, notice), KEY)
    assert decoded.invitation == invitation and decoded.limits == limits
    answer, usage = Answer(True, {"variant": "pro"}), Accounting("final", 9, 120)
    report = Report(
        "dev-1",
        7,
        1,
        2,
        LwState.IDLE,
        Result.SUCCESS,
        extra={REPORT_ANSWER: answer.to_map(), REPORT_ACCOUNTING: usage.to_map()},
    )
    back = protocol.decode_report(protocol.encode_report(KEY, report), KEY)
    assert back.answer == answer and back.accounting == usage
    bare = Report("dev-1", 7, 1, 3, LwState.IDLE, Result.INITIAL)
    assert bare.answer is None and bare.accounting is None
    assert Notice(NoticeKind.UPDATE, "dev-1", 7, 1, 0).invitation is None


chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # as CBOR decodes
words = st.text(chars, min_size=1, max_size=64)
"""Up to 256 bytes of UTF-8: an option's name or value at its bound."""
details = st.text(chars, max_size=50)
"""Up to 200 bytes: a detail at its bound."""
uints = st.integers(0, protocol.UINT63_MAX)


@given(
    st.builds(
        Invitation,
        words,
        words,
        st.dictionaries(words, st.lists(words, min_size=1, max_size=16).map(tuple), max_size=8),
        uints,
        words,
    ),
    st.builds(UsageLimits, st.none() | uints, st.none() | uints, st.none() | uints),
    st.builds(Answer, st.booleans(), st.none() | st.dictionaries(words, words, max_size=8)),
    st.builds(Accounting, st.sampled_from(protocol.ACCOUNTING_KINDS), uints, uints, st.none() | details),
)
def test_every_value_in_range_reads_back_as_written(
    invitation: Invitation, limits: UsageLimits, answer: Answer, usage: Accounting
) -> None:
    assert Invitation.from_map(invitation.to_map()) == invitation
    assert UsageLimits.from_map(limits.to_map()) == limits
    assert Answer.from_map(answer.to_map()) == answer
    assert Accounting.from_map(usage.to_map()) == usage
