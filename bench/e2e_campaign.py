#!/usr/bin/env python3
"""End-to-end campaign benchmark with real processes.

A broker (Mosquitto, or the embedded one), one ``fwcm server`` process, and one or more
``python -m device_sim fleet`` processes; the devices register through the API, connect, and the
campaign is timed from ``start`` until every device has ended.  Prints figures, never asserts.

    bench/e2e_campaign.py --devices 10000 --transport mqtt --image-size 65536 --fleets 2
    bench/e2e_campaign.py --devices 1000 --transport coap
    bench/e2e_campaign.py --devices 10000 --delta   # the fleet runs 1.0; 2.0 goes out as patches

``--delta``: the release is signed by a signer the server holds (its signing service, key files),
the devices start on release 1.0 (which the server holds) and the campaign asks for deltas; the
figures then include the bytes sent as patches and as full images.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from procstats import cpu_seconds, metric, proc_status_mb

from device_sim.fleet import device_names
from fwcm import manifest as mf
from fwcm import pki, protocol
from fwcm.cli.demo_report import small_change
from fwcm.transport import accounts
from fwcm.transport.broker import Broker, free_port, start_broker


async def held_release(
    api: httpx.AsyncClient, root_key: mf.PrivateKey, root_pem: bytes, info: mf.ManifestInfo
) -> int:
    """Sign the release with a signer the server holds (it then signs the release's deltas)."""
    root = pki.load_cert(root_pem)
    ca = (await api.post("/signing/ca")).raise_for_status().json()
    ca_cert = pki.make_tenant_ca(root_key, root, mf.load_public_key(ca["public_key_pem"].encode()), "bench")
    (await api.put("/signing/ca/cert", json={"cert_pem": pki.cert_pem(ca_cert).decode()})).raise_for_status()
    (await api.post("/signing/signers", json={"name": "held", "approvals": 0})).raise_for_status()
    body = {
        "signer": "held",
        "sequence": info.sequence,
        "vendor_id": str(info.vendor_id),
        "class_id": str(info.class_id),
        "image_digest": info.image_digest.hex(),
        "image_size": info.image_size,
        "uris": list(info.uris),
    }
    release = (await api.post("/releases", json=body)).raise_for_status().json()
    return int(release["manifest_id"])


def served(metrics: str, kind: str) -> float:
    """Payload bytes of one kind (delta or full) the server sent, over every transport."""
    lines = metrics.splitlines()
    return sum(
        float(x.rsplit(" ", 1)[1])
        for x in lines
        if x.startswith("fwcm_payload_bytes_served_total{") and f'kind="{kind}"' in x
    )


def rss_peak_mb(pid: int) -> float:
    """Peak resident set size of a process (VmHWM), in MB."""
    return proc_status_mb(pid, "VmHWM")


def open_files_for(per_process: int) -> None:
    """Raise this process's open-file limit (the brokers and the fleets inherit it) to what the
    busiest process needs: one socket per MQTT device in a fleet, one per connection at a broker.
    Root may raise the hard limit too; otherwise stop at once rather than fail device by device."""
    import resource

    need = per_process + 4096  # headroom for the rest
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    except (ValueError, OSError):
        if hard < need:
            raise SystemExit(
                f"{per_process} connections in one process need {need} open files; the hard limit is "
                f"{hard}: use more --fleets and --edges"
            ) from None
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


TENANT = "bench"
EDGE_DEVICES = 15_000
"""Devices per Mosquitto when the fleet is spread over edge brokers (each process may hold at most
20,000 open files on the machine these figures come from)."""


def start_edges(broker: Broker, devices: list[list[str]]) -> list[tuple[subprocess.Popen[bytes], int]]:
    """One Mosquitto bridged to ``broker`` for each list of device names: devices connect to an
    edge with their own accounts (the broker's account files, re-read on SIGHUP), their notices
    come in over the bridge (only theirs: a wildcard would copy every notice, retained, to every
    edge), reports and presence go out over it to the server's broker. One Mosquitto holds one
    open file per connection; edges spread a fleet larger than a process may hold over several."""
    assert broker.service is not None and broker.accounts_dir is not None
    edges = []
    for i, names in enumerate(devices):
        port = free_port()
        conf = broker.workdir / f"edge{i}.conf"
        conf.write_text(
            "per_listener_settings true\nmax_queued_messages 1000000\nmax_inflight_messages 10000\n"
            "persistence false\nlog_type error\nlog_type warning\nlog_dest stderr\n"
            f"pid_file {broker.workdir / f'edge{i}.pid'}\n"
            f"listener {port} 127.0.0.1\nallow_anonymous false\nuse_username_as_clientid true\n"
            f"password_file {broker.accounts_dir / accounts.DEVICES_PASSWD}\n"
            f"acl_file {broker.accounts_dir / accounts.DEVICES_ACL}\n"
            f"connection edge{i}\naddress 127.0.0.1:{broker.service_port or broker.port}\n"
            f"remote_username {broker.service.username}\nremote_password {broker.service.password}\n"
            f"remote_clientid fwcm-edge{i}\nnotifications false\ncleansession true\n"
            + "".join(f"topic {protocol.notice_topic(TENANT, name)} in 1\n" for name in names)
            + f"topic {protocol.TOPIC_PREFIX}/+/+/status out 1\n"
            f"topic {protocol.TOPIC_PREFIX}/+/+/presence out 1\n"
        )
        log = open(broker.workdir / f"edge{i}.log", "wb")
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        edges.append((proc, port))
    return edges


async def main(args: argparse.Namespace) -> dict[str, object]:
    edges = args.edges
    if edges < 0:  # as many as a process's open files need: none up to EDGE_DEVICES
        big = args.devices > EDGE_DEVICES and args.transport == "mqtt"
        edges = -(-args.devices // EDGE_DEVICES) if big else 0
    fleets = max(args.fleets, edges)  # a fleet process then holds at most one edge's devices
    open_files_for(-(-args.devices // edges) if edges else args.devices)
    work = Path(tempfile.mkdtemp(prefix="fwcm-bench-"))
    # device flash state on tmpfs when there is one: thousands of small atomic renames on a disk
    # measure the disk, not fwcm
    shm = Path("/dev/shm")
    flash_root = Path(tempfile.mkdtemp(prefix="fwcm-bench-flash-", dir=shm)) if shm.is_dir() else work
    per = [args.devices // fleets + (1 if i < args.devices % fleets else 0) for i in range(fleets)]
    on_edge: list[list[str]] = [[] for _ in range(edges)]
    for j, n in enumerate(per):  # fleet j runs on edge j % edges
        if edges:
            on_edge[j % edges] += device_names(f"f{j}", n)
    broker = start_broker()
    edge_brokers = start_edges(broker, on_edge) if edges else []
    http_port, coap_port = free_port(), free_port(socket.SOCK_DGRAM)
    env = dict(
        os.environ,
        FWCM_DATA_DIR=str(work / "server"),
        **broker.server_env(),  # the server keeps the broker's accounts; devices log in with theirs
        FWCM_HTTP_BIND=f"127.0.0.1:{http_port}",
        FWCM_COAP_BIND=f"127.0.0.1:{coap_port}",
    )
    if args.database_url:
        env["FWCM_DATABASE_URL"] = args.database_url
    root_key = mf.generate_private_key("es256")
    if args.delta:  # the operator root the held signer's chain leads to
        root = pki.make_root(root_key, "bench operator root")
        (work / "root.pem").write_bytes(pki.cert_pem(root))
        env["FWCM_PKI_ROOT"] = str(work / "root.pem")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        out = subprocess.run(
            [sys.executable, "-m", "fwcm.cli", "admin", "tenant-create", TENANT, "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = json.loads(out.stdout.strip().splitlines()[-1])["api_key"]
        server = subprocess.Popen(
            [sys.executable, "-m", "fwcm.cli", "server", "--replica", "bench"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(work / "server.log", "wb"),
        )
        procs.append(server)
        base = f"http://127.0.0.1:{http_port}"
        api = httpx.AsyncClient(
            base_url=base + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=300
        )
        for _ in range(200):
            try:
                if (await api.get("/tenant")).status_code == 200:
                    break
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
        signing = mf.generate_private_key("es256")
        (work / "release.pub").write_bytes(mf.public_key_pem(signing))
        await api.post(
            "/signers", json={"name": "rel", "public_key_pem": mf.public_key_pem(signing).decode()}
        )
        image = random.Random(1).randbytes(args.image_size)
        if args.delta:  # the fleet runs this image; the campaign's is a small change of it
            (work / "base.bin").write_bytes(image)
            (await api.post("/payloads", content=image)).raise_for_status()
            image = small_change(image)
        sha = hashlib.sha256(image).hexdigest()
        (await api.post("/payloads", content=image)).raise_for_status()
        vendor = mf.vendor_id_for_domain("bench.fwcm.example")
        klass = mf.class_id_for(vendor, "bench")
        info = mf.ManifestInfo(
            2,
            vendor,
            klass,
            bytes.fromhex(sha),
            len(image),
            (f"{base}/p/{sha}", f"coap://127.0.0.1:{coap_port}/p/{sha}"),
        )
        if args.delta:
            manifest_id = await held_release(api, root_key, (work / "root.pem").read_bytes(), info)
        else:
            r = await api.post(
                "/manifests",
                content=mf.build_envelope(info, signing),
                headers={"content-type": "application/cbor"},
            )
            r.raise_for_status()
            manifest_id = r.json()["id"]

        policy = {"delta": True} if args.delta else {}
        body = {"name": "bench", "manifest_id": manifest_id, "filter": "", "policy": policy}
        r = await api.post("/campaigns", json=body)
        r.raise_for_status()
        cid = r.json()["id"]
        t_register = time.monotonic()
        for j, n in enumerate(per):
            cmd = [
                sys.executable,
                "-m",
                "device_sim",
                "fleet",
                "--devices",
                str(n),
                "--transport",
                args.transport,
                "--faults",
                "none",
                "--url",
                base,
                "--api-key",
                key,
                "--mqtt",
                f"mqtt://127.0.0.1:{edge_brokers[j % edges][1]}" if edges else broker.url,
                "--coap",
                f"coap://127.0.0.1:{coap_port}",
                *(
                    ["--trust-root", str(work / "root.pem"), "--base-image", str(work / "base.bin")]
                    if args.delta
                    else ["--trust", str(work / "release.pub")]
                ),
                "--vendor-id",
                str(vendor),
                "--class-id",
                str(klass),
                "--state-dir",
                str(flash_root / f"fleet{j}"),
                "--prefix",
                f"f{j}",  # the names the edges bridge notices for
                "--campaign",
                str(cid),
                "--no-progress",
                "--json",
            ]
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=open(work / f"fleet{j}.out", "wb"),
                    stderr=open(work / f"fleet{j}.log", "wb"),
                )
            )
        # wait until every device is registered and has said hello; edges re-read the accounts
        # the server writes for its broker (it signals that one only)
        passwd = broker.accounts_dir / accounts.DEVICES_PASSWD if broker.accounts_dir else None
        read_at = 0.0
        while True:
            if edge_brokers and passwd is not None and passwd.stat().st_mtime != read_at:
                read_at = passwd.stat().st_mtime
                for edge, _port in edge_brokers:
                    edge.send_signal(signal.SIGHUP)
            metrics = (await httpx.AsyncClient().get(base + "/metrics")).text
            if metric(metrics, "fwcm_reports_ingested_total") >= args.devices:
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a process exited early; see {work}")
            await asyncio.sleep(0.5)
        t_online = time.monotonic() - t_register
        if args.verbose:
            print(f"{args.devices} devices registered and online in {t_online:.1f} s", flush=True)

        cpu0 = {p.pid: cpu_seconds(p.pid) for p in procs}
        brokers = [broker.process.pid, *(edge.pid for edge, _port in edge_brokers)]
        broker_cpu0 = sum(cpu_seconds(pid) for pid in brokers)
        t0 = time.monotonic()
        (await api.post(f"/campaigns/{cid}/start")).raise_for_status()
        start_s = time.monotonic() - t0
        stats: dict[str, object] = {}
        while True:
            stats = (await api.get(f"/campaigns/{cid}/stats")).json()
            counts: dict[str, int] = stats["counts"]  # type: ignore[assignment]
            busy = sum(counts[s] for s in ("pending", "notified", "downloading", "downloaded", "installing"))
            final = stats["state"] in ("completed", "stopped", "cancelled")
            if (busy == 0 and final) or time.monotonic() - t0 > args.timeout:
                break
            if args.verbose and int(time.monotonic() - t0) % 5 == 0:
                print(
                    f"{time.monotonic() - t0:6.1f} s {dict((k, v) for k, v in counts.items() if v)}",
                    flush=True,
                )
            await asyncio.sleep(0.5)  # twice as often as `fwcm campaign watch`: each read costs the server
        duration = time.monotonic() - t0
        cpu = {p.pid: cpu_seconds(p.pid) - cpu0[p.pid] for p in procs}
        broker_cpu = sum(cpu_seconds(pid) for pid in brokers) - broker_cpu0
        metrics = (await httpx.AsyncClient().get(base + "/metrics")).text
        result = {
            "devices": args.devices,
            "transport": args.transport,
            "image_size": args.image_size,
            "fleets": fleets,
            "edge_brokers": edges,
            "broker": broker.kind,
            "database": "postgresql" if args.database_url else "sqlite",
            "campaign_state": stats.get("state"),
            "counts": {k: v for k, v in counts.items() if v},
            "start_s": round(start_s, 3),
            "end_to_end_s": round(duration, 2),
            "devices_per_s": round(args.devices / duration, 1),
            "payload_mb_per_s": round(
                (served(metrics, "delta") + served(metrics, "full")) / duration / 1e6, 2
            ),
            "reports_ingested": metric(metrics, "fwcm_reports_ingested_total"),
            "notices_sent": metric(metrics, "fwcm_notices_sent_total"),
            "online_s": round(t_online, 1),
            "server_peak_rss_mb": round(rss_peak_mb(server.pid), 1),
            "broker_peak_rss_mb": round(max(rss_peak_mb(pid) for pid in brokers), 1),
            "bytes": stats.get("bytes"),
            "payload_bytes_served": {kind: served(metrics, kind) for kind in ("delta", "full")},
            "cpu_s": {  # during the campaign: where the machine's time went
                "server": round(cpu[server.pid], 3),
                "fleets": round(sum(v for k, v in cpu.items() if k != server.pid), 3),
                "broker": round(broker_cpu, 3),
            },
        }
        await api.aclose()
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for edge, _port in edge_brokers:
            edge.terminate()
            edge.wait(10)
        broker.stop()
        shutil.rmtree(flash_root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--transport", choices=["mqtt", "coap", "mixed"], default="mqtt")
    ap.add_argument("--image-size", type=int, default=64 * 1024)
    ap.add_argument("--fleets", type=int, default=1, help="device_sim processes (at least one per edge)")
    ap.add_argument(
        "--edges",
        type=int,
        default=-1,
        help=f"Mosquitto brokers bridged to the server's, devices spread over them; default: none up to "
        f"{EDGE_DEVICES:,} MQTT devices, then one per {EDGE_DEVICES:,}",
    )
    ap.add_argument("--database-url", default="")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--delta", action="store_true", help="devices on 1.0 get 2.0 as server-made patches")
    ap.add_argument("-v", "--verbose", action="store_true", help="print progress while the campaign runs")
    a = ap.parse_args()
    res = asyncio.run(main(a))
    for k, v in res.items():
        print(f"{k:>20}: {v}")
    if a.json:
        print(json.dumps(res))
