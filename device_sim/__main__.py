"""``python -m device_sim fleet ...``: run simulated devices against an fwcm server.

The devices are either registered here through the API (``--devices N``), or the devices of an
earlier ``fwcm device import --secrets-out FILE`` (``--secrets FILE``).  Where to connect defaults
to what the ``fwcm`` client and server use: ``FWCM_URL``/``FWCM_API_KEY`` or ``fwcm login``'s config
file, the broker of ``FWCM_MQTT_URL`` (without the server's own credentials), and the CoAP address
of ``FWCM_PUBLIC_COAP_URL`` or ``FWCM_COAP_BIND``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fwcm.cli.client import ApiError, load_config
from fwcm.runtime import setup_logging, tune_gc

from .faults import PROFILES, get_profile
from .fleet import (
    FleetReport,
    FleetSpec,
    all_finished,
    build_configs,
    imported_devices,
    read_secrets,
    register_devices,
    run_fleet,
)

log = logging.getLogger("device_sim")


def device_mqtt_url() -> str:
    """The broker of ``FWCM_MQTT_URL`` without the server's credentials (devices log in with their
    own accounts), or Mosquitto's default address."""
    parts = urlsplit(os.environ.get("FWCM_MQTT_URL") or "mqtt://127.0.0.1:1883")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def device_coap_url() -> str:
    """``FWCM_PUBLIC_COAP_URL``, or the address of ``FWCM_COAP_BIND``, or the server's default."""
    public = os.environ.get("FWCM_PUBLIC_COAP_URL")
    if public:
        return public
    return f"coap://{os.environ.get('FWCM_COAP_BIND') or '127.0.0.1:5683'}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device_sim", description="Simulated firmware-update devices.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser(
        "fleet",
        help="run simulated devices: registered here, or imported earlier (--secrets)",
        description="Run simulated devices against an fwcm server: N devices registered here through "
        "the API (--devices), or the devices of an earlier `fwcm device import --secrets-out FILE` "
        "(--secrets FILE).",
    )
    f.add_argument(
        "--secrets",
        type=Path,
        default=None,
        metavar="FILE",
        help="run the devices of this secrets file (from `fwcm device import --secrets-out`) instead of "
        "registering new ones; their class, transport and sequence are read from the server",
    )
    f.add_argument("--devices", type=int, default=100, help="number of devices to register (default 100)")
    f.add_argument("--transport", choices=["mqtt", "coap", "mixed"], default="mixed")
    f.add_argument("--faults", default="none", choices=sorted(PROFILES), help="fault profile")
    f.add_argument("--url", default=None, help="fwcm server base URL (default: $FWCM_URL or fwcm login's)")
    f.add_argument("--api-key", default=None, help="tenant API key (default: $FWCM_API_KEY or fwcm login's)")
    f.add_argument(
        "--mqtt",
        default=None,
        help="broker URL, mqtt:// or mqtts:// (default: the broker of $FWCM_MQTT_URL, else mqtt://127.0.0.1:1883)",
    )
    f.add_argument("--mqtt-ca", type=Path, default=None, help="CA file for mqtts://")
    f.add_argument(
        "--coap",
        default=None,
        help="CoAP server URL (default: $FWCM_PUBLIC_COAP_URL, else coap://$FWCM_COAP_BIND, else port 5683)",
    )
    f.add_argument("--trust", type=Path, action="append", default=[], help="trusted signer public key (PEM)")
    f.add_argument(
        "--trust-root",
        type=Path,
        default=None,
        help="operator root CA (PEM): manifests must carry a certificate chain that leads to it",
    )
    f.add_argument(
        "--base-image",
        type=Path,
        default=None,
        help="the image every device runs at start (a shared release that delta updates patch from)",
    )
    f.add_argument("--vendor-id", type=uuid.UUID, default=None, help="vendor of registered devices")
    f.add_argument("--class-id", type=uuid.UUID, default=None, help="class of registered devices")
    f.add_argument(
        "--state-dir",
        type=Path,
        default=Path("fleet-state"),
        help="where device flash and state live (default ./fleet-state)",
    )
    f.add_argument("--prefix", default="sim", help="name prefix of registered devices (default sim)")
    f.add_argument("--sequence", type=int, default=1, help="installed sequence number at start (default 1)")
    f.add_argument("--campaign", type=int, default=None, help="stop when every device finished this campaign")
    f.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    f.add_argument("--keep-running", action="store_true", help="do not stop when every device finished")
    f.add_argument("--json", action="store_true", help="print the final report as one JSON line")
    f.add_argument("--no-progress", action="store_true", help="no live display")
    f.add_argument("-v", "--verbose", action="count", default=0)
    sub.add_parser("faults", help="list the fault profiles")
    return p


