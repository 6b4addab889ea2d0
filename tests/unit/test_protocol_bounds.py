"""Every field of a device message is range-checked where it is decoded: out of range is ``shape``."""

from __future__ import annotations

from typing import Any

import pytest

from fwcm import protocol
from fwcm.protocol import (
    REPORT_ACCOUNTING,
    REPORT_ANSWER,
    REPORT_EVIDENCE,
    REPORT_FIRMWARE_NAME,
    REPORT_FIRMWARE_VERSION,
    LwState,
    Notice,
    NoticeKind,
    ProtocolError,
    Report,
    Result,
)
from fwcm.rollout.consent import ConsentSpec
from fwcm.rollout.values import PolicyError

KEY = bytes(range(32))
BIG = 2**63
"""One past what a signed 64-bit column holds."""


def report_map(**changes: Any) -> dict[Any, Any]:
    m: dict[Any, Any] = {1: "dev-1", 2: 7, 3: 1, 4: 3, 5: 1, 6: 0}
    for k, v in changes.items():
        key = int(k[1:])
        if v is None:
            m.pop(key, None)
        else:
            m[key] = v
    return m


def refused(m: dict[Any, Any]) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        Report.from_map(m)
    assert e.value.reason == "shape"
    return e.value


ACCOUNTING = {1: "interim", 2: 5, 3: 60}


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"k1": "x" * 65}, "key 1"),
        ({"k1": "a/b"}, "key 1"),
        ({"k1": "dev-1\n"}, "key 1"),
        ({"k2": BIG}, "key 2"),
        ({"k2": -1}, "key 2"),
        ({"k3": 2**31}, "key 3"),
        ({"k4": BIG}, "key 4"),
        ({"k5": True}, "key 5"),
        ({"k6": 2**64}, "not a valid Result"),
        ({"k5": 9}, "malformed"),
        ({"k7": BIG}, "progress"),
        ({"k7": 1.5}, "progress"),
        ({"k8": "x" * 201}, "detail"),
        ({"k8": "é" * 101}, "detail"),  # 202 bytes of UTF-8
        ({"k8": "bad\x00byte"}, "NUL"),
        ({"k8": b"bytes"}, "detail"),
        ({"k2": 0, "k9": BIG}, "sequence"),
        ({"k10": "evidence"}, "key 10"),
        ({"k10": b"e" * 1025}, "key 10"),
        ({"k11": "n" * 201}, "key 11"),
        ({"k11": 7}, "key 11"),
        ({"k12": "v" * 65}, "key 12"),
        ({"k13": True}, "key 13"),
        ({"k13": {}}, "needs keys"),
        ({"k13": {1: 1}}, "true or false"),
        ({"k13": {1: True, 3: 0}}, "keys other than"),
        ({"k13": {1: True, 2: {f"o{i}": "v" for i in range(9)}}}, "at most 8"),
        ({"k13": {1: True, 2: {"variant": "p" * 257}}}, "value"),
        ({"k13": {1: True, 2: {"variant": 1}}}, "value"),
        ({"k13": {1: True, 2: {"": "pro"}}}, "option"),
        ({"k14": {**ACCOUNTING, 2: BIG}}, "uses"),
        ({"k14": {**ACCOUNTING, 3: -1}}, "seconds"),
        ({"k14": {**ACCOUNTING, 1: "weekly"}}, "key 1"),
        ({"k14": {1: "final", 2: 1}}, "needs keys"),
        ({"k14": {**ACCOUNTING, 4: "d" * 201}}, "detail"),
        ({"k14": {**ACCOUNTING, 5: 0}}, "keys other than"),
    ],
)
def test_report_fields_out_of_range_are_refused(changes: dict[str, Any], needle: str) -> None:
    assert needle in str(refused(report_map(**changes)))


