"""The README's CLI tour, run as written: its marked code block, command by command, in one
environment, against a real ``fwcm server`` process, a real Mosquitto and the simulated devices.

The broker is the one the tour asks for: a Mosquitto with a plain listener on loopback (as
``mosquitto`` runs without a configuration file).  Only the addresses change: the variables the
tour exports for the broker and the server's ports (``SUBSTITUTED``) are set by the test to that
broker and to free ports, and the tour's own ``export`` of them is skipped; everything else
(``FWCM_URL``, the manifest's URIs, the devices' addresses) follows from them as the README says.
Commands ending in ``&`` run in the background until the test ends; the test waits for the server
to answer before the next command, as a person waits for its ``serving:`` line.  Every other
command must exit 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fwcm.transport.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
TOUR_MARK = "<!-- tour"
SUBSTITUTED = ("FWCM_MQTT_URL", "FWCM_HTTP_BIND", "FWCM_COAP_BIND")
COMMAND_TIMEOUT_S = 120.0
SERVER_START_S = 60.0


@dataclass(frozen=True)
class Command:
    text: str
    """The command as bash runs it (continuation lines joined)."""
    background: bool
    exports: str | None
    """The variable a plain ``export NAME=...`` sets."""


def tour_commands(readme: str) -> list[Command]:
    """The commands of every code block that follows a ``<!-- tour`` comment, in order."""
    commands: list[Command] = []
    for block in re.findall(r"^<!-- tour[^\n]*-->\n```[a-z]*\n(.*?)^```", readme, re.M | re.S):
        for text in block.replace("\\\n", " ").splitlines():
            words = shlex.split(text, comments=True)
            if not words:
                continue
            exported = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=.*", words[1]) if words[0] == "export" else None
            commands.append(
                Command(text.strip(), background=words[-1] == "&", exports=exported and exported[1])
            )
    return commands


def test_the_tour_block_is_found() -> None:
    """The marker and block exist: the tour test below would otherwise pass on nothing."""
    commands = tour_commands((ROOT / "README.md").read_text())
    assert len(commands) >= 20
    assert sum(c.background for c in commands) == 2  # the server and the devices
    assert {c.exports for c in commands} >= set(SUBSTITUTED)


class Shell:
    """Runs commands one by one, carrying the environment from one to the next as a shell would."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self.background: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self._env_file = cwd.parent / "tour.env"

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        script = (
            f"set -o pipefail\n{command}\n__rc=$?\nenv -0 > {shlex.quote(str(self._env_file))}\nexit $__rc\n"
        )
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        if done.returncode == 0:
            pairs = self._env_file.read_bytes().decode().split("\0")
            self.env = dict(p.split("=", 1) for p in pairs if "=" in p and not p.startswith("_="))
        return done

    def start(self, command: str) -> subprocess.Popen[bytes]:
        """``command &`` in its own process group, its output in a log file."""
        log = self.cwd.parent / f"background-{len(self.background)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", f"{command}\nwait"],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.background.append((command, proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {cmd}\n{log.read_text()[-3000:]}" for cmd, _p, log in self.background)

    def stop(self) -> None:
        for _cmd, proc, _log in reversed(self.background):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _cmd, proc, _log in self.background:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


BROKER_START_S = 20.0


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[str]:
    """Mosquitto as a tour reader starts it: one listener on loopback, anyone admitted; its URL."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        pytest.skip("the tour needs Mosquitto (Debian: mosquitto)")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    with (tmp_path / "mosquitto.log").open("wb") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + BROKER_START_S
        while True:
            assert proc.poll() is None, (tmp_path / "mosquitto.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def shell(tmp_path: Path, mosquitto: str) -> Iterator[Shell]:
    """A working directory that looks like a clone (the tour's example files), the substituted
    addresses, and the client's config file kept inside the test."""
    work = tmp_path / "clone"
    work.mkdir()
    for name in ("examples", "campaigns"):
        (work / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FWCM_")}  # the tour's SQLite, not PG
    env.update(
        FWCM_MQTT_URL=mosquitto,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        FWCM_HTTP_BIND=f"127.0.0.1:{free_port()}",
        FWCM_COAP_BIND=f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
        FWCM_CONFIG=str(tmp_path / "fwcm-config.toml"),
        PYTHONUNBUFFERED="1",
    )
    s = Shell(work, env)
    try:
        yield s
    finally:
        s.stop()


def wait_for_server(shell: Shell, server: subprocess.Popen[bytes]) -> None:
    url = f"http://{shell.env['FWCM_HTTP_BIND']}/api/v1/tenant"
    headers = {"Authorization": f"Bearer {shell.env['FWCM_API_KEY']}"}
    deadline = time.monotonic() + SERVER_START_S
    while True:
        assert server.poll() is None, f"fwcm server exited\n{shell.logs()}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, headers=headers, timeout=5).status_code == 200:
                return
        assert time.monotonic() < deadline, f"fwcm server did not answer\n{shell.logs()}"
        time.sleep(0.2)


def test_readme_tour_runs_as_written(shell: Shell) -> None:
    """Every command of the tour exits 0; campaign 1 completes with the eight eu sensors updated
    and running sequence 2; campaign 2 was paused, resumed and cancelled before it reached every us
    sensor."""
    commands = tour_commands((ROOT / "README.md").read_text())
    skipped = []
    for c in commands:
        if c.exports in SUBSTITUTED:
            skipped.append(c.exports)
            continue
        if c.background:
            proc = shell.start(c.text)
            if c.text.startswith("fwcm server"):
                wait_for_server(shell, proc)
            continue
        try:
            done = shell.run(c.text)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{c.text}` ran longer than {COMMAND_TIMEOUT_S:.0f} s\n{shell.logs()}")
        assert done.returncode == 0, (
            f"`{c.text}` exited {done.returncode}\nstdout: {done.stdout[-2000:]}\n"
            f"stderr: {done.stderr[-2000:]}\n{shell.logs()}"
        )
        for _cmd, proc, _log in shell.background:
            assert proc.poll() is None, f"`{_cmd}` exited during `{c.text}`\n{shell.logs()}"
    assert sorted(skipped) == sorted(SUBSTITUTED)

    with httpx.Client(
        base_url=shell.env["FWCM_URL"], headers={"Authorization": f"Bearer {shell.env['FWCM_API_KEY']}"}
    ) as api:
        first = api.get("/api/v1/campaigns/1").json()
        assert first["state"] == "completed", first
        stats = api.get("/api/v1/campaigns/1/stats").json()
        assert stats["total"] == 8 and stats["counts"]["succeeded"] == 8, stats
        second = api.get("/api/v1/campaigns/2").json()
        assert second["state"] == "cancelled", second
        events = sorted(api.get("/api/v1/campaigns/2/events").json()["items"], key=lambda e: e["at"])
        states = iter(e["state"] for e in events)
        assert all(s in states for s in ("running", "paused", "running", "cancelled")), events
        devices = api.get("/api/v1/devices", params={"limit": 100}).json()["items"]
        sequences = {d["name"]: d["sequence"] for d in devices}
        assert len(sequences) == 12
        assert {sequences[f"sensor-{i:02d}"] for i in range(1, 9)} == {2}
        assert 1 in {sequences[f"sensor-{i:02d}"] for i in range(9, 13)}  # cancelled before all
