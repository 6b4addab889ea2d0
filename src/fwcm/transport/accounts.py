"""Broker accounts: each device may use its own topics only, the server replicas every fwcm topic.

A device's account is ``{tenant}/{device}`` with the password ``protocol.device_password`` derives
from its secret.  It may subscribe to and receive its notice topic and publish on its status and
presence topics (its last will included), nothing else.  The service account (the credentials in
the server's ``FWCM_MQTT_URL``) may use everything under ``fwcm/``.  Nobody else gets in.

Mosquitto gets them as two pairs of ``password_file`` (``user:$6$salt$hash``, one line per
account) and ``acl_file``, one pair per listener (``per_listener_settings true``): the devices'
listener knows only device accounts, and its ACL is three ``pattern`` lines with ``%u``, so it does
not grow with the fleet; the service listener knows only the service account.  A device therefore
cannot even log in where the server replicas connect, and on its own listener
``use_username_as_clientid`` makes its client id its username, so it cannot take another device's
session over.  The files are replaced atomically (temp file and rename) and the broker is asked to
re-read them with SIGHUP.  The embedded amqtt broker reads the same password files and applies
:func:`allowed`, the rule both ACL files state.

Passwords are hashed with Mosquitto's ``$6$`` scheme (one SHA-512 over password and a 12-byte
salt) rather than the iterated ``$7$``: device passwords are 256-bit HMAC outputs, so iterations
add nothing against guessing, while the files are rewritten whole (100,000 passwords: 16 s with
``$7$``, 0.3 s with ``$6$``) and Mosquitto re-verifies the password of every session it holds on
each reload.  Both are accepted when reading.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import hmac
import logging
import os
import signal
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fwcm import protocol

log = logging.getLogger(__name__)

DEVICES_PASSWD = "devices.passwd"
DEVICES_ACL = "devices.acl"
SERVICE_PASSWD = "service.passwd"
SERVICE_ACL = "service.acl"
SALT_BYTES = 12
"""Mosquitto 2.0 accepts only 12-byte salts."""
BATCH = 1000
"""Lines written (and salts drawn) at a time."""
FILE_MODE = 0o640
"""Readable by the broker through the directory's group, never by everyone."""
SERVICE_PREFIX = "fwcm/"


@dataclass(frozen=True)
class Credentials:
    """An MQTT username and password."""

    username: str
    password: str

    def __repr__(self) -> str:  # never print the password
        return f"Credentials(username={self.username!r})"


def check_service_username(username: str) -> str:
    """The service account's name must fit both files and never look like a device's."""
    if not username or any(c.isspace() or c in ":/+#" for c in username):
        raise ValueError(
            f"broker service username {username!r} must be non-empty, without spaces, ':', '/', '+' or '#'"
        )
    return username


def device_credentials(secret: bytes, tenant: str, device: str) -> Credentials:
    return Credentials(
        protocol.broker_username(tenant, device), protocol.device_password(secret, tenant, device)
    )


# -- password hashes ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Mosquitto's ``$6$``: base64 salt, base64 SHA-512 of the password followed by the salt."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    return "$6$" + _b64(salt) + "$" + _b64(hashlib.sha512(password.encode() + salt).digest())


def verify_password(password: str, hashed: str) -> bool:
    """Check a password against a ``$6$`` or ``$7$`` (PBKDF2-SHA-512) hash from a password file."""
    parts = hashed.split("$")
    try:
        if len(parts) == 4 and parts[:2] == ["", "6"]:
            salt, want = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
            got = hashlib.sha512(password.encode() + salt).digest()
        elif len(parts) == 5 and parts[:2] == ["", "7"]:
            iterations = int(parts[2])
            if not 1 <= iterations <= 1_000_000:
                return False
            salt, want = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(want) or 1)
        else:
            return False
    except ValueError:  # bad base64 or iteration count
        return False
    return hmac.compare_digest(got, want)


# -- the rule -----------------------------------------------------------------------------------


class Action(enum.Enum):
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"
    PUBLISH = "publish"


