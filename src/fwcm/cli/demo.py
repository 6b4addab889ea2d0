"""``fwcm demo``: a whole campaign on embedded defaults, end to end, with a simulated fleet.

Everything is real: a broker process, the server's MQTT/CoAP/HTTP adapters on loopback, a
SQLite file, the REST API for every tenant action, and devices that verify, download, install
and report.  The demo checks that every device ended as its fault profile says it must.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fwcm.cli import demo_report, demo_signing
from fwcm.cli.demo_trust import Trust, spki_b64
from fwcm.rollout.states import DeviceState
from fwcm.runtime import setup_logging, tune_gc

log = logging.getLogger("fwcm.demo")

STATES = tuple(st.value for st in DeviceState)


@dataclass
class DemoOptions:
    devices: int
    transport: str
    faults: str
    campaign_file: Path | None
    image_size: int
    timeout: float
    attestation: bool = False
    consent: bool = False
    signing_service: bool = False
    console: bool = False
    delta: bool = False


CONSOLE_POLICY: dict[str, Any] = {
    "rate_per_minute": 12,
    "phases": [
        {"name": "canary", "size": "10%", "success_threshold": "80%", "error_threshold": "50%",
         "error_min_devices": 3},
        {"name": "rollout", "success_threshold": "80%", "error_threshold": "30%", "error_min_devices": 5},
    ],
}  # fmt: skip
"""``--console`` without a campaign file: a canary then the rest, 12 devices a minute, slow enough
to watch (a failing profile such as install-fail shows the failure breakdowns)."""


DELTA_UNKNOWN_EVERY = 10
"""``--delta``: every tenth device runs an image of its own, which the server does not hold, and
gets the full image; the others run release 1.0 and get a patch."""


LWM2M_UNSUITED_FAULTS = ("boot-fail", "rogue", "revoked", "dev-build")
"""Profiles plain LwM2M devices cannot play: they verify no manifest, attest nothing and have no
"reverted" result (docs/lwm2m.md)."""


def lwm2m_unsuited(opts: DemoOptions) -> str | None:
    """Why LwM2M devices cannot take part in this demo, or None."""
    if opts.attestation or opts.consent or opts.delta:
        return "LwM2M devices take no part in attestation, consent or delta updates"
    if opts.faults in LWM2M_UNSUITED_FAULTS:
        return f"LwM2M devices cannot play the {opts.faults} fault profile"
    return None


def _transport_for(i: int, opts: DemoOptions) -> str:
    """``mixed``: MQTT, CoAP and LwM2M devices in turn (MQTT and CoAP where LwM2M cannot play)."""
    if opts.transport != "mixed":
        return opts.transport
    kinds = ("mqtt", "coap") if lwm2m_unsuited(opts) else ("mqtt", "coap", "lwm2m")
    return kinds[i % len(kinds)]


class Api:
    """The few REST calls the demo makes, as the tenant."""

    def __init__(self, base: str, key: str) -> None:
        self.http = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        r = await self.http.request(method, "/api/v1" + path, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json()

    async def refusal(self, method: str, path: str, **kw: Any) -> str | None:
        """The detail of a request the server must refuse (403), None if it did not refuse it."""
        r = await self.http.request(method, "/api/v1" + path, **kw)
        return str(r.json().get("detail")) if r.status_code == 403 else None

    async def close(self) -> None:
        await self.http.aclose()


def load_campaign_file(path: Path | None) -> dict[str, Any]:
    """Name, filter and policy from a campaign definition (docs/rollout.md); defaults without one."""
    from fwcm.rollout.definition import DefinitionError, load_definition

    if path is None:
        return {"name": "demo-rollout", "filter": "", "policy": {}}
    try:
        d = load_definition(path.read_text())
    except (OSError, DefinitionError) as exc:
        raise typer.BadParameter(f"campaign file {path}: {exc}") from exc
    return {"name": d.name, "filter": d.filter, "policy": d.policy}


def _progress_table(stats: dict[str, Any], devices: int, elapsed: float) -> Table:
    counts = stats.get("counts", {})
    table = Table(title=f"campaign {stats.get('name')} — {stats.get('state')}  ({elapsed:.1f} s)")
    shown = [st for st in STATES if counts.get(st)] or ["pending"]  # the states that apply
    for st in shown:
        table.add_column(st, justify="right")
    table.add_row(*(str(counts.get(st, 0)) for st in shown))
    return table


async def _run(opts: DemoOptions, console: Console, as_json: bool) -> dict[str, Any]:
    from device_sim.agent import DeviceConfig
    from device_sim.faults import get_profile
    from device_sim.fleet import run_fleet
    from fwcm import manifest as mf
    from fwcm import pki
    from fwcm.config import Settings
    from fwcm.server.app import Server
    from fwcm.store import tenants
    from fwcm.store import trust as trust_store
    from fwcm.transport.broker import free_port, start_broker

    profile = get_profile("consent" if opts.consent else opts.faults)
    definition = load_campaign_file(opts.campaign_file)
    if opts.console and opts.campaign_file is None:
        definition = {"name": "demo-console", "filter": "", "policy": CONSOLE_POLICY}
    workdir = Path(tempfile.mkdtemp(prefix="fwcm-demo-"))
    started = time.monotonic()
    broker = await asyncio.to_thread(start_broker)
    server: Server | None = None
    api: Api | None = None
    try:
        hsm = demo_signing.token_settings(workdir) if opts.signing_service else {}
        settings = Settings(
            data_dir=workdir / "server",
            http_port=free_port(),
            coap_port=free_port(socket.SOCK_DGRAM),
            lwm2m_port=free_port(socket.SOCK_DGRAM),
            **hsm,
            **broker.server_settings(),  # type: ignore[arg-type] # the server keeps the broker's accounts
        )
        server = Server(settings, replica="demo")
        await server.start()
        console.log(
            f"broker: {broker.kind} on {broker.url}; server: {settings.public_http_url}, "
            f"{settings.public_coap_url}"
        )
        with server.db.session() as s:
            _tenant, key = tenants.create_tenant(s, "demo", "Demo Fleet Inc.")
        api = Api(settings.public_http_url, key)

        signing_key = mf.generate_private_key("es256")
        pub = mf.public_key_pem(signing_key)
        trust = Trust.make(opts.attestation, opts.faults, opts.devices, workdir, signing_key)
        if trust.root_pem is not None:
            settings.pki_root = workdir / "root.pem"
            with server.db.session() as s:
                trust_store.set_tenant_ca(s, "demo", trust.ca_pem, pki.load_cert(trust.root_pem))
        if not (opts.signing_service or opts.delta):
            await api.call("POST", "/signers", json={"name": "release", **trust.signer_body(pub)})
        image = random.Random(42).randbytes(opts.image_size)
        base: bytes | None = None
        if opts.delta:  # the fleet runs release 1.0; 2.0 is a small change of it
            base, image = image, demo_report.small_change(image)
            await api.call("POST", "/payloads", content=base, params={"name": "demo-firmware-1.0.bin"})
        sha = hashlib.sha256(image).hexdigest()
        await api.call(
            "POST",
            "/payloads",
            content=image,
            params={"name": "demo-firmware-2.0.bin"},
            headers={"content-type": "application/octet-stream"},
        )
        vendor = mf.vendor_id_for_domain("demo.fwcm.example")
        klass = mf.class_id_for(vendor, "sensor-v1")
        info = mf.ManifestInfo(
            sequence=2,
            vendor_id=vendor,
            class_id=klass,
            image_digest=bytes.fromhex(sha),
            image_size=len(image),
            uris=(f"{settings.public_http_url}/p/{sha}", f"{settings.public_coap_url}/p/{sha}"),
        )
        signing_flow: dict[str, Any] | None = None
        if opts.signing_service or opts.delta:  # a delta is signed by the release's held key
            url = settings.public_http_url
            signed = await demo_signing.signed_release(api, lambda k: Api(url, k), settings, workdir, info)
            man = signed["manifest"]
            trust = Trust(root_pem=signed["root_pem"])  # devices check the chain to the root
            if opts.signing_service:
                signing_flow = signed["flow"]
                console.log(f"release signed inside SoftHSM2 after approval by {signing_flow['approved_by']}")
        else:
            envelope = mf.build_envelope(info, signing_key, x5chain=trust.x5chain)
            man = await api.call(
                "POST", "/manifests", content=envelope, headers={"content-type": "application/cbor"}
            )

        attest_keys = [
            mf.generate_private_key("es256") if opts.attestation else None for _ in range(opts.devices)
        ]
        rows = ["name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret,attest_key"]
        for i in range(opts.devices):
            region = "eu" if i % 2 == 0 else "us"
            ak = attest_keys[i]
            rows.append(
                f"dev-{i:05d},{vendor},{klass},region={region},1,1.0.0,{_transport_for(i, opts)},"
                f"hw-{i:05d},,{spki_b64(ak) if ak is not None else ''}"
            )
        imported = await api.call(
            "POST", "/devices/import", content="\n".join(rows) + "\n", headers={"content-type": "text/csv"}
        )
        registered = {d["name"]: d for d in imported["devices"]}
        console.log(f"registered {imported['imported']} devices; manifest {man['digest'][:16]}… signed")

        body = {**definition, "manifest_id": man["id"], "attestation": opts.attestation}
        if opts.delta:
            body["policy"] = {**body.get("policy", {}), "delta": True}
        if opts.consent:
            pro = await _pro_variant(api, info, image, signing_key, trust.x5chain)
            body["consent"] = {
                "deadline": "6s",
                "quorum": "50%",
                "options": {"variant": ["basic", "pro"]},
                "variant_option": "variant",
                "variants": {"basic": man["id"], "pro": pro},
                "accounting_every": "1s",
                "max_uses": 3,
            }
            console.log("consent campaign: basic and pro variants, quorum 50% within 6 s, 3 uses each")
        server_refused = None
        if opts.faults == "dev-build":
            campaign = await api.call("POST", "/campaigns", json=body)
            try:
                await api.call("POST", f"/campaigns/{campaign['id']}/start")
            except RuntimeError as exc:
                server_refused = str(exc)
                console.log(f"server refused to offer the developer build to unlisted devices: {exc}")
            listed = ", ".join(f'"{h}"' for h in trust.hardware_ids or ())
            body["filter"] = f"hardware_id in [{listed}]"
        campaign = await api.call("POST", "/campaigns", json=body)
        cid = campaign["id"]

        configs = [
            DeviceConfig(
                name=f"dev-{i:05d}",
                tenant="demo",
                secret=bytes.fromhex(registered[f"dev-{i:05d}"]["secret"]),
                vendor_id=vendor,
                class_id=klass,
                transport=_transport_for(i, opts),  # type: ignore[arg-type]
                trust_anchors=[pub],
                state_dir=workdir / "devices",
                mqtt_url=broker.url,
                mqtt_username=registered[f"dev-{i:05d}"]["mqtt_username"],
                mqtt_password=registered[f"dev-{i:05d}"]["mqtt_password"],
                coap_url=settings.public_coap_url,
                lwm2m_url=f"coap://{settings.lwm2m_host}:{settings.lwm2m_port}",
                installed_sequence=1,
                hardware_id=f"hw-{i:05d}",
                trust_root=trust.root_pem,
                attest_key=mf.private_key_pem(attest_keys[i]) if attest_keys[i] is not None else None,  # type: ignore[arg-type]
                index=i,
                base_image=base if i % DELTA_UNKNOWN_EVERY else None,
            )
            for i in range(opts.devices)
        ]
        stop = asyncio.Event()
        fleet = asyncio.create_task(
            run_fleet(
                configs,
                profile,
                until=lambda _r: stop.is_set(),
                timeout=None if opts.console else opts.timeout,
            )
        )
        await asyncio.sleep(0.5)  # let devices connect: the retained notices would reach them anyway
        if opts.delta:  # patches are made for the images devices said they run
            await _until_all_said_what_they_run(api, opts.devices)
        await api.call("POST", f"/campaigns/{cid}/start")
        t0 = time.monotonic()
        if opts.console:
            await _hold_for_console(settings.public_http_url, key, cid, console, stop, fleet)
        if opts.faults == "revoked":
            await _revoke_when_running(api, cid, console)

        stats = await _watch(api, cid, opts, console, as_json, t0)
        duration = time.monotonic() - t0
        accounting: dict[str, Any] | None = None
        if opts.consent:
            accounting = await _await_accounting(api, cid, stats)
        stop.set()
        installed: dict[str, int] = {}
        credentials = 0
        device_results: Counter[str] = Counter()
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            report = await asyncio.wait_for(fleet, 30)
            installed = {name: st.installed_sequence for name, st in report.devices.items()}
            credentials = sum(st.credentials for st in report.devices.values())
            device_results = Counter(
                st.results[cid].name.lower() for st in report.devices.values() if cid in st.results
            )
        devices = await _all_deployments(api, cid)
        result = demo_report.summarize(
            opts, profile, stats, devices, installed, duration, time.monotonic() - started
        )
        if opts.attestation:
            result["attestation"] = True
            result["credentials"] = credentials
            if credentials != result["succeeded"]:
                result["ok"] = False
        result["device_results"] = dict(sorted(device_results.items()))
        if opts.consent:
            demo_report.consent_summary(result, stats, devices, profile, accounting or {})
        if opts.delta:
            demo_report.delta_summary(result, stats, opts.devices)
        if signing_flow is not None:
            result["signing_service"] = signing_flow
            result["ok"] = result["ok"] and signing_flow["ok"] and result["succeeded"] == opts.devices
        if server_refused is not None:
            result["server_refused"] = server_refused
            result["not_targeted"] = opts.devices - len(devices)
        return result
    finally:
        if api is not None:
            await api.close()
        if server is not None:
            await server.stop()
        await asyncio.to_thread(broker.stop)
        shutil.rmtree(workdir, ignore_errors=True)


async def _until_all_said_what_they_run(api: Api, devices: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = await api.call("GET", "/devices", params={"limit": 1000})
        if sum(1 for d in page["items"] if d["image_digest"]) >= min(devices, 1000):
            return
        await asyncio.sleep(0.2)


async def _hold_for_console(
    base: str, key: str, cid: int, console: Console, stop: asyncio.Event, fleet: asyncio.Task[Any]
) -> None:
    """``--console``: say where to look and with which key, then keep everything running until
    Ctrl-C (the caller's cleanup stops the server and the broker)."""
    console.print(f"\nconsole: [bold]{base}/ui/campaigns/{cid}[/bold]")
    console.print(f"sign in with the API key: [bold]{key}[/bold]")
    console.print("the campaign runs slowly; Ctrl-C stops the fleet, the server and the broker\n")
    try:
        await asyncio.Event().wait()
    finally:
        stop.set()
        fleet.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(fleet, 10)


async def _pro_variant(api: Api, info: Any, image: bytes, key: Any, x5chain: list[bytes] | None) -> int:
    """The consent demo's second variant: another image under the same rules."""
    from dataclasses import replace

    from fwcm import manifest as mf

    pro = image[::-1]
    sha = hashlib.sha256(pro).hexdigest()
    await api.call("POST", "/payloads", content=pro, params={"name": "demo-firmware-2.0-pro.bin"})
    uris = tuple(u.replace(hashlib.sha256(image).hexdigest(), sha) for u in info.uris)
    envelope = mf.build_envelope(
        replace(info, image_digest=bytes.fromhex(sha), uris=uris), key, x5chain=x5chain
    )
    man = await api.call("POST", "/manifests", content=envelope, headers={"content-type": "application/cbor"})
    return int(man["id"])


async def _await_accounting(
    api: Api, cid: int, stats: dict[str, Any], timeout: float = 20.0
) -> dict[str, Any]:
    """Wait until every installed copy has used up its 3 uses and reported its removal."""
    installed = stats["counts"].get("succeeded", 0)
    deadline = time.monotonic() + timeout
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        report = await api.call("GET", f"/campaigns/{cid}/accounting")
        if report["removed"] >= installed:
            break
        await asyncio.sleep(0.5)
    return report


async def _revoke_when_running(api: Api, cid: int, console: Console) -> None:
    """The ``revoked`` scenario: the release signer is revoked while devices are updating."""
    for _ in range(200):
        stats = await api.call("GET", f"/campaigns/{cid}/stats")
        if stats["counts"].get("notified", 0) or stats["counts"].get("downloading", 0):
            break
        await asyncio.sleep(0.02)
    await api.call("POST", "/signers/release/revoke")
    console.log("signer 'release' revoked while the campaign runs")


async def _watch(
    api: Api, cid: int, opts: DemoOptions, console: Console, as_json: bool, t0: float
) -> dict[str, Any]:
    """Poll the campaign until it has ended and no device is still in flight."""
    deadline = t0 + opts.timeout
    stats: dict[str, Any] = {}
    live = Live(console=console, refresh_per_second=4, transient=False) if not as_json else None
    with live or contextlib.nullcontext():
        while time.monotonic() < deadline:
            stats = await api.call("GET", f"/campaigns/{cid}/stats")
            if live is not None:
                live.update(_progress_table(stats, opts.devices, time.monotonic() - t0))
            counts = stats["counts"]
            in_flight = sum(
                counts.get(st, 0) for st in ("notified", "downloading", "downloaded", "installing")
            )
            if stats["state"] in ("completed", "cancelled", "stopped") and in_flight == 0:
                break
            await asyncio.sleep(0.25)
    if live is not None:
        console.print()  # end the live table's line before the summary
    return stats


async def _all_deployments(api: Api, cid: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = await api.call("GET", f"/campaigns/{cid}/devices", params={"limit": 1000, "offset": len(out)})
        out.extend(page["items"])
        if not page["items"] or len(out) >= page["total"]:
            return out


def demo(
    devices: Annotated[int, typer.Option(min=1, help="Number of simulated devices")] = 100,
    transport: Annotated[str, typer.Option(help="mqtt | coap | lwm2m | mixed (the three in turn)")] = "mixed",
    faults: Annotated[
        str,
        typer.Option(
            help="Fault profile: none | flaky | corrupt | install-fail | out-of-memory | boot-fail | "
            "offline | slow | rogue | revoked | dev-build"
        ),
    ] = "none",
    campaign: Annotated[
        Path | None, typer.Option(help="Campaign definition (TOML), e.g. campaigns/staged.toml")
    ] = None,
    image_size: Annotated[int, typer.Option(help="Firmware image size in bytes")] = 64 * 1024,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 600.0,
    attestation: Annotated[
        bool, typer.Option("--attestation", help="Devices attest before install (certificate chain, tokens)")
    ] = False,
    consent: Annotated[
        bool,
        typer.Option("--consent", help="Consent campaign: invitations, quorum, variants, accounting, 3 uses"),
    ] = False,
    signing_service: Annotated[
        bool,
        typer.Option(
            "--signing-service",
            help="The server signs the release in a throw-away SoftHSM2 token once a second key approves",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line")] = False,
    with_console: Annotated[
        bool,
        typer.Option(
            "--console",
            help="Leave a slow phased campaign running and print the operator console's URL and a key; "
            "Ctrl-C stops",
        ),
    ] = False,
    delta: Annotated[
        bool,
        typer.Option(
            "--delta",
            help="The fleet runs release 1.0 and the server sends 2.0 as patches it makes (signed by the "
            "release's held key); a tenth of the devices run other images and get the full image",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log at INFO")] = False,
) -> None:
    """Run a whole campaign on embedded defaults with a simulated fleet; exit 0 iff every device ended as
    its fault profile says."""
    if transport not in ("mqtt", "coap", "lwm2m", "mixed"):
        raise typer.BadParameter("transport must be mqtt, coap, lwm2m or mixed")
    from device_sim.faults import get_profile

    try:
        get_profile(faults)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    setup_logging(logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    console = Console(stderr=as_json)
    if faults == "rogue" and not attestation:
        raise typer.BadParameter("--faults rogue needs --attestation (rogue devices forge attestations)")
    if signing_service and (consent or faults != "none"):
        raise typer.BadParameter("--signing-service runs with --faults none and without --consent")
    if delta and (consent or attestation):
        raise typer.BadParameter("--delta runs without --consent and --attestation (they get full images)")
    opts = DemoOptions(
        devices,
        transport,
        faults,
        campaign,
        image_size,
        timeout,
        attestation,
        consent,
        signing_service,
        console=with_console,
        delta=delta,
    )
    if transport == "lwm2m" and (why := lwm2m_unsuited(opts)) is not None:
        raise typer.BadParameter(f"--transport lwm2m: {why}")
    tune_gc()
    try:
        result = asyncio.run(_run(opts, console, as_json))
    except KeyboardInterrupt:
        if not with_console:
            raise
        console.print("stopped")
        raise typer.Exit(0) from None
    except (RuntimeError, OSError, ConnectionError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        console.print(demo_report.summary_table(result))
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        console.print(demo_report.summary_table(result))
    raise typer.Exit(0 if result["ok"] else 1)
