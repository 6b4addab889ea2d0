"""``fwcm demo --console``: a slow campaign stays up with the console, and Ctrl-C stops it all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx


def test_demo_console_serves_the_campaign_and_stops_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fwcm.cli", "demo", "--console", "--devices", "6", "--faults", "install-fail"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert proc.stdout is not None
        seen = ""
        url = key = None
        for line in proc.stdout:
            seen += line
            found_url = re.search(r"console: (http://\S+/ui/campaigns/\d+)", line)
            found_key = re.search(r"sign in with the API key: (\S+)", line)
            url = found_url.group(1) if found_url else url
            key = found_key.group(1) if found_key else key
            if url and key:
                break
        assert url and key, seen
        base = url.split("/ui/")[0]
        with httpx.Client(base_url=base, timeout=30) as http:
            form = http.get("/ui/signin")
            token = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert token is not None
            assert http.post("/ui/signin", data={"key": key, "csrf": token.group(1)}).status_code == 303
            page = http.get(url.removeprefix(base))
            assert page.status_code == 200 and "demo-console" in page.text
            assert "phase 1 (canary)" in page.text
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, seen + out
        assert "stopped" in out
        try:
            httpx.get(base + "/ui", timeout=2)
            raise AssertionError("the server still answers after Ctrl-C")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
