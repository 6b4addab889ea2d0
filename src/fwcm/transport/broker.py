"""Start an MQTT broker for the demo and the tests.

Mosquitto is used when it is installed (with the settings in ``mosquitto.conf``); otherwise an
embedded Python broker (amqtt, MQTT 3.1.1 only) runs in a child process.  Either way the broker
listens on 127.0.0.1 on a free port and is stopped by whoever started it.

``start_nats_cluster`` starts a clustered broker instead: several ``nats-server`` processes
(MQTT 3.1.1 on JetStream) routed to each other on loopback, for the tests and docs of running
beyond one broker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CONF = Path(__file__).with_name("mosquitto.conf")
MQTT311_ONLY = frozenset({"amqtt", "nats"})
"""Broker kinds that speak MQTT 3.1.1 only: the server gets ``?v=311`` (a plain subscription)."""


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
    ``mqtts://…?ca=`` when the listener speaks TLS."""

    kind: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    extra: dict[str, str] = field(default_factory=dict)
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        query = ["v=311"] if self.kind in MQTT311_ONLY else []
        if self.tls is not None:
            query.append(f"ca={self.tls.ca}")
        scheme = "mqtts" if self.tls is not None else "mqtt"
        return f"{scheme}://127.0.0.1:{self.port}" + ("?" + "&".join(query) if query else "")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"broker exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"broker did not listen on port {port} within {timeout} s")


def start_mosquitto(
    port: int | None = None, binary: str | None = None, *, tls: TlsFiles | None = None
) -> Broker:
    """Mosquitto with ``mosquitto.conf`` on a loopback port; a TLS-only listener with ``tls``."""
    binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="fwcm-mosquitto-"))
    conf = workdir / "mosquitto.conf"
    listener = f"\nlistener {port} 127.0.0.1\n"
    if tls is not None:
        listener += f"cafile {tls.ca}\ncertfile {tls.cert}\nkeyfile {tls.key}\n"
    conf.write_text(CONF.read_text() + listener)
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_listening(port, proc)
    log.info("mosquitto listening on 127.0.0.1:%d%s", port, " (TLS)" if tls else "")
    return Broker("mosquitto", port, proc, workdir, tls=tls)


def start_amqtt(port: int | None = None) -> Broker:
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="fwcm-amqtt-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fwcm.transport.broker", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_listening(port, proc, timeout=20)
    log.info("embedded amqtt broker listening on 127.0.0.1:%d", port)
    return Broker("amqtt", port, proc, workdir)


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


def _run_amqtt(port: int) -> None:  # pragma: no cover - runs in the child process
    import asyncio

    from amqtt.broker import Broker as AmqttBroker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        broker = AmqttBroker(config)
        await broker.start()
        await asyncio.Event().wait()

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())


if __name__ == "__main__":  # pragma: no cover
    _run_amqtt(int(sys.argv[1]))
