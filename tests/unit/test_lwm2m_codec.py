"""The LwM2M codec (registrations, link format, the four content formats fwcm reads) and how an
observed /5 state and result become a report."""

from __future__ import annotations

import json

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwcm.protocol import LwState, ProtocolError, Result
from fwcm.protocol import lwm2m as lw
from fwcm.rollout.deployment import state_for_report
from fwcm.rollout.states import DeviceState


def test_registration_query_and_links() -> None:
    reg = lw.parse_query(["ep=demo:dev-1", "lt=300", "lwm2m=1.1", "b=U"])
    assert reg == lw.Registration("demo:dev-1", 300, "1.1", "U")
    assert lw.split_endpoint(reg.endpoint or "") == ("demo", "dev-1")
    links = lw.parse_links(b'</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>,</5/0>;ver=1.0,</33629>')
    assert links == {(1, 0), (3, 0), (5, 0), (33629,)}
    assert lw.has_instance(links, 5) and not lw.has_instance(links, 33629)
    assert lw.parse_query(["lt=60"], update=True).lifetime == 60


@pytest.mark.parametrize(
    ("queries", "update", "why"),
    [
        (["lt=300"], False, "endpoint"),
        (["ep=a:b", "lt=0"], False, "lifetime"),
        (["ep=a:b", "lt=99999999999"], False, "lifetime"),
        (["ep=a:b", "lwm2m=2.0"], False, "version"),
        (["ep=a:b", "b=X"], False, "binding"),
        (["ep=a:b", "ep=c:d"], False, "twice"),
        (["ep=a:b"], True, "endpoint"),
        ([f"x{i}=1" for i in range(20)], False, "too many"),
    ],
)
def test_registration_query_refused(queries: list[str], update: bool, why: str) -> None:
    with pytest.raises(ProtocolError, match=why) as err:
        lw.parse_query(queries, update=update)
    assert err.value.reason == "lwm2m"


@pytest.mark.parametrize("endpoint", ["dev-1", "a:b:c", ":dev", "tenant:", "urn:imei:1234", "t:d/x"])
def test_endpoint_names_must_be_tenant_and_device(endpoint: str) -> None:
    with pytest.raises(ProtocolError, match="tenant:device"):
        lw.split_endpoint(endpoint)


@pytest.mark.parametrize(
    "payload",
    [b"</5/0/3/1>", b"<5/0>", b"</a/0>", b"</99999>", b"\xff", b"</5/0>;" + b"x" * 3000, b"</5/0" + b">junk"],
)
def test_bad_links_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        lw.parse_links(payload)


def test_too_many_links_refused() -> None:
    with pytest.raises(ProtocolError, match="more than"):
        lw.parse_links(",".join(f"</{i}/0>" for i in range(lw.MAX_LINKS + 1)).encode())


def test_plain_text_values() -> None:
    assert lw.read_int(b"2", None, lw.FW_STATE) == 2
    assert lw.read_int(b"11", lw.TEXT, lw.FW_RESULT) == 11
    assert lw.read_text(b"2.0.0", lw.TEXT, lw.DEVICE_FIRMWARE_VERSION) == "2.0.0"
    for bad in (b"", b"two", b"1.5", b"9" * 30):
        with pytest.raises(ProtocolError, match="not an integer"):
            lw.read_int(bad, lw.TEXT, lw.FW_STATE)
    with pytest.raises(ProtocolError, match="UTF-8"):
        lw.read_text(b"\xff\xfe", lw.TEXT, lw.DEVICE_FIRMWARE_VERSION)


