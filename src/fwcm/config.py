"""Server settings, read once from the environment so every component sees the same values."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlparse

from cryptography import x509

from fwcm.store.db import normalize_url
from fwcm.transport.accounts import Credentials, check_service_username

if TYPE_CHECKING:
    from fwcm.keystore import KeyStore

MiB = 1024 * 1024
_KEYSTORE_LOCK = threading.Lock()
"""Request threads share one key store per server."""


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 3600:
        raise ValueError(f"{name} must be between 0 and 3600 seconds, got {raw!r}")
    return value


def _path_env(name: str) -> Path | None:
    raw = os.environ.get(name)
    return Path(raw) if raw else None


def _secret_env(name: str) -> str:
    """``NAME`` itself, or the first line of the file ``NAME_FILE`` names (keeps it out of ``ps``)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().splitlines()[0] if Path(path).stat().st_size else ""
    return os.environ.get(name, "")


def _bind_env(name: str, default: str) -> tuple[str, int]:
    raw = os.environ.get(name) or default
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{name} must look like HOST:PORT, got {raw!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class Settings:
    """Where data lives, what the server listens on and how large uploads may be."""

    data_dir: Path = field(default_factory=lambda: Path("fwcm-data"))
    database_url: str = ""
    max_payload_bytes: int = 64 * MiB
    max_manifest_bytes: int = 64 * 1024
    max_import_bytes: int = 64 * MiB
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    coap_host: str = "127.0.0.1"
    coap_port: int = 5683
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    lwm2m_host: str = "127.0.0.1"
    lwm2m_port: int = 0
    """The LwM2M server's UDP port (docs/lwm2m.md); 0: no LwM2M server."""
    lwm2m_package_url: str = ""
    """Base of the Package URIs written to LwM2M devices (``{base}/p/{sha256}``); defaults to the
    public CoAP URL (an ``http://`` base makes them download over HTTP)."""
    public_http_url: str = ""
    """Base URL devices use for HTTP payloads (``{base}/p/{sha256}``); defaults to the HTTP bind."""
    public_coap_url: str = ""
    pki_root: Path | None = None
    """Operator root CA certificate (PEM): signer chains and tenant CAs must lead to it."""
    broker_accounts: Path | None = None
    """Directory of the broker's password and ACL files, kept in step with the devices; None: the
    broker's accounts are managed elsewhere."""
    broker_pid_file: Path | None = None
    """The broker's pid file: SIGHUP makes it re-read the accounts.  None: it notices by itself."""
    webhook_retry_s: float = 10.0
    """Wait before the first retry of a failed webhook delivery; doubled after each failure."""
    webhook_batch_s: float = 10.0
    """Device failures are batched into one ``device.failed`` event per campaign this often."""
    pkcs11_module: str = ""
    """PKCS#11 module (``.so``) holding the server's signing keys; empty: keys are files under
    ``{data_dir}/keys`` (see docs/signing.md)."""
    pkcs11_token: str = ""
    """Label of the token inside the module."""
    pkcs11_pin: str = field(default="", repr=False)
    """The token's user PIN."""
    _root: x509.Certificate | None = field(default=None, init=False, repr=False, compare=False)
    _keystore: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'fwcm.db').resolve()}"
        self.database_url = normalize_url(self.database_url)
        if not self.public_http_url:
            self.public_http_url = f"http://{self.http_host}:{self.http_port}"
        if not self.public_coap_url:
            self.public_coap_url = f"coap://{self.coap_host}:{self.coap_port}"
        if not self.lwm2m_package_url:
            self.lwm2m_package_url = self.public_coap_url
        if self.broker_accounts is not None:
            self.broker_accounts = Path(self.broker_accounts)
            self.broker_service()  # refuse a configuration that would lock the server out
        if self.broker_pid_file is not None:
            self.broker_pid_file = Path(self.broker_pid_file)

    def broker_service(self) -> Credentials:
        """The server's own broker account: the credentials in ``mqtt_url``."""
        u = urlparse(self.mqtt_url)
        if not u.username or not u.password:
            raise ValueError(
                "FWCM_BROKER_ACCOUNTS needs the server's own credentials in FWCM_MQTT_URL "
                "(mqtt://user:password@host:port)"
            )
        return Credentials(check_service_username(unquote(u.username)), unquote(u.password))

    def root_cert(self) -> x509.Certificate | None:
        """The operator root, loaded once; None when no PKI is configured."""
        if self.pki_root is None:
            return None
        if self._root is None:
            from fwcm import pki

            self._root = pki.load_cert(Path(self.pki_root).read_bytes())
        return self._root

    def keystore(self) -> KeyStore:
        """Where the server's signing keys live: the PKCS#11 token when one is configured, else
        key files under ``{data_dir}/keys``; opened once."""
        with _KEYSTORE_LOCK:
            return self._open_keystore()

    def _open_keystore(self) -> KeyStore:
        if self._keystore is None:
            from fwcm import keystore

            if self.pkcs11_module:
                if not self.pkcs11_token:
                    raise keystore.KeyStoreError(
                        "FWCM_PKCS11_MODULE needs FWCM_PKCS11_TOKEN (the token label)"
                    )
                self._keystore = keystore.Pkcs11KeyStore(
                    self.pkcs11_module, self.pkcs11_token, self.pkcs11_pin
                )
            else:
                self._keystore = keystore.FileKeyStore(self.data_dir / "keys")
        return cast("KeyStore", self._keystore)

    @property
    def payload_dir(self) -> Path:
        return self.data_dir / "payloads"

    def ensure_dirs(self) -> None:
        self.payload_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from ``FWCM_*`` variables; keyword arguments win over the environment."""
        http_host, http_port = _bind_env("FWCM_HTTP_BIND", "127.0.0.1:8080")
        coap_host, coap_port = _bind_env("FWCM_COAP_BIND", "127.0.0.1:5683")
        lwm2m_host, lwm2m_port = _bind_env("FWCM_LWM2M_BIND", "127.0.0.1:0")
        values: dict[str, object] = {
            "data_dir": Path(os.environ.get("FWCM_DATA_DIR") or "fwcm-data"),
            "database_url": os.environ.get("FWCM_DATABASE_URL", ""),
            "max_payload_bytes": _int_env("FWCM_MAX_PAYLOAD_BYTES", 64 * MiB),
            "max_manifest_bytes": _int_env("FWCM_MAX_MANIFEST_BYTES", 64 * 1024),
            "max_import_bytes": _int_env("FWCM_MAX_IMPORT_BYTES", 64 * MiB),
            "http_host": http_host,
            "http_port": http_port,
            "coap_host": coap_host,
            "coap_port": coap_port,
            "mqtt_url": os.environ.get("FWCM_MQTT_URL") or "mqtt://127.0.0.1:1883",
            "lwm2m_host": lwm2m_host,
            "lwm2m_port": lwm2m_port,
            "lwm2m_package_url": os.environ.get("FWCM_LWM2M_PACKAGE_URL", "").rstrip("/"),
            "public_http_url": os.environ.get("FWCM_PUBLIC_HTTP_URL", ""),
            "public_coap_url": os.environ.get("FWCM_PUBLIC_COAP_URL", ""),
            "pki_root": Path(os.environ["FWCM_PKI_ROOT"]) if os.environ.get("FWCM_PKI_ROOT") else None,
            "broker_accounts": _path_env("FWCM_BROKER_ACCOUNTS"),
            "broker_pid_file": _path_env("FWCM_BROKER_PID_FILE"),
            "webhook_retry_s": _float_env("FWCM_WEBHOOK_RETRY_S", 10.0),
            "webhook_batch_s": _float_env("FWCM_WEBHOOK_BATCH_S", 10.0),
            "pkcs11_module": os.environ.get("FWCM_PKCS11_MODULE", ""),
            "pkcs11_token": os.environ.get("FWCM_PKCS11_TOKEN", ""),
            "pkcs11_pin": _secret_env("FWCM_PKCS11_PIN"),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
