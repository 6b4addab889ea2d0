"""The broker's own limit: the same number of QoS 1 messages of the same size moved through the same
broker by Mosquitto's C clients (``mosquitto_pub``, ``mosquitto_sub``; Debian package
mosquitto-clients).  They are the leanest clients the broker has, so their figure is what the
broker can move on this machine: the ceiling over both the raw paho figure and fwcm's.

What is timed:

- One ``mosquitto_sub`` (QoS 1, the service account and MQTT version of the paho subscribers)
  subscribes to the topics of the load and to a probe topic holding a retained message, and writes,
  for each message, the wall-clock time at which it received it (``-F %U``) to a file; ``-C`` makes
  it exit after the expected count.
- P ``mosquitto_pub -l`` processes (QoS 1, at most 1,000 messages in flight, as the paho publishers
  allow) publish each line of their stdin as one message on a topic of their own: P = 1 with
  retained messages for fanout, P = the ingest's publisher connections without retain for ingest.
- Each publisher first sends one warm-up line.  Once the subscriber has written the probe and every
  warm-up message, all clients are connected and subscribed.  The clock starts when the N data lines
  (printable bytes, as many as the fwcm message has, N split evenly over the publishers) start to
  be written to the publishers' stdin (one writer thread each), and stops at the time
  ``mosquitto_sub`` wrote for the N-th data message.

Figure: N / that time.  ``mosquitto_pub`` has one topic per process, so the C fanout publishes its
N retained messages on one topic where fwcm and the raw paho client use N device topics: the broker
keeps one retained message instead of N.  The figure is how fast the broker moves the messages.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import string
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from harness import TENANT

from fwcm import protocol
from fwcm.transport.broker import MQTT311_ONLY, Broker

PROBE_TOPIC = "fwcm/bench/probe"
SUB = ["mosquitto_sub", "-q", "1"]
MAX_INFLIGHT = 1000  # the paho clients' max_inflight_messages (fwcm.transport.mqtt.make_client)


def available() -> bool:
    """Whether Mosquitto's C clients are installed."""
    return bool(shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub"))


def c_fanout(broker: Broker, n: int, size: int, work: Path, timeout: float = 600) -> dict[str, Any]:
    """N retained QoS 1 messages of ``size`` bytes from one publisher to one subscriber."""
    return move(broker, n, size, work, (lambda d: protocol.notice_topic(TENANT, d)), 1, True, timeout)


def c_ingest(
    broker: Broker, n: int, size: int, work: Path, publishers: int, timeout: float = 600
) -> dict[str, Any]:
    """N QoS 1 messages of ``size`` bytes from ``publishers`` publishers to one subscriber."""
    return move(
        broker, n, size, work, (lambda d: protocol.status_topic(TENANT, d)), publishers, False, timeout
    )


def move(
    broker: Broker,
    n: int,
    size: int,
    work: Path,
    topic_of: Callable[[str], str],
    publishers: int,
    retain: bool,
    timeout: float,
) -> dict[str, Any]:
    """Time N messages from ``publishers`` ``mosquitto_pub -l`` to one ``mosquitto_sub`` (above)."""
    login = login_args(broker)
    topics = [topic_of(f"c-{i}") for i in range(publishers)]
    out, expected = work / "c-sub.out", n + publishers + 1  # the probe, the warm-ups, the data
    publish_once(login, PROBE_TOPIC, b"probe")
    with open(out, "wb") as sub_out, open(work / "c-clients.log", "ab") as log:
        sub = subprocess.Popen(
            [*SUB, *login, "-t", topic_of("+"), "-t", PROBE_TOPIC, "-C", str(expected), "-F", "%U"],
            stdout=sub_out,
            stderr=log,
        )
        pubs: list[subprocess.Popen[bytes]] = []
        writers: list[threading.Thread] = []
        try:
            wait_lines(out, 1, sub, work)
            pubs += [publisher(login, topic, retain, log) for topic in topics]
            wait_lines(out, 1 + publishers, sub, work)
            t0 = time.time()
            writers = feed(pubs, n, size)
            with contextlib.suppress(subprocess.TimeoutExpired):
                sub.wait(timeout)
        finally:
            grace = 10 if sub.poll() == 0 else 0  # all counted: the publishers end on their own
            for p in [sub, *pubs]:
                stop(p, grace)
    for w in writers:
        w.join(10)
    publish_once(login, PROBE_TOPIC, b"")
    for topic in topics if retain else []:
        publish_once(login, topic, b"")
    elapsed = last_time(out, expected) - t0
    return {"messages": n, "bytes": size, "publishers": publishers, "seconds": elapsed, "per_s": n / elapsed}


def login_args(broker: Broker) -> list[str]:
    """Where and as whom the C clients connect: the service listener and account, as paho does."""
    version = "mqttv311" if broker.kind in MQTT311_ONLY else "mqttv5"
    args = ["-h", "127.0.0.1", "-p", str(broker.service_port or broker.port), "-V", version]
    if broker.service is not None:
        args += ["-u", broker.service.username, "-P", broker.service.password]
    return args


def publish_once(login: list[str], topic: str, payload: bytes) -> None:
    """One retained message (an empty one clears the topic)."""
    body = ["-m", payload.decode()] if payload else ["-n"]
    subprocess.run(["mosquitto_pub", *login, "-q", "1", "-r", "-t", topic, *body], check=True, timeout=30)


def publisher(login: list[str], topic: str, retain: bool, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """A ``mosquitto_pub -l`` that has sent its warm-up line."""
    cmd = ["mosquitto_pub", *login, "-q", "1", "-M", str(MAX_INFLIGHT), "-t", topic, "-l"]
    p = subprocess.Popen(cmd + (["-r"] if retain else []), stdin=subprocess.PIPE, stderr=log)
    assert p.stdin is not None
    p.stdin.write(b"warm-up\n")
    p.stdin.flush()
    return p


def feed(pubs: list[subprocess.Popen[bytes]], n: int, size: int) -> list[threading.Thread]:
    """Start writing the N data lines to the publishers' stdin in parallel, then close it (each
    exits once its last message is acknowledged); the writer threads."""
    line = "".join(random.Random(4).choices(string.ascii_letters, k=size)).encode() + b"\n"

    def write(p: subprocess.Popen[bytes], count: int) -> None:
        assert p.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            p.stdin.write(line * count)
            p.stdin.close()

    counts = [n // len(pubs) + (1 if i < n % len(pubs) else 0) for i in range(len(pubs))]
    threads = [threading.Thread(target=write, args=pc, daemon=True) for pc in zip(pubs, counts, strict=True)]
    for t in threads:
        t.start()
    return threads


def wait_lines(out: Path, count: int, sub: subprocess.Popen[bytes], work: Path, timeout: float = 30) -> None:
    """Until the subscriber has written ``count`` messages (the probe, the warm-ups)."""
    deadline = time.monotonic() + timeout
    while out.read_bytes().count(b"\n") < count:
        if sub.poll() is not None or time.monotonic() > deadline:
            log = (work / "c-clients.log").read_text(errors="replace")[-500:]
            raise RuntimeError(f"mosquitto_sub/mosquitto_pub did not get ready: {log}")
        time.sleep(0.01)


def last_time(out: Path, expected: int) -> float:
    """The receive time of the last message, when all ``expected`` arrived (else NaN)."""
    lines = out.read_text().split()
    return float(lines[-1]) if len(lines) >= expected else float("nan")


def stop(p: subprocess.Popen[bytes], grace: float = 10) -> None:
    """Let a client finish (a publisher waits for its last acknowledgements), then end it."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(grace)
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
