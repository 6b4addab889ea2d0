"""Fault selection and the pure helpers of the device transports."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_sim.faults import PROFILES, DeviceFaults, get_profile
from device_sim.transports import MqttTarget, _content_range_start, order_uris
from fwcm.protocol import Result


def test_none_profile_touches_nobody() -> None:
    p = get_profile("none")
    assert all(p.for_device(i) == DeviceFaults() for i in range(200))
    assert all(p.expected_outcome(i) == "succeeded" for i in range(200))


@pytest.mark.parametrize(
    ("name", "failure"),
    [("corrupt", Result.INTEGRITY_FAILURE), ("install-fail", Result.UPDATE_FAILED)],
)
def test_failing_profiles_predict_their_result(name: str, failure: Result) -> None:
    p = get_profile(name)
    affected = [i for i in range(100) if p.affected(i)]
    assert len(affected) == 10
    for i in range(100):
        assert p.expected_result(i) == (failure if i in affected else Result.SUCCESS)
        assert p.expected_outcome(i) == ("failed" if i in affected else "succeeded")
        assert p.for_device(i).any == (i in affected)


def test_boot_fail_devices_are_expected_to_revert() -> None:
    p = get_profile("boot-fail")
    affected = [i for i in range(100) if p.affected(i)]
    assert len(affected) == 10
    for i in range(100):
        assert p.expected_outcome(i) == ("reverted" if i in affected else "succeeded")
        assert p.for_device(i).boot_fail == (i in affected)


@pytest.mark.parametrize("name", ["flaky", "offline", "slow"])
def test_recoverable_profiles_affect_some_devices_but_all_succeed(name: str) -> None:
    p = get_profile(name)
    assert 0 < p.count_affected(100) < 100
    assert all(p.expected_outcome(i) == "succeeded" for i in range(100))


def test_fault_parameters() -> None:
    flaky = get_profile("flaky")
    i = next(i for i in range(20) if flaky.affected(i))
    drop = flaky.for_device(i).drop_at
    assert drop is not None and 0 < drop < 1
    assert get_profile("offline").for_device(2).online_delay >= 2
    assert get_profile("slow").for_device(0).throttle_bps
    assert get_profile("corrupt").for_device(3).corrupt
    assert get_profile("install-fail").for_device(5).install_fail


@given(st.sampled_from(sorted(PROFILES)), st.integers(0, 100_000))
def test_selection_is_deterministic(name: str, index: int) -> None:
    assert get_profile(name).for_device(index) == get_profile(name).for_device(index)
    assert get_profile(name).expected_result(index) == get_profile(name).expected_result(index)


def test_unknown_profile_names_the_choices() -> None:
    with pytest.raises(ValueError, match="flaky"):
        get_profile("nope")


def test_order_uris_prefers_own_transport_and_drops_unsupported() -> None:
    uris = ("http://h/p/1", "ftp://x/1", "coap://h/p/1", "https://cdn/p/1")
    assert order_uris(uris, "coap") == ["coap://h/p/1", "http://h/p/1", "https://cdn/p/1"]
    assert order_uris(uris, "mqtt") == ["http://h/p/1", "https://cdn/p/1", "coap://h/p/1"]
    assert order_uris(("coaps://x/1",), "coap") == []


def test_mqtt_url_parsing() -> None:
    t = MqttTarget.parse("mqtt://127.0.0.1:1884?v=311")
    assert (t.host, t.port, t.tls, t.username) == ("127.0.0.1", 1884, False, None)
    t = MqttTarget.parse("mqtts://dev%40x:p%3Ass@broker.example?ca=/etc/ca.pem")
    assert (t.host, t.port, t.tls) == ("broker.example", 8883, True)
    assert (t.username, t.password, t.ca_file) == ("dev@x", "p:ss", Path("/etc/ca.pem"))
    with pytest.raises(ValueError):
        MqttTarget.parse("http://x")


def test_content_range() -> None:
    assert _content_range_start("bytes 100-199/200") == 100
    assert _content_range_start("items 1-2/3") is None
    assert _content_range_start("garbage") is None


def test_nonconformant_profile_breaks_every_device_the_same_way() -> None:
    p = get_profile("nonconformant")
    assert p.count_affected(20) == 20
    broken = DeviceFaults(skip_digest_check=True, accept_rollback=True, accept_replays=True)
    assert all(p.for_device(i) == broken for i in range(20))
    assert all(p.expected_outcome(i) == "succeeded" for i in range(20))  # a good campaign still succeeds