def test_report_fields_at_their_bounds_are_accepted() -> None:
    name = "d" * 64
    m = report_map(
        k1=name,
        k2=BIG - 1,
        k3=2**31 - 1,
        k4=BIG - 1,
        k7=BIG - 1,
        k8="é" * 100,
        k9=BIG - 1,
        k10=b"e" * 1024,
        k11="n" * 200,
        k12="v" * 64,
        k13={1: True, 2: {f"o{i}": "v" * 256 for i in range(7)}},
        k14={1: "removed", 2: BIG - 1, 3: BIG - 1, 4: "x" * 200},
        k99=["unknown extensions", {"are": "ignored"}],
    )
    r = Report.from_map(m)
    assert (r.device, r.campaign, r.attempt, r.seq) == (name, BIG - 1, 2**31 - 1, BIG - 1)
    assert r.progress == BIG - 1 and r.installed_sequence == BIG - 1
    assert r.extra[REPORT_ANSWER] == m[13] and r.extra[REPORT_ACCOUNTING] == m[14]
    assert set(r.extra) == {
        REPORT_EVIDENCE,
        REPORT_FIRMWARE_NAME,
        REPORT_FIRMWARE_VERSION,
        REPORT_ANSWER,
        REPORT_ACCOUNTING,
        99,
    }


def test_a_declining_answer_needs_no_options() -> None:
    assert Report.from_map(report_map(k13={1: False})).extra[REPORT_ANSWER] == {1: False}


def test_the_sender_clips_detail_to_what_the_receiver_accepts() -> None:
    r = Report("dev-1", 7, 1, 3, LwState.IDLE, Result.UPDATE_FAILED, detail="€" * 100)  # 300 bytes
    decoded = protocol.decode_report(protocol.encode_report(KEY, r), KEY)
    assert decoded.detail == "€" * 66  # 198 bytes: the longest whole-character prefix


def notice_map(**changes: Any) -> dict[Any, Any]:
    m: dict[Any, Any] = {1: 1, 2: "dev-1", 3: 7, 4: 1, 5: 1_700_000_000}
    for k, v in changes.items():
        m[int(k[1:])] = v
    return m


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"k1": 99}, "kind"),
        ({"k2": "x" * 65}, "key 2"),
        ({"k3": BIG}, "key 3"),
        ({"k4": 2**31}, "key 4"),
        ({"k5": -5}, "key 5"),
        ({"k6": "envelope"}, "key 6"),
        ({"k7": b"n" * 15}, "key 7"),
        ({"k8": [b"short"]}, "32-byte"),
        ({"k9": [1, 2, 3]}, "key 9"),
        ({"k9": [0, BIG]}, "key 9"),
        ({"k9": [0.5, 10]}, "key 9"),
        ({"k10": "token"}, "key 10"),
        ({"k11": b"c" * 1025}, "key 11"),
        ({"k12": 3}, "key 12"),
        ({"k13": {3: {"variant": []}}}, "values"),
        ({"k13": {4: -1}}, "deadline"),
        ({"k13": {6: "x"}}, "keys other than"),
        ({"k14": 1}, "true"),
        ({"k15": {1: -1}}, "key 1"),
        ({"k15": {4: 1}}, "keys other than"),
    ],
)
def test_notice_fields_out_of_range_are_refused(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ProtocolError) as e:
        Notice.from_map(notice_map(**changes))
    assert e.value.reason == "shape"
    assert needle in str(e.value)


def test_notice_extensions_in_range_are_kept() -> None:
    invitation = {1: "Acme", 2: "spring", 3: {"variant": ["basic", "pro"]}, 4: 1_700_000_600, 5: ""}
    n = Notice(
        NoticeKind.INVITE,
        "dev-1",
        7,
        1,
        1_700_000_000,
        extra={13: invitation, 14: True, 15: {1: 3, 2: 3600, 3: 60}, 12: "why", 10: b"t"},
    )
    assert protocol.decode_notice(protocol.encode_notice(KEY, n), KEY) == n


def test_the_widest_options_a_campaign_may_offer_fit_an_answer() -> None:
    """A campaign's options are 1-64 characters; a device's answer may carry any of them."""
    widest = "😀" * 64  # 256 bytes of UTF-8
    spec = ConsentSpec.parse({"deadline": "1m", "options": {widest: [widest]}})
    answer = {1: True, 2: {name: values[0] for name, values in spec.options.items()}}
    assert Report.from_map(report_map(k13=answer)).extra[REPORT_ANSWER] == answer
    with pytest.raises(PolicyError):
        ConsentSpec.parse({"deadline": "1m", "options": {"variant": ["basic", "p" * 65]}})
