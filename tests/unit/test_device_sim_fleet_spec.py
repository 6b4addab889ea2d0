"""Fleet bookkeeping, the registration CSV and the files of imported devices (pure logic)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from device_sim.__main__ import device_coap_url, device_mqtt_url
from device_sim.agent import AgentStatus
from device_sim.faults import get_profile
from device_sim.fleet import (
    FleetReport,
    FleetSpec,
    all_finished,
    build_configs,
    devices_csv,
    read_secrets,
    transport_for,
)
from fwcm import manifest as mf
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


# -- devices imported earlier ------------------------------------------------------------------

SECRETS_HEADER = "name,secret,mqtt_username,mqtt_password\n"


def test_secrets_file_rows_are_read_in_order(tmp_path: Path) -> None:
    path = tmp_path / "secrets.csv"
    path.write_text(SECRETS_HEADER + f"b,{'ab' * 32},acme/b,pw-b\na,{'cd' * 32},acme/a,pw-a\n\n")
    rows = read_secrets(path)
    assert [r["name"] for r in rows] == ["b", "a"]
    assert rows[1] == {"name": "a", "secret": "cd" * 32, "mqtt_username": "acme/a", "mqtt_password": "pw-a"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,secret\na,00\n", "no column mqtt_username, mqtt_password"),
        (SECRETS_HEADER + "a,zz,u,p\n", "line 2: the secret of a is not hex"),
        (SECRETS_HEADER + "a,00,u,p\na,01,u,p\n", "line 3: a appears twice"),
        (SECRETS_HEADER, "names no device"),
    ],
)
def test_bad_secrets_files_are_refused_with_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "secrets.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_secrets(path)


def test_imported_devices_keep_their_own_class_and_hardware(tmp_path: Path) -> None:
    other = uuid.uuid5(VENDOR, "m2")
    spec = FleetSpec(
        "acme",
        [
            {
                "name": "a",
                "secret": "00" * 32,
                "transport": "coap",
                "index": 0,
                "sequence": 3,
                "vendor_id": str(VENDOR),
                "class_id": str(other),
                "hardware_id": None,
                "mqtt_username": "acme/a",
                "mqtt_password": "pw",
            },
            {"name": "sim-1", "secret": "01" * 32, "transport": "mqtt", "index": 1, "sequence": 1},
        ],
    )
    a, sim = build_configs(
        spec,
        vendor_id=VENDOR,
        class_id=CLASS,
        trust_anchors=[],
        state_dir=tmp_path,
        mqtt_url="mqtt://127.0.0.1:1",
        coap_url="coap://127.0.0.1:2",
    )
    assert (a.class_id, a.hardware_id, a.transport, a.installed_sequence) == (other, None, "coap", 3)
    assert a.mqtt_credentials() == ("acme/a", "pw")
    assert (sim.class_id, sim.hardware_id) == (CLASS, "hw-sim-1")
    with pytest.raises(ValueError, match="give --vendor-id and --class-id"):
        build_configs(
            FleetSpec("acme", spec.devices[1:]),
            vendor_id=None,
            class_id=None,
            trust_anchors=[],
            state_dir=tmp_path,
            mqtt_url="mqtt://127.0.0.1:1",
            coap_url="coap://127.0.0.1:2",
        )


def test_device_addresses_follow_the_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FWCM_MQTT_URL", "FWCM_PUBLIC_COAP_URL", "FWCM_COAP_BIND"):
        monkeypatch.delenv(name, raising=False)
    assert (device_mqtt_url(), device_coap_url()) == ("mqtt://127.0.0.1:1883", "coap://127.0.0.1:5683")
    monkeypatch.setenv("FWCM_MQTT_URL", "mqtts://svc:p%40ss@broker.lan:8883?ca=/etc/ca.pem")
    monkeypatch.setenv("FWCM_COAP_BIND", "0.0.0.0:5684")
    assert device_mqtt_url() == "mqtts://broker.lan:8883?ca=/etc/ca.pem"  # not the server's account
    assert device_coap_url() == "coap://0.0.0.0:5684"
    monkeypatch.setenv("FWCM_PUBLIC_COAP_URL", "coap://fw.example.com")
    assert device_coap_url() == "coap://fw.example.com"


def test_sample_devices_csv_matches_the_tour_manifest() -> None:
    """examples/devices.csv imports, and its devices are of the class the README's manifest names
    (--vendor-domain example.com --model sensor-v1)."""
    devices = parse_devices_csv((Path(__file__).parents[2] / "examples" / "devices.csv").read_text())
    vendor = mf.vendor_id_for_domain("example.com")
    assert {(d.vendor_id, d.class_id) for d in devices} == {
        (str(vendor), str(mf.class_id_for(vendor, "sensor-v1")))
    }
    assert sum(d.tags["region"] == "eu" for d in devices) == 8 and len(devices) == 12
    assert {d.sequence for d in devices} == {1}
