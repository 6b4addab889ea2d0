"""Start an MQTT broker for the demo and the tests.

Mosquitto is used when it is installed (with the settings in ``mosquitto.conf``); otherwise an
embedded Python broker (amqtt, MQTT 3.1.1 only) runs in a child process.  Either way the broker
listens on 127.0.0.1 on a free port and is stopped by whoever started it.
"""

from __future__ import annotations

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


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A broker child process; ``url`` carries ``?v=311`` when only MQTT 3.1.1 is spoken."""

    kind: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        suffix = "?v=311" if self.kind == "amqtt" else ""
        return f"mqtt://127.0.0.1:{self.port}{suffix}"

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


def start_mosquitto(port: int | None = None, binary: str | None = None) -> Broker:
    binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="fwcm-mosquitto-"))
    conf = workdir / "mosquitto.conf"
    conf.write_text(CONF.read_text() + f"\nlistener {port} 127.0.0.1\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_listening(port, proc)
    log.info("mosquitto listening on 127.0.0.1:%d", port)
    return Broker("mosquitto", port, proc, workdir)


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
