"""Broker accounts without a broker: the password derivation, Mosquitto's hash formats, the topic
rule, and the files as written."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from fwcm import protocol
from fwcm.transport import accounts
from fwcm.transport.accounts import Action, Credentials

SERVICE = "fwcm"
# lines written by Debian's mosquitto_passwd 2.0.11 (-H sha512, and the default sha512-pbkdf2)
MOSQUITTO_6 = (
    "$6$a6YN31JRM+17wXXn$"
    "l+4tua9OIZj4Ie9maz4A253xdRh8faOH/DCrEOFK6a1U3gkvG/Bv3YtQZKFVJOqtXkWCPeEZj/JqQ8Lnq8MUjw=="
)
MOSQUITTO_7 = (
    "$7$101$aik89CmvEZOv4Zlv$"
    "na3sz7+rcV3DAl9/zE9o8ogHWeWjQOI5PDcrpWSZRSdmaIZr6mfiCTy26YUdTGC353BUiUDFvDPSXBJY6cHC3A=="
)


def test_device_password_is_hmac_of_the_username_under_the_secret() -> None:
    secret = bytes(range(32))
    expected = hmac.new(secret, b"fwcm device password v1\x00acme/dev-1", hashlib.sha256).digest()
    assert protocol.broker_username("acme", "dev-1") == "acme/dev-1"
    assert protocol.device_password(secret, "acme", "dev-1") == "PbWzyygP3BefeNWtT0hiXxTm03boYCb3-gMEAeuneQw"
    assert base64.urlsafe_b64decode(protocol.device_password(secret, "acme", "dev-1") + "=") == expected
    # another owner (a transfer) or another secret gives another password
    assert protocol.device_password(secret, "other", "dev-1") != protocol.device_password(
        secret, "acme", "dev-1"
    )
    assert protocol.device_password(b"\x01" * 32, "acme", "dev-1") != protocol.device_password(
        secret, "acme", "dev-1"
    )


def test_hashes_written_by_mosquitto_passwd_verify() -> None:
    assert accounts.verify_password("device-password", MOSQUITTO_6)
    assert not accounts.verify_password("device-passwort", MOSQUITTO_6)
    assert accounts.verify_password("secretpw", MOSQUITTO_7)
    assert not accounts.verify_password("secretpx", MOSQUITTO_7)


@pytest.mark.parametrize(
    "hashed",
    [
        "",
        "plain",
        "$6$",
        "$6$!!$??",
        "$5$abc$def",
        "$7$0$aik89CmvEZOv4Zlv$na3s",
        "$7$x$a$b",
        MOSQUITTO_7[:-5],
    ],
)
def test_malformed_hashes_verify_nothing(hashed: str) -> None:
    assert not accounts.verify_password("secretpw", hashed)


def test_own_hashes_are_mosquittos_sha512_format() -> None:
    salt = b"0123456789ab"
    line = accounts.hash_password("pw", salt)
    _, kind, b64salt, b64hash = line.split("$")
    assert kind == "6" and base64.b64decode(b64salt) == salt
    assert base64.b64decode(b64hash) == hashlib.sha512(b"pw" + salt).digest()
    assert accounts.verify_password("pw", accounts.hash_password("pw"))
    assert accounts.hash_password("pw") != accounts.hash_password("pw")  # fresh salt each time


@pytest.mark.parametrize(
    ("username", "topic", "action", "allowed"),
    [
        ("acme/d1", "fwcm/v1/acme/d1/notice", Action.SUBSCRIBE, True),
        ("acme/d1", "fwcm/v1/acme/d1/notice", Action.RECEIVE, True),
        ("acme/d1", "fwcm/v1/acme/d1/status", Action.PUBLISH, True),
        ("acme/d1", "fwcm/v1/acme/d1/presence", Action.PUBLISH, True),
        ("acme/d1", "fwcm/v1/acme/d1/notice", Action.PUBLISH, False),
        ("acme/d1", "fwcm/v1/acme/d1/status", Action.RECEIVE, False),
        ("acme/d1", "fwcm/v1/acme/d2/notice", Action.SUBSCRIBE, False),
        ("acme/d1", "fwcm/v1/acme/d2/notice", Action.RECEIVE, False),
        ("acme/d1", "fwcm/v1/other/d1/notice", Action.RECEIVE, False),
        ("acme/d1", "fwcm/v1/acme/d2/status", Action.PUBLISH, False),
        ("acme/d1", "fwcm/v1/acme/+/notice", Action.SUBSCRIBE, False),
        ("acme/d1", "fwcm/v1/#", Action.SUBSCRIBE, False),
        ("acme/d1", "#", Action.SUBSCRIBE, False),
        ("fwcm", "fwcm/v1/+/+/status", Action.SUBSCRIBE, True),
        ("fwcm", "fwcm/v1/acme/d1/notice", Action.PUBLISH, True),
        ("fwcm", "fwcm/v1/acme/d1/status", Action.RECEIVE, True),
        ("fwcm", "#", Action.SUBSCRIBE, False),
        ("fwcm", "$SYS/broker/clients", Action.RECEIVE, False),
        ("acme", "fwcm/v1/acme/d1/notice", Action.RECEIVE, False),  # not a device, not the service
        ("acme/d1/x", "fwcm/v1/acme/d1/x/notice", Action.RECEIVE, False),
        ("acme/+", "fwcm/v1/acme/+/notice", Action.RECEIVE, False),
    ],
)
def test_the_rule(username: str, topic: str, action: Action, allowed: bool) -> None:
    assert accounts.allowed(username, SERVICE, topic, action) is allowed


def test_files_as_written(tmp_path: Path) -> None:
    service = Credentials(SERVICE, "service-password")
    devices = [accounts.device_credentials(bytes([i]) * 32, "acme", f"d{i}") for i in range(3)]
    assert accounts.write_accounts(tmp_path, service, devices) == 3
    users = accounts.read_password_file(tmp_path / accounts.DEVICES_PASSWD)
    assert sorted(users) == ["acme/d0", "acme/d1", "acme/d2"]
    for d in devices:
        assert accounts.verify_password(d.password, users[d.username])
    service_users = accounts.read_password_file(tmp_path / accounts.SERVICE_PASSWD)
    assert list(service_users) == [SERVICE]
    assert accounts.verify_password("service-password", service_users[SERVICE])
    assert (tmp_path / accounts.SERVICE_ACL).read_text().splitlines()[-2:] == [
        "user fwcm",
        "topic readwrite fwcm/#",
    ]
    patterns = [
        ln for ln in (tmp_path / accounts.DEVICES_ACL).read_text().splitlines() if not ln.startswith("#")
    ]
    assert patterns == [
        "pattern read fwcm/v1/%u/notice",
        "pattern write fwcm/v1/%u/status",
        "pattern write fwcm/v1/%u/presence",
    ]
    for name in (accounts.DEVICES_PASSWD, accounts.SERVICE_PASSWD, accounts.DEVICES_ACL):
        assert (tmp_path / name).stat().st_mode & 0o777 == accounts.FILE_MODE
    # a device goes: its line goes; nothing but the four files is left behind
    accounts.write_accounts(tmp_path, service, devices[1:])
    assert sorted(accounts.read_password_file(tmp_path / accounts.DEVICES_PASSWD)) == ["acme/d1", "acme/d2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [accounts.DEVICES_PASSWD, accounts.DEVICES_ACL, accounts.SERVICE_PASSWD, accounts.SERVICE_ACL]
    )


@pytest.mark.parametrize("name", ["", "with space", "a:b", "acme/d1"])
def test_a_service_name_that_fits_no_file_or_looks_like_a_device_is_refused(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(ValueError, match="service username"):
        accounts.write_accounts(tmp_path, Credentials(name, "pw"), [])