def test_tlv_values() -> None:
    # one resource, 1-byte integer: 0b11 0 00 001, id 3, value 1
    assert lw.read_int(b"\xc1\x03\x01", lw.LWM2M_TLV, lw.FW_STATE) == 1
    # 2-byte and negative integers
    assert lw.read_int(b"\xc2\x05\x01\x00", lw.LWM2M_TLV, lw.FW_RESULT) == 256
    assert lw.read_int(b"\xc1\x05\xff", lw.LWM2M_TLV, lw.FW_RESULT) == -1
    # an object instance /5/0 holding resources 3 and 5, read at /5
    inner = b"\xc1\x03\x02\xc1\x05\x00"
    values = lw.decode_values(b"\x06\x00" + inner, lw.LWM2M_TLV, (5,))
    assert values == {(5, 0, 3): b"\x02", (5, 0, 5): b"\x00"}
    # the instance's resources read at /5/0
    assert lw.decode_values(inner, lw.LWM2M_TLV, (5, 0)) == {(5, 0, 3): b"\x02", (5, 0, 5): b"\x00"}
    # a string with an 8-bit length field: 0b11 0 01 000
    version = b"1.2.3-rc1"
    tlv = bytes([0xC8, 0x03, len(version)]) + version
    assert lw.read_text(tlv, lw.LWM2M_TLV, lw.DEVICE_FIRMWARE_VERSION) == "1.2.3-rc1"
    # a multiple resource with two instances (0b10 0 00 110, id 6)
    multi = b"\x86\x06\x41\x00\x01\x41\x01\x05"
    assert lw.decode_values(multi, lw.LWM2M_TLV, (3, 0)) == {(3, 0, 6, 0): b"\x01", (3, 0, 6, 1): b"\x05"}


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\xc1\x03", "past the payload"),
        (b"\xc8", "truncated"),
        (b"\xc1\x04\x01", "does not belong"),
        (b"\xc3\x03\x00\x00\x01", "1, 2, 4 or 8 bytes"),
        (b"\x41\x00\x01", "outside a multiple resource"),
        (b"\xc1\x03\x01" * 40, "more than"),
    ],
)
def test_tlv_garbage_refused(payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        lw.read_int(payload, lw.LWM2M_TLV, lw.FW_STATE)


def test_senml_json_and_cbor_values() -> None:
    pack = [{"bn": "/5/0/", "n": "3", "v": 2}, {"n": "5", "v": 0}]
    assert lw.decode_values(json.dumps(pack).encode(), lw.SENML_JSON, (5, 0)) == {
        lw.FW_STATE: 2,
        lw.FW_RESULT: 0,
    }
    assert lw.read_int(json.dumps(pack[:1]).encode(), lw.SENML_JSON, lw.FW_STATE) == 2
    cbor_pack = cbor2.dumps([{-2: "/3/0/", 0: "3", 3: "2.0.0"}])
    assert lw.read_text(cbor_pack, lw.SENML_CBOR, lw.DEVICE_FIRMWARE_VERSION) == "2.0.0"
    assert lw.read_int(cbor2.dumps([{0: "/5/0/5", 2: 1.0}]), lw.SENML_CBOR, lw.FW_RESULT) == 1


@pytest.mark.parametrize(
    ("pack", "why"),
    [
        ({"n": "/5/0/3", "v": 1}, "array"),
        ([], "array"),
        ([{"n": "/5/0/3", "v": True}], "not a number"),
        ([{"n": "/5/0/3", "v": 1, "vs": "x"}], "one value"),
        ([{"n": "/5/0/x", "v": 1}], "not an LwM2M path"),
        ([{"n": "/5/0/3", "v": 1.5}], "not an integer"),
        ([{"n": "/5/0/3", "v": 2**70}], "out of range"),
        ([{"n": "/5/0/5", "v": 1}], "not under the path read"),
        ([{"n": "/5/0/3", "vs": "1"}], "not an integer"),
        ([{"n": "/5/0/3", "vs": "x" * 300}], "at most"),
    ],
)
def test_senml_garbage_refused(pack: object, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        lw.read_int(json.dumps(pack).encode(), lw.SENML_JSON, lw.FW_STATE)


def test_unknown_format_and_oversized_refused() -> None:
    with pytest.raises(ProtocolError, match="content format"):
        lw.read_int(b"1", lw.OPAQUE, lw.FW_STATE)
    with pytest.raises(ProtocolError, match="exceeds"):
        lw.read_int(b"1" * (lw.MAX_VALUE_BYTES + 1), lw.TEXT, lw.FW_STATE)


@settings(max_examples=300)
@given(st.binary(max_size=300), st.sampled_from([None, *lw.READABLE_FORMATS, lw.OPAQUE, 9999]))
def test_garbage_values_only_ever_refused(payload: bytes, content_format: int | None) -> None:
    for path in (lw.FW_STATE, (5, 0), (5,)):
        try:
            values = lw.decode_values(payload, content_format, path)
        except ProtocolError:
            continue
        assert len(values) <= lw.MAX_RECORDS and all(p[: len(path)] == path for p in values)


@settings(max_examples=300)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_garbage_links_only_ever_refused(payload: bytes) -> None:
    try:
        paths = lw.parse_links(payload)
    except ProtocolError:
        return
    assert all(1 <= len(p) <= 2 for p in paths)


@given(st.lists(st.text(max_size=40), max_size=12), st.booleans())
def test_garbage_queries_only_ever_refused(queries: list[str], update: bool) -> None:
    try:
        reg = lw.parse_query(queries, update=update)
    except ProtocolError:
        return
    assert (reg.endpoint is None) == update


@pytest.mark.parametrize(
    ("state", "result", "reported"),
    [
        (LwState.IDLE, Result.INITIAL, None),  # written, nothing happened yet
        (LwState.DOWNLOADING, Result.INITIAL, (LwState.DOWNLOADING, Result.INITIAL)),
        (LwState.DOWNLOADED, Result.INITIAL, (LwState.DOWNLOADED, Result.INITIAL)),
        (LwState.UPDATING, Result.INITIAL, (LwState.UPDATING, Result.INITIAL)),
        (LwState.UPDATING, Result.SUCCESS, (LwState.UPDATING, Result.INITIAL)),  # not yet back to Idle
        (LwState.IDLE, Result.SUCCESS, (LwState.IDLE, Result.SUCCESS)),
        (LwState.IDLE, Result.INTEGRITY_FAILURE, (LwState.IDLE, Result.INTEGRITY_FAILURE)),
        (LwState.DOWNLOADED, Result.UPDATE_FAILED, (LwState.IDLE, Result.UPDATE_FAILED)),  # failed install
        (LwState.DOWNLOADING, Result.CONNECTION_LOST, (LwState.IDLE, Result.CONNECTION_LOST)),
    ],
)
def test_observed_state_and_result_become_reports(
    state: LwState, result: Result, reported: tuple[LwState, Result] | None
) -> None:
    assert lw.outcome(state, result) == reported
    if reported is not None:  # and the deployment rules read them as LwM2M means them
        expected = {
            LwState.DOWNLOADING: DeviceState.DOWNLOADING,
            LwState.DOWNLOADED: DeviceState.DOWNLOADED,
            LwState.UPDATING: DeviceState.INSTALLING,
        }.get(reported[0], DeviceState.SUCCEEDED if result == Result.SUCCESS else DeviceState.FAILED)
        assert state_for_report(*reported) == expected