def _table(report: FleetReport, title: str) -> Table:
    table = Table(title=title)
    table.add_column("state")
    table.add_column("devices", justify="right")
    for label, n in report.by_state().items():
        table.add_row(label, str(n))
    table.caption = f"{report.finished()}/{len(report.devices)} finished · {report.duration_s:.1f} s"
    return table


async def _registered(args: argparse.Namespace, url: str, api_key: str | None) -> FleetSpec:
    """The fleet registered in an earlier run with this state dir, or ``--devices`` new devices."""
    spec_path: Path = args.state_dir / "fleet.json"
    if spec_path.exists():
        spec = FleetSpec.load(spec_path)
        if len(spec.devices) != args.devices or not spec.devices[0]["name"].startswith(args.prefix + "-"):
            raise SystemExit(f"{spec_path} describes a different fleet; use another --state-dir")
        log.info("reusing %d registered devices from %s", len(spec.devices), spec_path)
        return spec
    if not api_key:
        raise SystemExit("an API key is required to register devices (--api-key, FWCM_API_KEY or fwcm login)")
    if args.vendor_id is None or args.class_id is None:
        raise SystemExit("--vendor-id and --class-id are required to register devices")
    spec = await register_devices(
        url,
        api_key,
        count=args.devices,
        transport=args.transport,
        vendor_id=args.vendor_id,
        class_id=args.class_id,
        prefix=args.prefix,
        sequence=args.sequence,
    )
    spec.save(spec_path)
    log.info("registered %d devices for tenant %s", len(spec.devices), spec.tenant)
    return spec


async def _fleet(args: argparse.Namespace, console: Console) -> int:
    profile = get_profile(args.faults)
    client = load_config()
    url = args.url or client.url
    api_key = args.api_key or client.api_key
    if args.secrets is not None:
        if not api_key:
            raise SystemExit(
                "an API key is required to look up the devices (--api-key, FWCM_API_KEY or fwcm login)"
            )
        spec = await imported_devices(url, api_key, read_secrets(args.secrets))
        log.info("running %d imported devices of tenant %s", len(spec.devices), spec.tenant)
    else:
        spec = await _registered(args, url, api_key)
    trust = [p.read_bytes() for p in args.trust]
    if not trust and args.trust_root is None:
        raise SystemExit("give --trust (a signer's public key) or --trust-root (the operator root CA)")
    configs = build_configs(
        spec,
        vendor_id=args.vendor_id,
        class_id=args.class_id,
        trust_anchors=trust,
        state_dir=args.state_dir,
        mqtt_url=args.mqtt or device_mqtt_url(),
        coap_url=args.coap or device_coap_url(),
        mqtt_ca_file=args.mqtt_ca,
        trust_root=args.trust_root.read_bytes() if args.trust_root else None,
        base_image=args.base_image.read_bytes() if args.base_image else None,
    )
    until = None if args.keep_running else all_finished(args.campaign)
    transports = "imported" if args.secrets is not None else args.transport
    title = f"{len(configs)} devices · {transports} · faults: {profile.name}"
    if args.no_progress or args.json:
        report = await run_fleet(configs, profile, until=until, timeout=args.duration)
    else:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            report = await run_fleet(
                configs,
                profile,
                until=until,
                timeout=args.duration,
                on_tick=lambda r: live.update(_table(r, title)),
            )
            live.update(_table(report, title))
    summary = report.as_dict(args.campaign)
    unexpected = summary["unexpected"]
    if args.json:
        print(json.dumps(summary))
    else:
        console.print(
            f"{summary['succeeded']} succeeded, {summary['failed']} failed, "
            f"{len(unexpected)} not as the '{profile.name}' profile expects"
        )
    return 0 if not unexpected else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    level = logging.WARNING - 10 * getattr(args, "verbose", 0)
    setup_logging(max(level, logging.DEBUG))
    if args.command == "faults":
        for p in PROFILES.values():
            print(f"{p.name:14} {p.description}")
        return 0
    tune_gc()
    try:
        return asyncio.run(_fleet(args, console))
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, OSError, ValueError, ApiError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
