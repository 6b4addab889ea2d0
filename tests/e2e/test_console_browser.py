"""The operator console in headless Chromium against a real server (broker, MQTT, HTTP) and a
simulated fleet: sign-in, a phased campaign page that updates live while devices install, pause
and resume from the page, a device page, the filter error display and the tenant boundary.

Screenshots go to the test's temp directory, or to ``$FWCM_CONSOLE_SCREENSHOTS`` when set
(docs/console.md shows two of them).  Skipped when Chromium or its driver is not installed
(``.ci/run`` installs Debian's ``chromium`` and ``chromium-driver``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_sim.agent import DeviceConfig
from device_sim.faults import get_profile
from device_sim.fleet import run_fleet
from fwcm import manifest as mf
from fwcm.store import tenants
from tests.e2e.conftest import CLASS, VENDOR, Env, firmware

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="needs chromium and chromium-driver (Debian packages)"
)

POLICY = {
    "rate_per_minute": 30,
    "order": "registration",  # the canary is d000-d003; the failing d005 and d015 are in the rollout
    "phases": [
        {"name": "canary", "size": 4, "success_threshold": "75%", "error_threshold": "50%"},
        {"name": "rollout", "success_threshold": "80%", "error_threshold": "40%", "error_min_devices": 3},
    ],
}
"""Slow enough to watch: a phased rollout of 20 devices at 30 a minute."""


class Browser:
    """A headless Chromium driven from the test's event loop: every WebDriver call runs in a
    thread, so the server on the same loop keeps answering."""

    def __init__(self, base: str, shots: Path) -> None:
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        options = Options()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1700"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.base = base
        self.shots = shots

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def get(self, path: str) -> None:
        await self.run(self.driver.get, self.base + path)

    async def text(self, css: str) -> str:
        """The element's text, read in one script: the live part may be replaced at any moment."""
        script = "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : '';"
        return str(await self.run(self.driver.execute_script, script, css))

    async def js(self, script: str) -> Any:
        return await self.run(self.driver.execute_script, script)

    async def wait(self, what: str, check: Callable[[], Any], timeout: float = 120.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await check():
            if asyncio.get_running_loop().time() > deadline:
                await self.shot(f"timeout-{what.replace(' ', '-')}")
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.25)

    async def sign_in(self, key: str) -> None:
        from selenium.webdriver.common.by import By

        await self.get("/ui/signin")

        def submit() -> None:
            field = self.driver.find_element(By.ID, "key")
            field.send_keys(key)
            field.submit()

        await self.run(submit)

    async def act(self, action: str) -> None:
        """Click an action's button and accept its confirm()."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        def click() -> None:
            self.driver.find_element(By.ID, f"action-{action}").click()
            WebDriverWait(self.driver, 10).until(expected_conditions.alert_is_present())
            self.driver.switch_to.alert.accept()

        await self.run(click)

    async def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        await self.run(self.driver.save_screenshot, str(path))
        return path

    def cookies(self) -> dict[str, str]:
        return {c["name"]: c["value"] for c in self.driver.get_cookies()}

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("FWCM_CONSOLE_SCREENSHOTS", tmp_path / "screenshots"))
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture
def browser(env: Env, shots: Path) -> Iterator[Browser]:
    b = Browser(env.settings.public_http_url, shots)
    try:
        yield b
    finally:
        b.close()


def fleet_configs(env: Env, secrets: dict[str, bytes], tmp: Path) -> list[DeviceConfig]:
    return [
        DeviceConfig(
            name=name,
            tenant="acme",
            secret=secrets[name],
            vendor_id=VENDOR,
            class_id=CLASS,
            transport="mqtt",
            trust_anchors=[mf.public_key_pem(env.signing_key)],
            state_dir=tmp / "devices",
            mqtt_url=env.broker.url,
            mqtt_username=env.mqtt_accounts[name][0],
            mqtt_password=env.mqtt_accounts[name][1],
            coap_url=env.settings.public_coap_url,
            installed_sequence=1,
            index=i,
        )
        for i, name in enumerate(sorted(secrets))
    ]


async def test_live_phased_campaign_pause_resume_and_device_page(
    env: Env, browser: Browser, tmp_path: Path
) -> None:
    man = await env.manifest(firmware(16 * 1024))
    secrets = await env.devices([(f"d{i:03d}", "mqtt") for i in range(20)])
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(
            fleet_configs(env, secrets, tmp_path),
            get_profile("install-fail"),  # d005 and d015 fail to install
            until=lambda _r: stop.is_set(),
            timeout=400,
        )
    )
    try:
        for _ in range(600):  # every device said hello before the campaign starts
            if env.server.ingest.ingested >= 20:
                break
            await asyncio.sleep(0.2)
        c = await env.call(
            "POST",
            "/campaigns",
            json={"name": "spring", "manifest_id": man["id"], "filter": "", "policy": POLICY},
        )
        cid = int(c["id"])
        await env.call("POST", f"/campaigns/{cid}/start")

        await browser.sign_in(env.key)
        await browser.wait("the campaign list", lambda: browser.text("#campaigns"))
        assert "spring" in await browser.text("#campaigns")
        await browser.get(f"/ui/campaigns/{cid}")
        assert await browser.text("#campaign-state") == "running"
        await browser.js("window.fwcmMarker = 1")  # gone if the page reloads

        async def updated_live() -> bool:
            counts = await browser.text("#counts")
            updates = await browser.js("return Number(document.getElementById('live').dataset.updates || 0)")
            return "succeeded" in counts and updates >= 2

        await browser.wait("live updates", updated_live)
        assert await browser.js("return window.fwcmMarker") == 1, "the page reloaded instead of updating"

        await browser.act("pause")
        await browser.wait("the paused state", lambda: _is(browser, "#campaign-state", "paused"))
        assert (await env.call("GET", f"/campaigns/{cid}"))["state"] == "paused"
        await browser.act("resume")
        await browser.wait(
            "the running state", lambda: _is(browser, "#campaign-state", "running", "completed")
        )

        async def failures_shown() -> bool:
            counts = await browser.text("#counts")
            return "failed 2" in counts or await browser.text("#campaign-state") == "completed"

        await browser.wait("both failures", failures_shown, timeout=200)
        await browser.shot("campaign")
        await browser.wait("the end", lambda: _is(browser, "#campaign-state", "completed"), timeout=200)
        history = await browser.text("#events")
        assert "pause requested" in history and "resume requested" in history
        assert "update_failed" in await browser.text("#by-result")

        await browser.get("/ui/devices/d005")
        assert "spring" in await browser.text("#device-campaigns")
        assert "failed" in await browser.text("#device-campaigns")
        assert "update_failed" in await browser.text("#device-history")
        await browser.shot("device")
    finally:
        stop.set()
        await asyncio.wait_for(fleet, 60)


async def _is(browser: Browser, css: str, *values: str) -> bool:
    return await browser.text(css) in values


async def test_filter_error_and_tenant_boundary(env: Env, browser: Browser) -> None:
    from selenium.webdriver.common.by import By

    man = await env.manifest(firmware(4 * 1024))
    await env.devices([("d000", "mqtt"), ("d001", "mqtt")])
    cid = await env.campaign(man["id"])

    await browser.sign_in(env.key)
    await browser.get("/ui/devices")

    def search(text: str) -> None:
        field = browser.driver.find_element(By.ID, "filter")
        field.clear()
        field.send_keys(text)
        field.submit()

    await browser.run(search, 'tag.region == "eu" and version >> "1"')
    await browser.wait("the filter error", lambda: browser.text("#filter-error"))
    error = await browser.text("#filter-error")
    assert "invalid filter at column 33" in error, error
    assert await browser.js("return document.getElementById('filter').getAttribute('aria-invalid')") == "true"
    await browser.shot("filter-error")
    await browser.run(search, 'tag.region == "eu"')
    await browser.wait("the device list", lambda: browser.text("#devices"))
    assert "d001" in await browser.text("#devices")

    with env.server.db.session() as s:
        _t, other = tenants.create_tenant(s, "globex", "Globex")
    await browser.run(browser.driver.delete_all_cookies)
    await browser.sign_in(other)
    await browser.get(f"/ui/campaigns/{cid}")
    assert await browser.text("h1") == "Not found"
    await browser.get("/ui/devices")
    assert "d001" not in await browser.text("#devices")
    async with httpx.AsyncClient(base_url=env.settings.public_http_url, cookies=browser.cookies()) as http:
        r = await http.get(f"/ui/campaigns/{cid}")
        assert r.status_code == 404
        assert "spring" not in r.text and "e2e" not in r.text
        assert (await http.get(f"/ui/campaigns/{cid}/live")).status_code == 404
