"""Start an MQTT broker for the demo and the tests.

Mosquitto is used when it is installed (with the settings in ``mosquitto.conf``); otherwise an
embedded Python broker (amqtt, MQTT 3.1.1 only, see ``amqtt_broker``) runs in a child process.
Either way the broker listens on 127.0.0.1 on free ports, is stopped by whoever started it, and
admits only the accounts in its accounts directory (``fwcm.transport.accounts``): at start the
server's service account, whose credentials come back in ``Broker.service``; the server adds the
devices' accounts as they are registered.  Mosquitto has two listeners: ``url`` for devices and
``service_url`` (with the service credentials) for the server replicas.

``start_nats_cluster`` starts a clustered broker instead: several ``nats-server`` processes
(MQTT 3.1.1 on JetStream) routed to each other on loopback, for the tests and docs of running
beyond one broker; it admits anyone (brokers managed elsewhere keep their own accounts).
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from fwcm.transport import accounts
from fwcm.transport.accounts import Credentials

log = logging.getLogger(__name__)

CONF = Path(__file__).with_name("mosquitto.conf")
MQTT311_ONLY = frozenset({"amqtt", "nats"})
"""Broker kinds that speak MQTT 3.1.1 only: the server gets ``?v=311`` (a plain subscription)."""
SERVICE_USERNAME = "fwcm"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS listener: the CA clients trust, the broker's certificate and key."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class Broker:
    """A broker child process; ``url`` carries ``?v=311`` when only MQTT 3.1.1 is spoken, and is
    ``mqtts://…?ca=`` when the listener speaks TLS.

    With accounts (``service`` set) the broker admits the service account and the device accounts
    in ``accounts_dir`` only, and re-reads them on SIGHUP to the pid in ``pid_file``.
    """

    kind: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    extra: dict[str, str] = field(default_factory=dict)
    tls: TlsFiles | None = None
    service_port: int | None = None
    """The server replicas' listener, when the broker has one of its own for them."""
    service: Credentials | None = None
    accounts_dir: Path | None = None
    pid_file: Path | None = None
    command: list[str] = field(default_factory=list)
    """How the process was started, so that :meth:`restart` can start it again."""

    def _url(self, port: int, credentials: Credentials | None = None) -> str:
        query = ["v=311"] if self.kind in MQTT311_ONLY else []
        if self.tls is not None:
            query.append(f"ca={self.tls.ca}")
        scheme = "mqtts" if self.tls is not None else "mqtt"
        userinfo = ""
        if credentials is not None:
            userinfo = f"{quote(credentials.username, safe='')}:{quote(credentials.password, safe='')}@"
        return f"{scheme}://{userinfo}127.0.0.1:{port}" + ("?" + "&".join(query) if query else "")

    @property
    def url(self) -> str:
        """Where devices connect (each with its own account)."""
        return self._url(self.port)

    @property
    def service_url(self) -> str:
        """Where the server replicas connect, with the service account's credentials."""
        return self._url(self.service_port or self.port, self.service)

    def server_settings(self) -> dict[str, object]:
        """``Settings`` fields that link a server to this broker and let it keep the accounts."""
        return {
            "mqtt_url": self.service_url,
            "broker_accounts": self.accounts_dir,
            "broker_pid_file": self.pid_file,
        }

    def server_env(self) -> dict[str, str]:
        """The same as ``FWCM_*`` variables, for a server in another process."""
        env = {"FWCM_MQTT_URL": self.service_url}
        if self.accounts_dir is not None:
            env["FWCM_BROKER_ACCOUNTS"] = str(self.accounts_dir)
        if self.pid_file is not None:
            env["FWCM_BROKER_PID_FILE"] = str(self.pid_file)
        return env

    def admit(self, devices: list[Credentials], timeout: float = 10.0) -> None:
        """Make ``devices`` the broker's device accounts and return once it has re-read them: for
        tests that play the server themselves.  A throwaway probe account, written with them, tells
        when the reload happened."""
        assert self.accounts_dir is not None and self.service is not None and self.pid_file is not None
        probe = Credentials(f"probe/p{secrets.token_hex(6)}", secrets.token_urlsafe(16))
        accounts.write_accounts(self.accounts_dir, self.service, [*devices, probe])
        accounts.signal_reload(self.pid_file)
        deadline = time.monotonic() + timeout
        while not self.accepts(probe):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not re-read its accounts within {timeout} s")
            time.sleep(0.05)

    def accepts(self, account: Credentials) -> bool:
        """Whether the devices' listener takes an MQTT 3.1.1 session with these credentials (on the
        embedded broker, a connected device with this account is taken over)."""
        return _accepts(self.port, account, self.tls)

    def halt(self) -> None:
        """Stop the process, keeping its configuration and accounts for :meth:`restart`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def restart(self) -> None:
        """Start the same broker again (same ports, configuration and accounts) after :meth:`halt`."""
        self.halt()
        log_file = self.workdir / "restart.log"
        self.process = _spawn(self.command, log_file)
        for port in (self.port, self.service_port):
            if port is not None:
                _wait_listening(port, self.process, log_file=log_file)

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _accepts(port: int, account: Credentials, tls: TlsFiles | None = None) -> bool:
    """Whether the broker takes an MQTT 3.1.1 session with these credentials."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    result: list[object] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=account.username, protocol=mqtt.MQTTv311)
    client.username_pw_set(account.username, account.password)
    if tls is not None:
        client.tls_set(ca_certs=str(tls.ca))
    client.on_connect = lambda _c, _u, _f, rc, _p: result.append(rc)
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except OSError:
        return False
    client.loop_start()
    try:
        deadline = time.monotonic() + 3
        while not result and time.monotonic() < deadline:
            time.sleep(0.01)
        return bool(result) and not getattr(result[0], "is_failure", True)
    finally:
        client.disconnect()
        client.loop_stop()


