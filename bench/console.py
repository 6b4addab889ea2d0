"""The operator console on a 100,000-device campaign: page render time and server CPU per open
live page.

Imports the devices through the API (as ``import_and_start.py`` does), starts a phased campaign
over all of them and moves the deployments along in SQL (60 % succeeded over the last three
hours, about 330 a minute, 2 % failed, 5 % downloading, the rest pending), then

* renders the campaign page (and the campaign list, and the API's stats for comparison) in
  process, signed in like a browser, and prints the median and 90th percentile;
* serves the app from a child process (uvicorn) and holds live pages (SSE streams) open on the
  campaign for ``--seconds``, first with nothing changing, then with a writer reporting devices
  every second, and prints the server's CPU per open page (the fwcm process's: on PostgreSQL the
  queries' own CPU is the database server's).

    python bench/console.py [--devices 100000] [--pages 1,10] [--seconds 20] [--database-url …]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import hashlib

import httpx
from fastapi.testclient import TestClient
from import_and_start import make_csv
from procstats import cpu_seconds
from sqlalchemy import create_engine, text

from fwcm import manifest
from fwcm.api import create_app
from fwcm.config import Settings
from fwcm.console import mount
from fwcm.store import counts, tenants
from fwcm.store.db import Database, normalize_url

POLICY = {
    "phases": [
        {"name": "canary", "size": "1%", "success_threshold": "90%", "error_threshold": "10%"},
        {"name": "wave", "size": "20%", "success_threshold": "90%", "error_threshold": "10%"},
        {"name": "rest", "success_threshold": "90%", "error_threshold": "10%", "error_min_devices": 50},
    ]
}


def app_for(database_url: str, data_dir: Path) -> Any:
    db = Database(database_url)
    settings = Settings(data_dir=data_dir, database_url=database_url)
    app = create_app(db, settings)
    mount(app, db, settings)
    return app, db


def setup(database_url: str, data_dir: Path, n: int) -> tuple[str, int]:
    """A tenant with ``n`` devices in one running campaign part way through; its key and campaign."""
    db = Database(database_url)
    db.migrate()
    db.dispose()
    app, db = app_for(database_url, data_dir)
    with db.session() as s:
        _t, key = tenants.create_tenant(s, "bench", "Bench")
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    vendor = manifest.vendor_id_for_domain("bench.example")
    cls = manifest.class_id_for(vendor, "sensor")
    signing = manifest.generate_private_key()
    pem = manifest.public_key_pem(signing).decode()
    client.post("/api/v1/signers", json={"name": "bench", "public_key_pem": pem}).raise_for_status()
    image = b"bench firmware"
    info = manifest.ManifestInfo(
        2, vendor, cls, hashlib.sha256(image).digest(), len(image), ("http://127.0.0.1/p/x",)
    )
    r = client.post("/api/v1/manifests", content=manifest.build_envelope(info, signing))
    r.raise_for_status()
    t0 = time.perf_counter()
    client.post(
        "/api/v1/devices/import", content=make_csv(n, vendor, cls), headers={"Content-Type": "text/csv"}
    ).raise_for_status()
    body = {"name": "big", "manifest_id": r.json()["id"], "filter": "", "policy": POLICY}
    cid = client.post("/api/v1/campaigns", json=body).json()["id"]
    client.post(f"/api/v1/campaigns/{cid}/start").raise_for_status()
    print(f"setup: {n} devices imported and frozen in a campaign in {time.perf_counter() - t0:.1f} s")
    progress(db, cid)
    client.close()
    db.dispose()
    return key, cid


def progress(db: Database, cid: int) -> None:
    """Move the campaign along in SQL: most of the first two phases done, some failures."""
    now = time.time()
    with db.session() as s:
        dialect = s.get_bind().dialect.name
        ago = (
            "datetime(:now - (device_id % 10800), 'unixepoch')"
            if dialect == "sqlite"
            else "to_timestamp(:now - (device_id % 10800))"
        )
        s.execute(
            text(
                f"UPDATE deployments SET state = CASE "
                f"WHEN device_id % 100 < 60 THEN 'succeeded' WHEN device_id % 100 < 62 THEN 'failed' "
                f"ELSE 'downloading' END, result = CASE WHEN device_id % 100 BETWEEN 60 AND 61 "
                f"THEN 8 ELSE 0 END, notified_at = {ago}, updated_at = {ago} "
                f"WHERE campaign_id = :c AND device_id % 100 < 67"
            ),
            {"c": cid, "now": now},
        )
        s.execute(text("UPDATE campaigns SET phase = 2 WHERE id = :c"), {"c": cid})
    with db.session() as s:
        counts.fold(s)  # as the engine does every 2 s (PostgreSQL keeps the changes as deltas)


def signed_in(client: Any) -> None:
    form = client.get("/ui/signin")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    return token.group(1)  # type: ignore[return-value]


def sign_in(client: Any, key: str) -> None:
    token = signed_in(client)
    r = client.post("/ui/signin", data={"key": key, "csrf": token})
    assert r.status_code in (200, 303), r.text


def timings(client: Any, path: str, runs: int, **kw: Any) -> dict[str, float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = client.get(path, **kw)
        out.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
    out.sort()
    return {"median_ms": round(statistics.median(out), 1), "p90_ms": round(out[int(len(out) * 0.9) - 1], 1)}


def render(database_url: str, data_dir: Path, key: str, cid: int, runs: int) -> dict[str, Any]:
    app, db = app_for(database_url, data_dir)
    with TestClient(app) as browser:
        sign_in(browser, key)
        page = browser.get(f"/ui/campaigns/{cid}")
        assert page.status_code == 200 and "update_failed" in page.text, page.text[:500]
        result = {
            "campaign_page": timings(browser, f"/ui/campaigns/{cid}", runs),
            "campaign_list": timings(browser, "/ui/campaigns", runs),
            "page_bytes": len(page.content),
        }
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as api:
        result["api_stats"] = timings(api, f"/api/v1/campaigns/{cid}/stats", runs)
    db.dispose()
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(database_url: str, data_dir: Path, port: int) -> None:
    import uvicorn

    app, _db = app_for(database_url, data_dir)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def writer(database_url: str, cid: int, stop: threading.Event, per_s: int) -> None:
    """Report ``per_s`` devices of the campaign succeeded every second, with their device events, as
    ingest would: the live pages see a change every second."""
    db = Database(database_url)
    with db.read() as s:
        pending = "SELECT device_id FROM deployments WHERE campaign_id = :c AND state = 'pending'"
        ids = [r[0] for r in s.execute(text(pending + " ORDER BY device_id"), {"c": cid})]
    i = 0
    while not stop.wait(1.0):
        batch = ids[i : i + per_s]
        i += per_s
        with db.session() as s:
            now = "CURRENT_TIMESTAMP"
            for d in batch:
                s.execute(
                    text(f"UPDATE deployments SET state='succeeded', updated_at={now}, notified_at={now} "
                         "WHERE campaign_id = :c AND device_id = :d"),
                    {"c": cid, "d": d},
                )  # fmt: skip
                s.execute(
                    text("INSERT INTO device_events (tenant_id, campaign_id, device_id, at, state, result) "
                         f"SELECT tenant_id, campaign_id, device_id, {now}, 'succeeded', 0 FROM deployments "
                         "WHERE campaign_id = :c AND device_id = :d"),
                    {"c": cid, "d": d},
                )  # fmt: skip
    db.dispose()


def live_cpu(
    database_url: str, data_dir: Path, key: str, cid: int, pages: int, seconds: float, changing: bool
) -> dict[str, Any]:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "serve", "--database-url", database_url, "--data-dir", str(data_dir),
         "--port", str(port)],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(base + "/ui/signin", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        stop = threading.Event()
        events = [0] * pages

        def page(i: int) -> None:
            with httpx.Client(base_url=base, timeout=None) as c:
                sign_in(c, key)
                try:
                    with c.stream("GET", f"/ui/campaigns/{cid}/live") as r:
                        for line in r.iter_lines():
                            if line.startswith("event: stats"):
                                events[i] += 1
                            if stop.is_set():
                                return
                except httpx.TransportError:  # the server was stopped under it
                    return

        threads = [threading.Thread(target=page, args=(i,), daemon=True) for i in range(pages)]
        for t in threads:
            t.start()
        time.sleep(3)  # every page opened and got its first fragment
        w = None
        if changing:
            w = threading.Thread(target=writer, args=(database_url, cid, stop, 10), daemon=True)
            w.start()
            time.sleep(1.5)
        first = list(events)
        cpu0, t0 = cpu_seconds(child.pid), time.monotonic()
        time.sleep(seconds)
        cpu = cpu_seconds(child.pid) - cpu0
        wall = time.monotonic() - t0
        updates = sum(events) - sum(first)
        stop.set()
        return {
            "pages": pages,
            "changing": changing,
            "server_cpu_percent": round(100 * cpu / wall, 2),
            "cpu_percent_per_page": round(100 * cpu / wall / pages, 2),
            "updates_per_page_per_s": round(updates / pages / wall, 2),
        }
    finally:
        child.terminate()  # open streams may hold uvicorn's graceful shutdown: then kill it
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="run", choices=("run", "serve"))
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--pages", default="1,10", help="open live pages per measurement, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--database-url", help="PostgreSQL URL (default: a temporary SQLite file)")
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--port", type=int)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.command == "serve":
        serve(args.database_url, args.data_dir, args.port)
        return 0

    with tempfile.TemporaryDirectory(prefix="fwcm-bench-console-") as tmp:
        data_dir = Path(tmp)
        admin = schema = None
        if args.database_url:
            base = normalize_url(args.database_url)
            schema = f"bench_{secrets.token_hex(4)}"
            admin = create_engine(base, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'CREATE SCHEMA "{schema}"'))
            sep = "&" if "?" in base else "?"
            url = f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
        else:
            url = f"sqlite:///{data_dir / 'bench.db'}"
        try:
            key, cid = setup(url, data_dir, args.devices)
            result: dict[str, Any] = {"devices": args.devices, "database": url.split(":", 1)[0]}
            result["render"] = render(url, data_dir, key, cid, args.runs)
            print(json.dumps(result["render"]) if args.json else f"render: {result['render']}")
            result["live"] = []
            for pages in (int(p) for p in args.pages.split(",")):
                for changing in (False, True):
                    m = live_cpu(url, data_dir, key, cid, pages, args.seconds, changing)
                    result["live"].append(m)
                    print(json.dumps(m) if args.json else f"live: {m}")
        finally:
            if admin is not None:
                with admin.connect() as c:
                    c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                admin.dispose()
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
