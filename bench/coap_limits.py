"""coap: the fwcm server's CoAP payload serving against a minimal aiocoap server.

D concurrent devices each fetch the whole image block by block (Block2, 1024-byte blocks,
device_sim's fetcher and its pool of client sockets), in two client processes: one Python process
fetching for a thousand devices fills its core before either server fills its own, and would
measure itself rather than the server.  Figure: payload bytes / time against the fwcm
server.  Raw: the same load against a minimal aiocoap server holding the same bytes in one
resource.  Each run starts both servers afresh and loads the minimal one, then fwcm's (one idle
while the other is loaded).

The helper processes (the client load, the minimal server) are this file run as a script:
``python bench/coap_limits.py coap-load|coap-raw-server ARGS-JSON``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

from harness import Helper, ServerProc, device_csv, device_names, run_helper, workdir
from procstats import proc_status_mb

from fwcm.transport.broker import free_port, start_broker

MODULE = __file__


def helper_coap_load(args: dict[str, Any]) -> None:
    """``devices`` concurrent whole-image Block2 fetches through device_sim's client pool."""
    from device_sim.fleet import raise_nofile_limit
    from device_sim.transports import SharedClients, fetch_coap

    raise_nofile_limit()

    async def main() -> dict[str, Any]:
        clients = SharedClients()
        received = [0] * args["devices"]
        errors = 0
        # create the client contexts before the clock starts
        for i in range(clients.coap_sockets * 4):
            await clients.coap(f"warm-{i}")

        async def one(i: int) -> None:
            nonlocal errors
            name = f"dev-{args['first'] + i:06d}"

            async def sink(_offset: int, chunk: bytes) -> None:
                received[i] += len(chunk)

            async with clients.coap_slots:
                ctx = await clients.coap(name)
                for _attempt in range(3):
                    try:
                        await fetch_coap(ctx, args["uri"], received[i], sink)
                        return
                    except Exception:
                        errors += 1

        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args["devices"])))
        elapsed = time.perf_counter() - t0
        await clients.aclose()
        return {"seconds": elapsed, "bytes": sum(received), "errors": errors}

    print(json.dumps(asyncio.run(main())), flush=True)


def helper_coap_raw_server(args: dict[str, Any]) -> None:
    """A minimal aiocoap server: one resource holding the payload, Block2 by aiocoap."""
    import aiocoap
    from aiocoap import resource

    data = Path(args["payload"]).read_bytes()

    class Payload(resource.Resource):
        async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
            return aiocoap.Message(payload=data)

    async def main() -> None:
        site = resource.Site()
        site.add_resource(["p", args["sha"]], Payload())
        ctx = await aiocoap.Context.create_server_context(
            site, bind=("127.0.0.1", args["port"]), transports=["udp6"]
        )
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        await ctx.shutdown()

    asyncio.run(main())


LOAD_PROCESSES = 2


def coap_load(uri: str, devices: int, processes: int = LOAD_PROCESSES) -> dict[str, Any]:
    """The devices split over ``processes`` client processes started together: bytes received by
    all of them over the time the slowest one took."""
    shares = [devices // processes + (1 if p < devices % processes else 0) for p in range(processes)]
    firsts = [sum(shares[:p]) for p in range(processes)]
    loads = [
        Helper(MODULE, "coap-load", {"uri": uri, "first": first, "devices": n})
        for first, n in zip(firsts, shares, strict=True)
        if n
    ]
    try:
        for load in loads:
            load.go()
        results = [load.result() for load in loads]
    finally:
        for load in loads:
            load.kill()
    seconds = max(r["seconds"] for r in results)
    received = sum(r["bytes"] for r in results)
    return {
        "seconds": seconds,
        "bytes": received,
        "errors": sum(r["errors"] for r in results),
        "bytes_per_s": received / seconds,
    }


def coap_benchmark(devices: int, reps: int = 3, image_size: int = 64 * 1024) -> list[dict[str, Any]]:
    """``reps`` runs, each on fresh servers: every run."""
    return [coap_once(devices, image_size) for _ in range(reps)]


def coap_once(devices: int, image_size: int) -> dict[str, Any]:
    """The load against the minimal server, then against fwcm's (serving the payload of a CoAP
    campaign with one device per fetcher); each run's figures and server peak RSS."""
    image = random.Random(3).randbytes(image_size)
    sha = hashlib.sha256(image).hexdigest()
    with workdir() as work, start_broker() as broker:
        (work / "image").write_bytes(image)
        port = free_port(socket.SOCK_DGRAM)
        raw_server = Helper(
            MODULE, "coap-raw-server", {"payload": str(work / "image"), "sha": sha, "port": port}
        )
        server = ServerProc(work, broker)
        try:
            server.start()
            server.import_devices(device_csv(device_names(devices), coap_every=1))
            server.start_campaign(server.campaign(server.manifest(image)))
            raw = coap_load(f"coap://127.0.0.1:{port}/p/{sha}", devices)
            with server.profiled("coap"):
                fw = coap_load(f"{server.coap_url}/p/{sha}", devices)
            raw["server_peak_rss_mb"] = proc_status_mb(raw_server.process.pid, "VmHWM")
            fw["server_peak_rss_mb"] = server.peak_rss_mb()
        finally:
            server.stop()
            raw_server.go()  # tells it to stop
            with contextlib.suppress(Exception):
                raw_server.process.wait(10)
            raw_server.kill()
    return {"fwcm": fw, "raw": raw, "devices": devices, "image_size": image_size}


if __name__ == "__main__":
    run_helper({"coap-load": helper_coap_load, "coap-raw-server": helper_coap_raw_server})