def _spawn(args: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    """A broker process whose output goes to ``log_file`` (a pipe nobody reads would fill up and
    stall it: refused clients are logged)."""
    with open(log_file, "wb") as err:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)


def _log_tail(log_file: Path | None) -> str:
    if log_file is None or not log_file.exists():
        return ""
    return ": " + log_file.read_text(errors="replace")[-500:].strip()


def _wait_listening(
    port: int, process: subprocess.Popen[bytes], timeout: float = 10.0, log_file: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"broker exited with code {process.returncode}{_log_tail(log_file)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"broker did not listen on port {port} within {timeout} s")


def _accounts_workdir(prefix: str, broker_user: str | None) -> tuple[Path, Path, Credentials]:
    """A work directory holding the accounts (service account only, so far) and the pid file.

    Mosquitto started as root drops to its own user before it reads anything: the directory then
    belongs to that user (it writes its pid file there) and is setgid, so the account files this
    process writes inside are readable through the broker's group (mode 0640), never by everyone.
    """
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if broker_user is not None and os.geteuid() == 0:
        try:
            user = pwd.getpwnam(broker_user)
        except KeyError:
            pass
        else:
            os.chown(workdir, user.pw_uid, grp.getgrgid(user.pw_gid).gr_gid)
            workdir.chmod(0o2770)
    service = Credentials(SERVICE_USERNAME, secrets.token_urlsafe(24))
    accounts.write_accounts(workdir, service, [])
    return workdir, workdir / "broker.pid", service


def _listener(port: int, passwd: str, acl: str, workdir: Path, tls: TlsFiles | None, *extra: str) -> str:
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous false",
        f"password_file {workdir / passwd}",
        f"acl_file {workdir / acl}",
        *extra,
    ]
    if tls is not None:
        lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
    return "\n".join(lines) + "\n"


def start_mosquitto(
    port: int | None = None,
    binary: str | None = None,
    *,
    tls: TlsFiles | None = None,
    service_port: int | None = None,
) -> Broker:
    """Mosquitto with ``mosquitto.conf`` on loopback: a devices' listener (``use_username_as_clientid``,
    device accounts only) and a service listener (the service account only); both TLS with ``tls``."""
    binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = port or free_port()
    service_port = service_port or free_port()
    workdir, pid_file, service = _accounts_workdir("fwcm-mosquitto-", "mosquitto")
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        CONF.read_text()
        + f"pid_file {pid_file}\n\n# devices: each its own account, its username as client id\n"
        + _listener(
            port, accounts.DEVICES_PASSWD, accounts.DEVICES_ACL, workdir, tls, "use_username_as_clientid true"
        )
        + "\n# the server replicas\n"
        + _listener(service_port, accounts.SERVICE_PASSWD, accounts.SERVICE_ACL, workdir, tls)
    )
    log_file = workdir / "mosquitto.log"
    command = [binary, "-c", str(conf)]
    proc = _spawn(command, log_file)
    _wait_listening(port, proc, log_file=log_file)
    _wait_listening(service_port, proc, log_file=log_file)
    log.info(
        "mosquitto listening on 127.0.0.1:%d (service %d)%s", port, service_port, " (TLS)" if tls else ""
    )
    return Broker(
        "mosquitto",
        port,
        proc,
        workdir,
        tls=tls,
        service_port=service_port,
        service=service,
        accounts_dir=workdir,
        pid_file=pid_file,
        command=command,
    )


def start_amqtt(port: int | None = None) -> Broker:
    """The embedded broker (``amqtt_broker``) with the same accounts, on one listener."""
    port = port or free_port()
    workdir, pid_file, service = _accounts_workdir("fwcm-amqtt-", None)
    log_file = workdir / "amqtt.log"
    command = [sys.executable, "-m", "fwcm.transport.amqtt_broker", str(port), str(workdir), str(pid_file)]
    proc = _spawn(command, log_file)
    _wait_listening(port, proc, timeout=20, log_file=log_file)
    log.info("embedded amqtt broker listening on 127.0.0.1:%d", port)
    return Broker(
        "amqtt",
        port,
        proc,
        workdir,
        service=service,
        accounts_dir=workdir,
        pid_file=pid_file,
        command=command,
    )


