"""Device and factory input checks (pure): one device, a CSV import, a factory upload."""

from __future__ import annotations

import uuid

import pytest

from fwcm import inventory
from fwcm.devices import MAX_IMPORT_ERRORS, parse_devices_csv, validate_device
from fwcm.errors import ImportErrors, Invalid

VENDOR = str(uuid.uuid5(uuid.NAMESPACE_DNS, "example.com"))
CLASS = str(uuid.uuid5(uuid.UUID(VENDOR), "sensor-a"))


def _csv(rows: list[str]) -> str:
    return "name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret\n" + "\n".join(rows)


def test_csv_bad_header_reported_on_line_1() -> None:
    with pytest.raises(ImportErrors, match=r"line 1: unknown column.*colour.*missing column.*class_id"):
        parse_devices_csv("name,vendor_id,colour\n")
    with pytest.raises(ImportErrors, match="line 1: empty file"):
        parse_devices_csv("")


def test_csv_errors_are_capped() -> None:
    rows = [f"bad{i},x,y,,,,,," for i in range(80)]
    with pytest.raises(ImportErrors) as info:
        parse_devices_csv(_csv(rows))
    assert len(info.value.errors) == MAX_IMPORT_ERRORS
    assert info.value.more == 30
    assert "and 77 more" in str(info.value)


@pytest.mark.parametrize(
    ("sequence", "message"),
    [
        ("x", "sequence must be an integer, got 'x'"),
        (-1, "sequence must be a non-negative integer, got -1"),
        (2**63, f"sequence must be a non-negative integer, got {2**63}"),
        (True, "sequence must be a non-negative integer, got True"),
    ],
)
def test_fleet_and_factory_devices_refuse_a_sequence_alike(sequence: object, message: str) -> None:
    with pytest.raises(Invalid) as fleet:
        validate_device("d1", VENDOR, CLASS, sequence=sequence)
    entry = {"serial": "s1", "hardware_id": "hw", "vendor": "example.com", "model": "m"}
    with pytest.raises(Invalid) as factory:
        inventory.validate_factory_device(**entry, claim_hash="0" * 64, secret="0" * 64, sequence=sequence)
    assert str(fleet.value) == str(factory.value) == message


def test_a_device_gets_defaults_and_a_fresh_secret() -> None:
    a = validate_device("d1", VENDOR.upper(), CLASS, {"rack": 3}, "7", "", None)
    b = validate_device("d1", VENDOR, CLASS)
    assert (a.vendor_id, a.tags, a.sequence, a.version, a.transport) == (
        VENDOR,
        {"rack": "3"},
        7,
        None,
        "mqtt",
    )
    assert len(a.secret) == len(b.secret) == 32 and a.secret != b.secret
    with pytest.raises(Invalid, match="transport must be one of mqtt, coap"):
        validate_device("d1", VENDOR, CLASS, transport="pigeon")
