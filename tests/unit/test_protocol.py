"""Wire format: round trips, MAC binding, and garbage raising only ProtocolError."""

from __future__ import annotations

import contextlib
import hmac

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwcm import protocol
from fwcm.protocol import LwState, Notice, NoticeKind, ProtocolError, Report, Result, framing

KEY = bytes(range(32))


def test_report_round_trip_and_frame_bytes() -> None:
    r = Report(
        "dev-1",
        7,
        2,
        3,
        LwState.DOWNLOADING,
        Result.INITIAL,
        progress=4096,
        detail="50%",
        installed_sequence=1,
    )
    data = protocol.encode_report(KEY, r)
    assert data[:1] == b"\xd1"  # tag 17 (COSE_Mac0)
    assert protocol.decode_report(data, KEY) == r


def test_notice_round_trip_with_optional_fields() -> None:
    n = Notice(
        NoticeKind.UPDATE,
        "dev-1",
        7,
        1,
        1_700_000_000,
        envelope=b"\xd8\x6b\xa0",
        nonce=b"n" * 16,
        revoked=(b"1" * 32, b"2" * 32),  # key ids: SHA-256 of the signer key
        window=(10, 20),
        extra={12: "future"},
    )
    assert protocol.decode_notice(protocol.encode_notice(KEY, n), KEY) == n


def test_mac_binds_key_and_content() -> None:
    data = protocol.encode_report(KEY, Report("d", 1, 1, 1, LwState.IDLE, Result.SUCCESS))
    with pytest.raises(ProtocolError) as e:
        protocol.decode_report(data, bytes(32))
    assert e.value.reason == "mac"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        with pytest.raises(ProtocolError):
            protocol.decode_report(bytes(flipped), KEY)


def test_oversized_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError) as e:
        protocol.unseal(b"\x00" * (protocol.MAX_REPORT_BYTES + 1))
    assert e.value.reason == "oversized"


def test_wrong_body_shape_is_named() -> None:
    body = {1: "d", 2: "not-a-number", 3: 1, 4: 1, 5: 0, 6: 0}
    frame = protocol.seal(KEY, "d", body)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="key 2"):
        protocol.decode_report(frame, KEY)


def test_parse_device_topic() -> None:
    assert protocol.parse_device_topic("fwcm/v1/acme/dev-1/status") == ("acme", "dev-1", "status")
    with pytest.raises(ProtocolError):
        protocol.parse_device_topic("fwcm/v2/acme/dev-1/status")


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.decode_report(data, KEY)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.binary(max_size=16) | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.integers(-2, 12), c, max_size=6),
        max_leaves=20,
    )
)
def test_arbitrary_cbor_bodies_raise_only_protocol_error(body: object) -> None:
    frame = cbor2.dumps(cbor2.CBORTag(17, [cbor2.dumps({1: 4}), {4: b"d"}, cbor2.dumps(body), b"12345678"]))
    with contextlib.suppress(ProtocolError):
        protocol.Report.from_map(protocol.unseal(frame).open(KEY))
    try:
        protocol.Notice.from_map(body if isinstance(body, dict) else {})
        protocol.Report.from_map(body if isinstance(body, dict) else {})
    except ProtocolError:
        pass


@given(
    kid=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=300),
    blob=st.binary(max_size=70_000),
)
@settings(max_examples=60, deadline=None)
def test_the_written_frame_is_the_generic_cbor_encoding(kid: str, blob: bytes) -> None:
    """``seal`` writes the frame around the payload by hand: byte for byte what a general CBOR
    encoder makes of the COSE_Mac0, for every length form of the byte strings."""
    key = b"k" * 32
    body = {1: kid, 2: 7, 6: blob}
    payload = cbor2.dumps(body, canonical=True)
    structure = cbor2.dumps(["MAC0", framing._PROTECTED, b"", payload])
    tag = hmac.digest(key, structure, "sha256")[:8]
    expected = cbor2.dumps(cbor2.CBORTag(17, [framing._PROTECTED, {4: kid.encode()}, payload, tag]))
    sealed = framing.seal(key, kid, body)
    assert sealed == expected
    assert framing.unseal(sealed, len(sealed)).open(key) == body


_CBOR_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8) | st.floats(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.integers() | st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    body=st.dictionaries(st.integers(min_value=-30, max_value=70_000) | st.text(max_size=3), _CBOR_VALUES)
    | st.dictionaries(st.integers(min_value=0, max_value=70_000), st.integers() | st.binary(max_size=30)),
)
@settings(max_examples=300, deadline=None)
def test_deterministic_encoding_is_cbor2s_canonical_one(body: dict) -> None:
    """The unsorted fast path of ``deterministic`` writes exactly the canonical bytes, whatever
    the keys' order, kinds and signs and whatever the values."""
    assert framing.deterministic(body) == cbor2.dumps(body, canonical=True)


def test_deterministic_encoding_sorts_what_is_out_of_order() -> None:
    assert framing.deterministic({2: b"", 1: 0}) == bytes.fromhex("a2 01 00 02 40")
    assert framing.deterministic({1: {3: 0, 2: 0}}) == bytes.fromhex("a1 01 a2 02 00 03 00")