def mosquitto_available() -> bool:
    return bool(shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto"))


def start_broker(port: int | None = None) -> Broker:
    """Mosquitto if installed (unless FWCM_BROKER=amqtt), else the embedded broker."""
    if os.environ.get("FWCM_BROKER", "") != "amqtt" and mosquitto_available():
        return start_mosquitto(port)
    return start_amqtt(port)


# -- a NATS cluster ---------------------------------------------------------------------------------

NATS_CLUSTER_CONF = """\
cluster {{
  name: fwcm
  listen: 127.0.0.1:{cluster_port}
  routes: [{routes}]
}}"""
NATS_NODE_CONF = """\
server_name: {name}
listen: 127.0.0.1:{client_port}
http: 127.0.0.1:{http_port}
jetstream {{
  store_dir: "{store}"
  max_memory_store: 256MB
  max_file_store: 1GB
}}
{cluster}
mqtt {{
  listen: 127.0.0.1:{mqtt_port}
  # QoS 1 messages a session may have unacknowledged; the server's status subscription needs many
  max_ack_pending: 10000
  ack_wait: "30s"
}}
"""


@dataclass
class BrokerCluster:
    """Broker nodes that form one cluster; a client may connect to any node."""

    nodes: list[Broker]
    workdir: Path

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BrokerCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def nats_binary() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    return "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None


def _jetstream_ready(http_port: int, size: int) -> bool:
    """True once the node sees a JetStream meta leader over a cluster of ``size``."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/jsz", timeout=1) as r:
            meta = json.load(r).get("meta_cluster") or {}
    except (OSError, ValueError):
        return False
    if size == 1:
        return True
    return bool(meta.get("leader")) and int(meta.get("cluster_size", 0)) >= size


def _mqtt_session_works(port: int) -> bool:
    """A QoS 1 persistent-session connect round trip (what JetStream must be ready for)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    done: dict[str, object] = {}

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        done["rc"] = rc

    def on_subscribe(_c: mqtt.Client, _u: object, _m: object, _rc: object, _p: object) -> None:
        done["sub"] = True

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fwcm-probe-{port}", protocol=mqtt.MQTTv311)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except OSError:
        return False
    client.loop_start()
    try:
        deadline = time.monotonic() + 5
        while "rc" not in done and time.monotonic() < deadline:
            time.sleep(0.05)
        if getattr(done.get("rc"), "is_failure", True):
            return False
        client.subscribe("fwcm/probe", qos=1)
        while "sub" not in done and time.monotonic() < deadline:
            time.sleep(0.05)
        return "sub" in done
    finally:
        client.disconnect()
        client.loop_stop()


def start_nats_cluster(size: int = 3, binary: str | None = None, timeout: float = 60.0) -> BrokerCluster:
    """``size`` nats-server nodes with JetStream and MQTT, routed to each other on 127.0.0.1.

    Returns once every node accepts an MQTT session; ``nodes[i].url`` is node i's MQTT URL
    (``?v=311``: NATS speaks MQTT 3.1.1).
    """
    binary = binary or nats_binary()
    if binary is None:
        raise FileNotFoundError("nats-server is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="fwcm-nats-"))
    ports = [
        {
            "client_port": free_port(),
            "http_port": free_port(),
            "cluster_port": free_port(),
            "mqtt_port": free_port(),
        }
        for _ in range(size)
    ]
    routes = ", ".join(f"nats-route://127.0.0.1:{p['cluster_port']}" for p in ports)
    nodes: list[Broker] = []
    try:
        for i, p in enumerate(ports):
            node_dir = workdir / f"n{i + 1}"
            node_dir.mkdir()
            conf = node_dir / "nats.conf"
            cluster = NATS_CLUSTER_CONF.format(routes=routes, **p) if size > 1 else ""
            conf.write_text(
                NATS_NODE_CONF.format(name=f"n{i + 1}", store=node_dir / "js", cluster=cluster, **p)
            )
            proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=open(node_dir / "nats.log", "wb"),  # noqa: SIM115 - lives as long as the node
            )
            nodes.append(Broker("nats", p["mqtt_port"], proc, node_dir, {"http_port": str(p["http_port"])}))
        deadline = time.monotonic() + timeout
        for node, p in zip(nodes, ports, strict=True):
            _wait_listening(node.port, node.process, timeout=max(1.0, deadline - time.monotonic()))
            while not (_jetstream_ready(p["http_port"], size) and _mqtt_session_works(node.port)):
                if node.process.poll() is not None:
                    raise RuntimeError(f"nats-server {node.workdir.name} exited; see {node.workdir}/nats.log")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"NATS cluster not ready within {timeout} s")
                time.sleep(0.2)
    except BaseException:
        for node in nodes:
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    log.info("NATS cluster of %d nodes, MQTT on ports %s", size, [n.port for n in nodes])
    return BrokerCluster(nodes, workdir)
