"""What every benchmark of bench/run shares: an ``fwcm server`` child process with its tenant and
API client, the devices' CSV, a scratch directory, and helper processes started from a bench
module (``python bench/MODULE.py COMMAND ARGS-JSON``) that get ready, wait for ``go`` on stdin,
run and print one JSON line.

With ``FWCM_BENCH_PYSPY=DIR`` the fwcm server is recorded with py-spy during each measured phase
(collapsed stacks in DIR/PHASE-TIME.txt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import httpx
from procstats import proc_status_mb

from fwcm import manifest as mf
from fwcm.transport import accounts
from fwcm.transport.broker import Broker, free_port

TENANT = "bench"
VENDOR = mf.vendor_id_for_domain("bench.fwcm.example")
CLASS = mf.class_id_for(VENDOR, "bench")
CSV_HEADER = "name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"


# -- process helpers ----------------------------------------------------------------------------


@dataclass
class ServerProc:
    """One ``fwcm server`` child process with a tenant, a signer and its API client."""

    work: Path
    broker: Broker
    database_url: str = ""
    http_port: int = field(default_factory=free_port)
    coap_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    process: subprocess.Popen[bytes] | None = None
    key: str = ""
    signing: Any = field(default_factory=lambda: mf.generate_private_key("es256"))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def coap_url(self) -> str:
        return f"coap://127.0.0.1:{self.coap_port}"

    def env(self) -> dict[str, str]:
        env = dict(
            os.environ,
            FWCM_DATA_DIR=str(self.work / "server"),
            **self.broker.server_env(),  # the server keeps the broker's accounts
            FWCM_HTTP_BIND=f"127.0.0.1:{self.http_port}",
            FWCM_COAP_BIND=f"127.0.0.1:{self.coap_port}",
        )
        if self.database_url:
            env["FWCM_DATABASE_URL"] = self.database_url
        return env

    def start(self) -> None:
        env = self.env()
        out = subprocess.run(
            [sys.executable, "-m", "fwcm.cli", "admin", "tenant-create", TENANT, "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        self.key = json.loads(out.stdout.strip().splitlines()[-1])["api_key"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fwcm.cli", "server", "--replica", "bench"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "server.log", "ab"),
        )
        with self.api() as api:
            for _ in range(300):
                if self.process.poll() is not None:
                    raise RuntimeError(f"fwcm server exited; see {self.work / 'server.log'}")
                try:
                    if api.get("/tenant").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            else:
                raise RuntimeError("fwcm server did not answer within 30 s")
            api.post(
                "/signers",
                json={"name": "rel", "public_key_pem": mf.public_key_pem(self.signing).decode()},
            ).raise_for_status()

    @contextlib.contextmanager
    def profiled(self, phase: str) -> Iterator[None]:
        """With FWCM_BENCH_PYSPY=DIR, record the server with py-spy during ``phase`` (collapsed
        stacks in DIR/PHASE-TIME.txt, one line per stack: ``frames;... count``)."""
        out_dir = os.environ.get("FWCM_BENCH_PYSPY")
        if not out_dir or self.process is None:
            yield
            return
        out = Path(out_dir) / f"{phase}-{time.strftime('%H%M%S')}.txt"
        cmd = ["py-spy", "record", "--pid", str(self.process.pid), "--rate", "250", "--format", "raw"]
        if os.environ.get("FWCM_BENCH_PYSPY_GIL"):
            cmd.append("--gil")  # only the thread holding the interpreter lock: where CPU goes
        prof = subprocess.Popen(
            [*cmd, "--threads", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)
        try:
            yield
        finally:
            prof.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                prof.wait(30)

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base + "/api/v1", headers={"Authorization": f"Bearer {self.key}"}, timeout=600
        )

    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics", timeout=60).text

    def envelope(self, image: bytes) -> bytes:
        """The signed manifest (SUIT envelope) for an image served by this server."""
        sha = hashlib.sha256(image).hexdigest()
        info = mf.ManifestInfo(
            2,
            VENDOR,
            CLASS,
            bytes.fromhex(sha),
            len(image),
            (f"{self.base}/p/{sha}", f"{self.coap_url}/p/{sha}"),
        )
        return mf.build_envelope(info, self.signing)

    def manifest(self, image: bytes) -> int:
        """Upload the image and a signed manifest for it; the manifest id."""
        envelope = self.envelope(image)
        with self.api() as api:
            api.post("/payloads", content=image).raise_for_status()
            r = api.post("/manifests", content=envelope, headers={"content-type": "application/cbor"})
            r.raise_for_status()
            return int(r.json()["id"])

    def import_devices(self, csv_text: str, *, wait: bool = True) -> int:
        """Import devices, then (``wait``) until the server has written their broker accounts (it
        does so in the background: a measurement started sooner would share the CPU with that
        write)."""
        with self.api() as api:
            r = api.post("/devices/import", content=csv_text, headers={"content-type": "text/csv"})
            r.raise_for_status()
            imported = int(r.json()["imported"])
        if wait:
            self.wait_for_accounts(imported)
        return imported

    def wait_for_accounts(self, count: int, timeout: float = 120) -> None:
        """Until the broker's device password file holds ``count`` accounts."""
        if self.broker.accounts_dir is None:
            return
        passwd = self.broker.accounts_dir / accounts.DEVICES_PASSWD
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if passwd.read_bytes().count(b"\n") >= count:
                    time.sleep(0.3)  # the broker's reload
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the server did not write {count} broker accounts within {timeout:.0f} s")

    def campaign(self, manifest_id: int, filter_: str = "") -> int:
        with self.api() as api:
            r = api.post("/campaigns", json={"name": "bench", "manifest_id": manifest_id, "filter": filter_})
            r.raise_for_status()
            return int(r.json()["id"])

    def start_campaign(self, cid: int) -> float:
        """Seconds the start request took (the deployments are frozen in it)."""
        with self.api() as api:
            t0 = time.perf_counter()
            api.post(f"/campaigns/{cid}/start").raise_for_status()
            return time.perf_counter() - t0

    def stats(self, cid: int) -> dict[str, Any]:
        with self.api() as api:
            return dict(api.get(f"/campaigns/{cid}/stats").json())

    def rss_mb(self) -> float:
        assert self.process is not None
        return proc_status_mb(self.process.pid, "VmRSS")

    def peak_rss_mb(self) -> float:
        assert self.process is not None
        return proc_status_mb(self.process.pid, "VmHWM")

    def stop(self) -> None:
        p = self.process
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def device_names(n: int) -> list[str]:
    return [f"dev-{i:06d}" for i in range(n)]


