"""fanout and ingest: the fwcm server against the raw limits of the same broker and MQTT client.

Definitions (the project figure and the raw figure are measured the same way):

``fanout``  A campaign over N MQTT devices is started; a paho subscriber on
    ``fwcm/v1/{tenant}/+/notice`` counts the notices the broker delivers.  Figure: N / (time from
    the start request until the N-th delivery).  Raw: a paho client in its own process publishes N
    retained QoS 1 messages of the notice's size to the same N topics; N / (time from the go signal
    until the N-th delivery to the same kind of subscriber).
``ingest``  N signed status reports (one per device, valid for the running campaign) are published
    by paho clients in their own process.  Figure: N / (time from the go signal until the commit of
    the batch that made the last of them durable: the server's
    ``fwcm_ingest_last_commit_timestamp_seconds``, read once all N are in the database).  Raw: the same N
    messages from the same publishers, received by one paho QoS 1 subscriber.  Raw clients are
    stock ``paho.mqtt.client.Client`` (the server's own client reads through a buffer).
``broker``  The same N messages moved by Mosquitto's own C clients: the broker's limit on this
    machine (``broker_limit.py``).

Every MQTT client here (the counting subscriber, the publishers) logs in with the broker's service
account, as the server does: the broker runs with accounts (``start_broker``), the same for the
project and the raw figures, and a load generator that plays N devices on one connection can only
be the service account.  The helper process (the raw publisher) is this file run as a script:
``python bench/mqtt_limits.py publish ARGS-JSON``.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import broker_limit
import paho.mqtt.client as mqtt
from harness import (
    TENANT,
    Helper,
    ServerProc,
    device_csv,
    device_names,
    read_items,
    run_helper,
    workdir,
    write_items,
)
from procstats import cpu_seconds, metric

from fwcm import protocol
from fwcm.protocol import LwState, Notice, NoticeKind, Report, Result
from fwcm.transport.broker import start_broker
from fwcm.transport.mqtt import MqttSettings, make_client

MODULE = __file__


# -- MQTT: counting subscriber and publisher process --------------------------------------------


class Counter:
    """A paho subscriber (the server's client settings, clean session) counting deliveries."""

    def __init__(self, url: str, topic: str, target: int) -> None:
        self.target = target
        self.count = 0
        self.bytes = 0
        self.last = 0.0
        self.done = threading.Event()
        settings = MqttSettings.from_url(url)
        self.client = make_client(settings, f"bench-count-{secrets.token_hex(4)}", client_class=mqtt.Client)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(settings.host, settings.port, keepalive=60, clean_start=True)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        if not subscribed.wait(15):
            raise RuntimeError("counting subscriber: no SUBACK")

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        self.count += 1
        self.bytes += len(msg.payload)
        if self.count >= self.target:
            self.last = time.perf_counter()
            self.done.set()

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def helper_publish(args: dict[str, Any]) -> None:
    """Publish (topic, payload) items over ``clients`` paho connections, QoS 1; wait for PUBACKs."""
    items = read_items(args["items"])
    settings = MqttSettings.from_url(args["url"])
    clients = []
    for i in range(args["clients"]):
        c = make_client(settings, f"bench-pub-{i}-{secrets.token_hex(3)}", client_class=mqtt.Client)
        c.connect(settings.host, settings.port, keepalive=60, clean_start=True)
        c.loop_start()
        clients.append(c)
    for c in clients:
        for _ in range(100):
            if c.is_connected():
                break
            time.sleep(0.05)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    infos = [
        clients[i % len(clients)].publish(topic, payload, qos=1, retain=args["retain"])
        for i, (topic, payload) in enumerate(items)
    ]
    t_sent = time.perf_counter()
    for info in infos:
        info.wait_for_publish(120)
    t_acked = time.perf_counter()
    for c in clients:
        c.disconnect()
        c.loop_stop()
    print(json.dumps({"publish_s": t_sent - t0, "acked_s": t_acked - t0}), flush=True)


# -- fanout -------------------------------------------------------------------------------------


def notice_size(envelope: bytes, name: str) -> int:
    notice = Notice(NoticeKind.UPDATE, name, 1, 1, int(time.time()), envelope=envelope)
    return len(protocol.encode_notice(secrets.token_bytes(32), notice))


def raw_run(url: str, subscription: str, items: Path, n: int, clients: int, retain: bool) -> dict[str, Any]:
    """paho publishers (in a helper process) -> one paho subscriber counting ``n`` messages:
    seconds from the go signal to the last message received."""
    counter = Counter(url, subscription, n)
    pub = Helper(MODULE, "publish", {"url": url, "items": str(items), "clients": clients, "retain": retain})
    try:
        t0 = pub.go()
        ok = counter.wait(600)
        res = pub.result()
    finally:
        pub.kill()
        counter.close()
    elapsed = counter.last - t0 if ok else float("nan")
    return {"messages": n, "seconds": elapsed, "per_s": n / elapsed, **res}


def raw_fanout(url: str, names: list[str], size: int, work: Path) -> dict[str, Any]:
    payload = random.Random(2).randbytes(size)
    write_items(work / "fanout.pkl", [(protocol.notice_topic(TENANT, d), payload) for d in names])
    topic = protocol.notice_topic(TENANT, "+")
    return {"bytes": size, **raw_run(url, topic, work / "fanout.pkl", len(names), 1, True)}


def fwcm_fanout(server: ServerProc, url: str, names: list[str], manifest_id: int) -> dict[str, Any]:
    n = len(names)
    cid = server.campaign(manifest_id)
    counter = Counter(url, protocol.notice_topic(TENANT, "+"), n)
    try:
        with server.profiled("fanout"):
            t0 = time.perf_counter()
            start_s = server.start_campaign(cid)
            ok = counter.wait(600)
    finally:
        counter.close()
    elapsed = counter.last - t0 if ok else float("nan")
    return {
        "campaign": cid,
        "messages": counter.count,
        "bytes": counter.bytes // max(counter.count, 1),
        "start_s": start_s,
        "seconds": elapsed,
        "per_s": n / elapsed,
    }


# -- ingest -------------------------------------------------------------------------------------


def report_items(names: list[str], keys: dict[str, bytes], campaign: int) -> list[tuple[str, bytes]]:
    """One Downloading report per device for attempt 1 of ``campaign`` (the first after a notice)."""
    return [
        (
            protocol.status_topic(TENANT, d),
            protocol.encode_report(
                keys[d], Report(d, campaign, 1, 0, LwState.DOWNLOADING, Result.INITIAL, 0)
            ),
        )
        for d in names
    ]


def raw_ingest(url: str, items: list[tuple[str, bytes]], work: Path, clients: int) -> dict[str, Any]:
    write_items(work / "ingest-raw.pkl", items)
    topic = protocol.status_topic(TENANT, "+")
    return raw_run(url, topic, work / "ingest-raw.pkl", len(items), clients, False)


def fwcm_ingest(
    server: ServerProc, url: str, items: list[tuple[str, bytes]], work: Path, clients: int
) -> dict[str, Any]:
    """Time until the server has committed every report: a reader of the SQLite file (WAL: it
    never blocks the server) sees every deployment ``downloading``, then the server's
    ``fwcm_ingest_last_commit_timestamp_seconds`` says when the last batch committed (exact, and
    the reader can poll slowly: it takes no CPU from the server being measured)."""
    n = len(items)
    write_items(work / "ingest.pkl", items)
    db = sqlite3.connect(f"file:{work / 'server' / 'fwcm.db'}?mode=ro", uri=True)
    query = "SELECT count(*) FROM deployments WHERE campaign_id = 1 AND state = 'downloading'"
    pub = Helper(
        MODULE,
        "publish",
        {"url": url, "items": str(work / "ingest.pkl"), "clients": clients, "retain": False},
    )
    done = float("nan")
    assert server.process is not None
    cpu0 = cpu_seconds(server.process.pid)
    try:
        with server.profiled("ingest"):
            pub.go()
            deadline = time.perf_counter() + 600
            while time.perf_counter() < deadline:
                if db.execute(query).fetchone()[0] >= n:
                    done = metric(server.metrics(), "fwcm_ingest_last_commit_timestamp_seconds")
                    break
                time.sleep(0.05)
        res = pub.result()
        res["server_cpu_s"] = cpu_seconds(server.process.pid) - cpu0
    finally:
        pub.kill()
        db.close()
    elapsed = done - pub.go_wall
    text = server.metrics()
    res["batches"] = metric(text, "fwcm_ingest_batch_size_count")
    res["latency_mean_s"] = metric(text, "fwcm_ingest_latency_seconds_sum") / max(
        metric(text, "fwcm_ingest_latency_seconds_count"), 1
    )
    return {"messages": n, "seconds": elapsed, "per_s": n / elapsed, **res}


def clear_retained(url: str, names: list[str], work: Path) -> None:
    write_items(work / "clear.pkl", [(protocol.notice_topic(TENANT, d), b"") for d in names])
    pub = Helper(
        MODULE, "publish", {"url": url, "items": str(work / "clear.pkl"), "clients": 1, "retain": True}
    )
    try:
        pub.go()
        pub.result()
    finally:
        pub.kill()


def mqtt_benchmarks(n: int, reps: int = 3, clients: int = 4) -> list[dict[str, dict[str, Any]]]:
    """fanout and ingest, ``reps`` times, each on a fresh broker, server and database: every run."""
    return [mqtt_once(n, clients) for _ in range(reps)]


def mqtt_once(n: int, clients: int) -> dict[str, dict[str, Any]]:
    """fanout and ingest, project, raw and C clients, on one Mosquitto with one fwcm server (SQLite).

    The broker's own limit and the raw figures are taken before the server runs (it would
    otherwise consume the raw reports).  ``c`` is None when Mosquitto's clients are not installed.
    """
    names = device_names(n)
    keys = {d: secrets.token_bytes(32) for d in names}
    with workdir() as work, start_broker() as broker:
        url = broker.service_url
        server = ServerProc(work, broker)
        image = random.Random(1).randbytes(64 * 1024)
        size = notice_size(server.envelope(image), names[0])
        items = report_items(names, keys, 1)  # the first campaign of the fresh database
        c_f = c_i = None
        if broker_limit.available():
            c_f = broker_limit.c_fanout(broker, n, size, work)
            c_i = broker_limit.c_ingest(broker, n, len(items[0][1]), work, clients)
        raw_f = raw_fanout(url, names, size, work)
        clear_retained(url, names, work)
        raw_i = raw_ingest(url, items, work, clients)
        try:
            server.start()
            server.import_devices(device_csv(names, keys))
            manifest_id = server.manifest(image)
            fw_f = fwcm_fanout(server, url, names, manifest_id)
            if fw_f["campaign"] != 1:
                raise RuntimeError("expected campaign 1 in a fresh database")
            fw_i = fwcm_ingest(server, url, items, work, clients)
            rss = server.peak_rss_mb()
        finally:
            server.stop()
    return {
        "fanout": {"fwcm": fw_f, "raw": raw_f, "c": c_f},
        "ingest": {
            "fwcm": fw_i,
            "raw": raw_i,
            "c": c_i,
            "report_bytes": len(items[0][1]),
            "server_peak_rss_mb": rss,
        },
    }


if __name__ == "__main__":
    run_helper({"publish": helper_publish})
