"""``python -m device_sim fleet ...``: register simulated devices through the API and run them."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fwcm.runtime import setup_logging, tune_gc

from .faults import PROFILES, get_profile
from .fleet import FleetReport, FleetSpec, all_finished, build_configs, register_devices, run_fleet

log = logging.getLogger("device_sim")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device_sim", description="Simulated firmware-update devices.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fleet", help="register N devices through the fwcm API and run them")
    f.add_argument("--devices", type=int, default=100, help="number of devices (default 100)")
    f.add_argument("--transport", choices=["mqtt", "coap", "mixed"], default="mixed")
    f.add_argument("--faults", default="none", choices=sorted(PROFILES), help="fault profile")
    f.add_argument("--url", default="http://127.0.0.1:8080", help="fwcm server base URL")
    f.add_argument("--api-key", default="", help="tenant API key (to register the devices)")
    f.add_argument("--mqtt", default="mqtt://127.0.0.1:1883", help="broker URL (mqtt:// or mqtts://)")
    f.add_argument("--mqtt-ca", type=Path, default=None, help="CA file for mqtts://")
    f.add_argument("--coap", default="coap://127.0.0.1:5683", help="CoAP server URL")
    f.add_argument(
        "--trust", type=Path, action="append", required=True, help="trusted signer public key (PEM)"
    )
    f.add_argument("--vendor-id", type=uuid.UUID, required=True)
    f.add_argument("--class-id", type=uuid.UUID, required=True)
    f.add_argument("--state-dir", type=Path, required=True, help="where device flash and state live")
    f.add_argument("--prefix", default="sim", help="device name prefix (default sim)")
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


async def _fleet(args: argparse.Namespace, console: Console) -> int:
    profile = get_profile(args.faults)
    spec_path: Path = args.state_dir / "fleet.json"
    spec: FleetSpec | None = None
    if spec_path.exists():
        spec = FleetSpec.load(spec_path)
        if len(spec.devices) != args.devices or not spec.devices[0]["name"].startswith(args.prefix + "-"):
            raise SystemExit(f"{spec_path} describes a different fleet; use another --state-dir")
        log.info("reusing %d registered devices from %s", len(spec.devices), spec_path)
    else:
        if not args.api_key:
            raise SystemExit("--api-key is required to register devices")
        spec = await register_devices(
            args.url,
            args.api_key,
            count=args.devices,
            transport=args.transport,
            vendor_id=args.vendor_id,
            class_id=args.class_id,
            prefix=args.prefix,
            sequence=args.sequence,
        )
        spec.save(spec_path)
        log.info("registered %d devices for tenant %s", len(spec.devices), spec.tenant)
    trust = [p.read_bytes() for p in args.trust]
    configs = build_configs(
        spec,
        vendor_id=args.vendor_id,
        class_id=args.class_id,
        trust_anchors=trust,
        state_dir=args.state_dir,
        mqtt_url=args.mqtt,
        coap_url=args.coap,
        mqtt_ca_file=args.mqtt_ca,
    )
    until = None if args.keep_running else all_finished(args.campaign)
    title = f"{len(configs)} devices · {args.transport} · faults: {profile.name}"
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
    except (RuntimeError, OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