def device_csv(names: list[str], secrets_: dict[str, bytes] | None = None, coap_every: int = 0) -> str:
    """CSV for the import; ``coap_every=4`` makes every 4th device a CoAP device."""
    rows = [CSV_HEADER]
    for i, name in enumerate(names):
        transport = "coap" if coap_every and i % coap_every == 1 else "mqtt"
        secret = secrets_[name].hex() if secrets_ else ""
        region = "eu" if i % 2 == 0 else "us"
        rows.append(f"{name},{VENDOR},{CLASS},region={region};rack={i % 50},1,1.0,{transport},,{secret}")
    return "\n".join(rows) + "\n"


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fwcm-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Helper:
    """A bench module run as a helper process (``python MODULE COMMAND ARGS-JSON``): it prepares,
    prints ``ready``, waits for ``go`` on stdin, runs, and prints one JSON line."""

    def __init__(self, module: str, command: str, args: dict[str, Any]) -> None:
        self.go_wall = float("nan")
        """Wall-clock time of the go signal (for times the server reports as timestamps)."""
        self.process = subprocess.Popen(
            [sys.executable, module, command, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"helper {command} did not get ready: {line!r}")

    def go(self) -> float:
        assert self.process.stdin is not None
        self.go_wall = time.time()
        t0 = time.perf_counter()
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return t0

    def result(self, timeout: float = 600) -> dict[str, Any]:
        assert self.process.stdout is not None
        out, _ = self.process.communicate(timeout=timeout)
        return dict(json.loads(out.strip().splitlines()[-1]))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def run_helper(helpers: dict[str, Callable[[dict[str, Any]], None]]) -> None:
    """The ``__main__`` of a module with helpers: ``python MODULE COMMAND ARGS-JSON``."""
    helpers[sys.argv[1]](json.loads(sys.argv[2]))


def write_items(path: Path, items: list[tuple[str, bytes]]) -> None:
    """(topic, payload) items for a publishing helper."""
    path.write_bytes(pickle.dumps(items))


def read_items(path: str) -> list[tuple[str, bytes]]:
    items: list[tuple[str, bytes]] = pickle.loads(Path(path).read_bytes())
    return items
