"""Interoperability with tools nobody here wrote: Debian's mosquitto_sub and libcoap's client."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

import pytest

from fwcm import manifest as mf
from fwcm import protocol

from .conftest import Env, firmware

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto_sub") and shutil.which("coap-client-notls")),
    reason="needs mosquitto-clients and libcoap3-bin (installed by .ci/run)",
)


async def run(*cmd: str, timeout: float = 30) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"{cmd[0]} failed: {err.decode()}"
    return out


async def test_mosquitto_sub_receives_a_device_notice(env: Env) -> None:
    image = firmware(4096)
    man = await env.manifest(image)
    secrets = await env.devices([("watched", "mqtt")])
    await env.admitted("watched")
    cid = await env.campaign(man["id"])
    await env.call("POST", f"/campaigns/{cid}/start")
    topic = protocol.notice_topic("acme", "watched")
    username, password = env.mqtt_accounts["watched"]
    out = await run(
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        str(env.broker.port),
        "-u",
        username,
        "-P",
        password,
        "-t",
        topic,
        "-C",
        "1",
        "-W",
        "20",
        "-F",
        "%x",
    )
    notice = protocol.decode_notice(bytes.fromhex(out.decode().strip()), secrets["watched"])
    assert notice.kind == protocol.NoticeKind.UPDATE and notice.campaign == cid and notice.attempt == 1
    assert notice.envelope is not None
    info = mf.decode_envelope(notice.envelope).info
    assert info.image_digest == hashlib.sha256(image).digest()


async def test_mosquitto_sub_without_an_account_reads_nothing(env: Env) -> None:
    """What an anonymous ``mosquitto_sub -t 'fwcm/v1/#'`` read before every device had an account:
    every notice (install tokens included) and every presence."""
    await env.devices([("watched", "mqtt")])
    cid = await env.campaign((await env.manifest(firmware(4096)))["id"])
    await env.call("POST", f"/campaigns/{cid}/start")
    proc = await asyncio.create_subprocess_exec(
        *("mosquitto_sub", "-h", "127.0.0.1", "-p", str(env.broker.port), "-t", "fwcm/v1/#"),
        *("-C", "1", "-W", "5", "-v"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0 and out == b""
    assert b"not authori" in err.lower(), err


@pytest.mark.parametrize("held", ["cached", "from disk"])
async def test_coap_client_fetches_payload_blockwise(env: Env, tmp_path: Path, held: str) -> None:
    if held == "from disk":  # an image too large for the cache: each block is read from the file
        env.server.payload_cache.max_item = 4096
    image = firmware(50_000, seed=3)  # 49 blocks of 1024 bytes
    sha = hashlib.sha256(image).hexdigest()
    await env.call("POST", "/payloads", content=image)
    out = tmp_path / "payload.bin"
    uri = f"coap://127.0.0.1:{env.settings.coap_port}/p/{sha}"
    await run("coap-client-notls", "-m", "get", "-b", "512", "-o", str(out), uri, timeout=60)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