def device_of(username: str) -> tuple[str, str] | None:
    """(tenant, device) of a device account's username, None for any other name."""
    tenant, sep, device = username.partition("/")
    if not sep or not protocol.NAME_RE.match(tenant) or not protocol.NAME_RE.match(device):
        return None
    return tenant, device


def allowed(username: str, service_username: str, topic: str, action: Action) -> bool:
    """Whether an authenticated client may use ``topic`` (a filter when subscribing).

    The service account: anything under ``fwcm/``.  A device: subscribe to and receive exactly its
    notice topic; publish exactly on its status and presence topics.
    """
    if username == service_username:
        return topic.startswith(SERVICE_PREFIX)
    owner = device_of(username)
    if owner is None:
        return False
    if action is Action.PUBLISH:
        return topic in (protocol.status_topic(*owner), protocol.presence_topic(*owner))
    return topic == protocol.notice_topic(*owner)


def devices_acl() -> str:
    """Mosquitto's ACL file of the devices' listener, stating :func:`allowed` for devices.

    Mosquitto 2.0 does not check subscriptions against it, only what a client may receive: a device
    may subscribe to anything and is handed only its own notices.
    """
    prefix = protocol.TOPIC_PREFIX
    return (
        "# Written by fwcm. Every device (username tenant/device): its notices in, status and presence out.\n"
        f"pattern read {prefix}/%u/notice\n"
        f"pattern write {prefix}/%u/status\n"
        f"pattern write {prefix}/%u/presence\n"
    )


def service_acl(service_username: str) -> str:
    """Mosquitto's ACL file of the service listener: the server replicas use every fwcm topic."""
    check_service_username(service_username)
    return f"# Written by fwcm.\nuser {service_username}\ntopic readwrite {SERVICE_PREFIX}#\n"


# -- files --------------------------------------------------------------------------------------


def _replace(path: Path, chunks: Iterable[str]) -> None:
    """Write ``path`` through a temp file in the same directory and rename it over the old one, so
    the broker never reads half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_accounts(directory: Path, service: Credentials, devices: Iterable[Credentials]) -> int:
    """Replace the devices' password file (and the other three files when their content changed);
    returns the number of device accounts written."""
    check_service_username(service.username)
    directory = Path(directory)
    count = 0

    def lines() -> Iterable[str]:
        nonlocal count
        batch: list[str] = []
        salts = os.urandom(SALT_BYTES * BATCH)
        for account in devices:
            salt = salts[len(batch) * SALT_BYTES : (len(batch) + 1) * SALT_BYTES]
            batch.append(f"{account.username}:{hash_password(account.password, salt)}\n")
            if len(batch) == BATCH:
                count += len(batch)
                yield "".join(batch)
                batch.clear()
                salts = os.urandom(SALT_BYTES * BATCH)
        count += len(batch)
        yield "".join(batch)

    _replace(directory / DEVICES_PASSWD, lines())
    _replace_if_changed(directory / DEVICES_ACL, devices_acl())
    _replace_if_changed(directory / SERVICE_ACL, service_acl(service.username))
    passwd = directory / SERVICE_PASSWD
    known = read_password_file(passwd).get(service.username) if passwd.exists() else None
    if known is None or not verify_password(service.password, known):
        _replace(passwd, [f"{service.username}:{hash_password(service.password)}\n"])
    return count


def _replace_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        _replace(path, [text])


def read_password_file(path: Path) -> dict[str, str]:
    """username → hash, as Mosquitto reads it (``#`` comments and lines without ``:`` skipped)."""
    users: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or ":" not in line:
                continue
            username, _, hashed = line.rstrip("\r\n").partition(":")
            users[username.strip()] = hashed.strip()
    return users


def signal_reload(pid_file: Path) -> bool:
    """SIGHUP to the broker whose pid is in ``pid_file``: it re-reads both files.  False (and a
    warning) when there is no such process."""
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        log.warning("could not ask the broker to reload its accounts (pid file %s): %s", pid_file, exc)
        return False
    return True
