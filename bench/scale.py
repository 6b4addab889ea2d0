"""scale: a server holding 100,000 registered devices (SQLite, and PostgreSQL when there is one).

Each run imports N devices (3/4 MQTT, 1/4 CoAP) through the API of a fresh server process on a
fresh database, starts a campaign over all of them and lets the engine notify every device.
Figures: the import's and the start request's seconds, the time until every device was notified,
and the server's RSS.  PostgreSQL runs use a database of their own on ``--database-url``'s server
(created and dropped by the run), or a throw-away cluster from /usr/lib/postgresql/*/bin.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import ServerProc, device_csv, device_names, workdir
from sqlalchemy.engine import make_url

from fwcm.transport.broker import free_port, start_broker


def scale_benchmark(n: int, database_url: str = "", settle_timeout: float = 300) -> dict[str, Any]:
    """Import n devices (3/4 MQTT, 1/4 CoAP) through the API of a server process, start a campaign
    over all of them, let the engine notify every device; server RSS and the start request's time."""
    with workdir() as work, start_broker() as broker:
        server = ServerProc(work, broker, database_url=database_url)
        try:
            server.start()
            image = random.Random(1).randbytes(64 * 1024)
            manifest_id = server.manifest(image)
            rss_idle = server.rss_mb()
            t0 = time.perf_counter()
            imported = server.import_devices(device_csv(device_names(n), coap_every=4), wait=False)
            import_s = time.perf_counter() - t0
            server.wait_for_accounts(imported)
            rss_imported = server.rss_mb()
            peak_imported = server.peak_rss_mb()
            cid = server.campaign(manifest_id)
            with server.profiled("scale-" + ("postgresql" if database_url else "sqlite")):
                start_s = server.start_campaign(cid)
                t0 = time.perf_counter()
                pending = n
                while time.perf_counter() - t0 < settle_timeout:
                    pending = server.stats(cid)["counts"]["pending"]
                    if pending == 0:
                        break
                    time.sleep(0.25)
                notify_s = time.perf_counter() - t0
            time.sleep(1.0)
            return {
                "database": "postgresql" if database_url else "sqlite",
                "devices": imported,
                "import_s": import_s,
                "start_s": start_s,
                "notify_all_s": notify_s if pending == 0 else float("nan"),
                "rss_idle_mb": rss_idle,
                "rss_after_import_mb": rss_imported,
                "peak_rss_after_import_mb": peak_imported,
                "rss_mb": server.rss_mb(),
                "peak_rss_mb": server.peak_rss_mb(),
            }
        finally:
            server.stop()


@contextlib.contextmanager
def temporary_postgres() -> Iterator[str | None]:
    """A throw-away PostgreSQL cluster on loopback (None when the binaries are missing)."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        yield None
        return
    bindir = bins[-1].parent
    tmp = Path(tempfile.mkdtemp(prefix="fwcm-bench-pg-"))
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = tmp / "data"
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c max_connections=100 -c shared_buffers=256MB"
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(tmp / "log"),
            "-w",
            "-o",
            opts,
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [
                str(bindir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "-qc",
                "CREATE DATABASE fwcm_bench",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/fwcm_bench"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(url: str, name: str) -> Iterator[str]:
    """A new database ``name`` on the PostgreSQL server of ``url``, dropped afterwards."""
    import psycopg

    admin = make_url(url).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def scale_runs(n: int, reps: int, database_url: str = "") -> tuple[dict[str, list[dict[str, Any]]], str]:
    """``reps`` runs on SQLite and on PostgreSQL (``database_url``'s server or a temporary cluster):
    every run by database, and a note when PostgreSQL was skipped."""
    runs: dict[str, list[dict[str, Any]]] = {"sqlite": [scale_benchmark(n) for _ in range(reps)]}
    with contextlib.ExitStack() as stack:
        url = database_url or stack.enter_context(temporary_postgres())
        if not url:
            return runs, "PostgreSQL skipped (no --database-url and no /usr/lib/postgresql)"
        base = make_url(url).database or "fwcm"
        runs["postgresql"] = []
        for i in range(reps):
            with fresh_database(url, f"{base}_bench_{os.getpid()}_{i}") as db_url:
                runs["postgresql"].append(scale_benchmark(n, db_url))
    return runs, ""
