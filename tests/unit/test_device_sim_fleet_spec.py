"""Fleet bookkeeping and the registration CSV (pure logic)."""

from __future__ import annotations

import uuid

import pytest

from device_sim.agent import AgentStatus
from device_sim.faults import get_profile
from device_sim.fleet import FleetReport, all_finished, devices_csv, transport_for
from fwcm.devices import parse_devices_csv
from fwcm.protocol import LwState, Result

VENDOR = uuid.uuid5(uuid.NAMESPACE_DNS, "example.com")
CLASS = uuid.uuid5(VENDOR, "m1")


def test_registration_csv_is_accepted_by_the_server_parser() -> None:
    names = ["sim-00000", "sim-00001", "sim-00002"]
    text = devices_csv(names, [transport_for(i, "mixed") for i in range(3)], VENDOR, CLASS, 4)
    devices = parse_devices_csv(text)
    assert [d.name for d in devices] == names
    assert {str(d.vendor_id) for d in devices} == {str(VENDOR)}
    assert {str(d.class_id) for d in devices} == {str(CLASS)}
    assert [d.transport for d in devices] == ["mqtt", "coap", "mqtt"]
    assert [d.tags["transport"] for d in devices] == ["mqtt", "coap", "mqtt"]
    assert all(d.sequence == 4 and len(d.secret) == 32 for d in devices)


def test_transport_for() -> None:
    assert [transport_for(i, "mixed") for i in range(4)] == ["mqtt", "coap", "mqtt", "coap"]
    assert transport_for(3, "coap") == "coap"
    with pytest.raises(ValueError):
        transport_for(0, "udp")


def test_report_compares_results_with_profile() -> None:
    profile = get_profile("corrupt")  # index 3 must fail with INTEGRITY_FAILURE
    report = FleetReport(profile)
    for i in range(5):
        report.devices[f"d{i}"] = AgentStatus(f"d{i}", i, "mqtt", connected=True, connects=1)
    for i in (0, 1, 2):
        report.devices[f"d{i}"].results[9] = Result.SUCCESS
    report.devices["d3"].results[9] = Result.INTEGRITY_FAILURE
    report.devices["d4"].state = LwState.DOWNLOADING
    assert not all_finished(9)(report)
    assert report.by_state(9) == {"downloading": 1, "failed:INTEGRITY_FAILURE": 1, "succeeded": 3}
    assert report.unexpected(9) == ["d4"]
    report.devices["d4"].results[9] = Result.UPDATE_FAILED
    assert all_finished(9)(report) and all_finished()(report)
    assert report.unexpected(9) == ["d4"]
    report.devices["d4"].results[9] = Result.SUCCESS
    assert report.unexpected(9) == []
    summary = report.as_dict(9)
    assert (summary["succeeded"], summary["failed"], summary["devices"]) == (4, 1, 5)
    assert report.result("d3") == Result.INTEGRITY_FAILURE and report.result("d3", 8) is None
