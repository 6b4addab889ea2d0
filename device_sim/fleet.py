"""Run many simulated devices in one process, all on one event loop.

``run_fleet`` starts one agent task per device (sharing one CoAP context and one HTTP client),
applies a fault profile by device index, and returns a ``FleetReport`` that says how every device
ended and whether that is what the profile predicts.  ``register_devices`` creates the devices
through the management API's CSV import; ``imported_devices`` runs devices someone imported
already, from the secrets file ``fwcm device import --secrets-out`` wrote.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import resource
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fwcm.devices import CSV_COLUMNS
from fwcm.protocol import LwState, Report, Result

from .agent import AgentStatus, DeviceAgent, DeviceConfig
from .faults import FaultProfile
from .lwm2m import Lwm2mAgent
from .transports import SharedClients

log = logging.getLogger(__name__)


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard limit (thousands of sockets); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    return soft


@dataclass
class FleetReport:
    """How the devices of a fleet run ended, by device name."""

    profile: FaultProfile
    devices: dict[str, AgentStatus] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    duration_s: float = 0.0
    reports: int = 0

    def result(self, name: str, campaign: int | None = None) -> Result | None:
        """Final result for ``campaign`` (or the latest campaign the device finished)."""
        results = self.devices[name].results
        if campaign is not None:
            return results.get(campaign)
        return results[max(results)] if results else None

    def _done(self, name: str, campaign: int | None) -> bool:
        """The device ended an attempt and had every report acknowledged."""
        return self.devices[name].pending_reports == 0 and self.result(name, campaign) is not None

    def finished(self, campaign: int | None = None) -> int:
        """Devices that ended an attempt and had every report acknowledged."""
        return sum(1 for n in self.devices if self._done(n, campaign))

    def all_finished(self, campaign: int | None = None) -> bool:
        """Every device finished: asked four times a second, so it stops at the first that has not
        (counting them all cost a tenth of a fleet's CPU at 12,500 devices)."""
        return all(self._done(n, campaign) for n in self.devices)

    def by_state(self, campaign: int | None = None) -> dict[str, int]:
        """Counts per label: "succeeded", "failed:<RESULT>", or the LwM2M state of unfinished ones."""
        counts: Counter[str] = Counter()
        for name, st in self.devices.items():
            result = self.result(name, campaign)
            if result == Result.SUCCESS:
                counts["succeeded"] += 1
            elif result == Result.REVERTED:
                counts["reverted"] += 1
            elif result is not None:
                counts[f"failed:{result.name}"] += 1
            elif not st.connected and st.connects == 0:
                counts["offline"] += 1
            else:
                counts[st.state.name.lower()] += 1
        return dict(sorted(counts.items()))

    def unexpected(self, campaign: int | None = None) -> list[str]:
        """Devices whose final result differs from what the fault profile predicts."""
        return [
            name
            for name, st in self.devices.items()
            if self.result(name, campaign) != self.profile.expected_result(st.index)
        ]

    def succeeded(self, campaign: int | None = None) -> int:
        return sum(1 for n in self.devices if self.result(n, campaign) == Result.SUCCESS)

    def as_dict(self, campaign: int | None = None) -> dict[str, Any]:
        finished = self.finished(campaign)
        succeeded = self.succeeded(campaign)
        reverted = sum(1 for n in self.devices if self.result(n, campaign) == Result.REVERTED)
        return {
            "devices": len(self.devices),
            "profile": self.profile.name,
            "finished": finished,
            "succeeded": succeeded,
            "failed": finished - succeeded - reverted,
            "reverted": reverted,
            "by_state": self.by_state(campaign),
            "unexpected": self.unexpected(campaign),
            "reports": self.reports,
            "duration_s": round(self.duration_s, 2),
        }


Until = Callable[[FleetReport], bool]


def all_finished(campaign: int | None = None) -> Until:
    """Stop condition: every device has ended an update attempt (of ``campaign``, if given)."""
    return lambda report: report.all_finished(campaign)


async def run_fleet(
    configs: list[DeviceConfig],
    profile: FaultProfile,
    *,
    until: Until | None = None,
    timeout: float | None = None,
    on_report: Callable[[DeviceAgent, Report], None] | None = None,
    on_tick: Callable[[FleetReport], None] | None = None,
    connect_rate: float = 2000.0,
    coap_transports: list[str] | None = None,
) -> FleetReport:
    """Run every device until ``until(report)`` holds, ``timeout`` passes, or the task is cancelled.

    Devices start ``1/connect_rate`` seconds apart so thousands of them do not hit the broker in
    the same instant.
    """
    raise_nofile_limit()
    # asyncio resolves host names in the default executor; its few default threads would let only
    # a handful of thousands of devices (re)connect at a time to a broker named by host name.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=64))
    clients = SharedClients(coap_transports=coap_transports)
    report = FleetReport(profile)

    def listener(agent: DeviceAgent, r: Report) -> None:
        report.reports += 1
        if on_report is not None:
            on_report(agent, r)

    agents: list[DeviceAgent | Lwm2mAgent] = []
    for i, cfg in enumerate(configs):
        faults = profile.for_device(cfg.index)
        agent: DeviceAgent | Lwm2mAgent
        if cfg.transport == "lwm2m":  # speaks LwM2M, not fwcm's reports: no listener
            agent = Lwm2mAgent(cfg, clients, faults=faults, start_delay=i / connect_rate)
        else:
            agent = DeviceAgent(cfg, clients, faults=faults, listener=listener, start_delay=i / connect_rate)
        agents.append(agent)
        report.devices[cfg.name] = agent.status
    log.info("starting %d devices (faults: %s)", len(agents), profile.name)
    tasks = [asyncio.create_task(a.run(), name=f"device-{a.name}") for a in agents]
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            report.duration_s = time.monotonic() - report.started
            if on_tick is not None:
                on_tick(report)
            if until is not None and until(report):
                break
            if deadline is not None and time.monotonic() >= deadline:
                log.info("fleet run reached its time limit")
                break
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.25)
    finally:
        for a in agents:
            a.stop()
        _done, pending = await asyncio.wait(tasks, timeout=15) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await clients.aclose()
        report.duration_s = time.monotonic() - report.started
    for t, res in zip(tasks, results, strict=True):
        if isinstance(res, Exception):
            log.error("device task %s failed", t.get_name(), exc_info=res)
    return report


# -- registration through the management API --------------------------------------------------


def device_names(prefix: str, count: int) -> list[str]:
    """The names a fleet registers its devices under."""
    return [f"{prefix}-{i:05d}" for i in range(count)]


@dataclass
class FleetSpec:
    """What ``python -m device_sim fleet`` needs to (re)build the device configs."""

    tenant: str
    devices: list[dict[str, Any]]
    """name, secret (hex), mqtt_username, mqtt_password, transport, index, sequence; and, for
    imported devices, vendor_id, class_id and hardware_id as the server has them"""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tenant": self.tenant, "devices": self.devices}, indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> FleetSpec:
        data = json.loads(path.read_text())
        return cls(tenant=str(data["tenant"]), devices=list(data["devices"]))


CSV_HEADER = list(CSV_COLUMNS)


def transport_for(index: int, mode: str) -> str:
    if mode == "mixed":
        return "mqtt" if index % 2 == 0 else "coap"
    if mode not in ("mqtt", "coap", "lwm2m"):
        raise ValueError(f"transport must be mqtt, coap, lwm2m or mixed, got {mode!r}")
    return mode


def devices_csv(
    names: list[str], transports: list[str], vendor_id: uuid.UUID, class_id: uuid.UUID, sequence: int
) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        ["name", "vendor_id", "class_id", "tags", "sequence", "version", "transport", "hardware_id", "secret"]
    )
    for i, (name, transport) in enumerate(zip(names, transports, strict=True)):
        tags = f"sim=1;transport={transport};group={i % 10}"
        w.writerow(
            [name, vendor_id, class_id, tags, sequence, f"1.0.{sequence}", transport, f"hw-{name}", ""]
        )
    return out.getvalue()


async def register_devices(
    api_url: str,
    api_key: str,
    *,
    count: int,
    transport: str,
    vendor_id: uuid.UUID,
    class_id: uuid.UUID,
    prefix: str = "sim",
    sequence: int = 1,
) -> FleetSpec:
    """Create ``count`` devices with the CSV import; the server generates their secrets and returns
    them with the devices' MQTT credentials."""
    names = device_names(prefix, count)
    transports = [transport_for(i, transport) for i in range(count)]
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=api_url.rstrip("/"), headers=headers, timeout=120) as client:
        r = await client.get("/api/v1/tenant")
        _raise_for(r, "reading the tenant")
        tenant = str(r.json()["slug"])
        body = devices_csv(names, transports, vendor_id, class_id, sequence)
        r = await client.post("/api/v1/devices/import", content=body, headers={"Content-Type": "text/csv"})
        _raise_for(r, "importing devices")
        imported = {d["name"]: d for d in r.json()["devices"]}
    missing = [n for n in names if n not in imported]
    if missing:
        raise RuntimeError(f"import did not return secrets for {len(missing)} devices (e.g. {missing[0]})")
    return FleetSpec(
        tenant,
        [
            {
                "name": n,
                "secret": imported[n]["secret"],
                "mqtt_username": imported[n]["mqtt_username"],
                "mqtt_password": imported[n]["mqtt_password"],
                "transport": t,
                "index": i,
                "sequence": sequence,
            }
            for i, (n, t) in enumerate(zip(names, transports, strict=True))
        ],
    )


SECRETS_COLUMNS = ("name", "secret", "mqtt_username", "mqtt_password")
"""The header of the file ``fwcm device import --secrets-out`` writes."""
LIST_PAGE = 1000


def read_secrets(path: Path) -> list[dict[str, str]]:
    """The rows of a secrets file, checked: every column present, secrets in hex, names unique."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SECRETS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(missing)} (header: {','.join(SECRETS_COLUMNS)})")
        rows: list[dict[str, str]] = []
        seen: set[str] = set()
        for row in reader:
            line = reader.line_num
            name, secret = (row["name"] or "").strip(), (row["secret"] or "").strip()
            if not name:
                continue
            try:
                bytes.fromhex(secret)
            except ValueError:
                raise ValueError(f"{path} line {line}: the secret of {name} is not hex") from None
            if name in seen:
                raise ValueError(f"{path} line {line}: {name} appears twice")
            seen.add(name)
            rows.append({c: (row[c] or "").strip() for c in SECRETS_COLUMNS})
    if not rows:
        raise ValueError(f"{path} names no device")
    return rows


async def imported_devices(api_url: str, api_key: str, secrets: list[dict[str, str]]) -> FleetSpec:
    """The devices of an earlier import: secrets and broker accounts from its secrets file, the rest
    (vendor, class, transport, sequence, hardware id) as the server has them now."""
    wanted = {row["name"] for row in secrets}
    found: dict[str, dict[str, Any]] = {}
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=api_url.rstrip("/"), headers=headers, timeout=120) as client:
        r = await client.get("/api/v1/tenant")
        _raise_for(r, "reading the tenant")
        tenant = str(r.json()["slug"])
        offset = 0
        while len(found) < len(wanted):
            r = await client.get("/api/v1/devices", params={"limit": LIST_PAGE, "offset": offset})
            _raise_for(r, "listing devices")
            items = r.json()["items"]
            found.update((d["name"], d) for d in items if d["name"] in wanted)
            offset += len(items)
            if len(items) < LIST_PAGE:
                break
    missing = [row["name"] for row in secrets if row["name"] not in found]
    if missing:
        raise RuntimeError(
            f"{len(missing)} devices of the secrets file are not devices of tenant {tenant} "
            f"(e.g. {missing[0]})"
        )
    return FleetSpec(
        tenant,
        [
            {
                **row,
                "transport": found[row["name"]]["transport"],
                "index": i,
                "sequence": found[row["name"]]["sequence"],
                "vendor_id": found[row["name"]]["vendor_id"],
                "class_id": found[row["name"]]["class_id"],
                "hardware_id": found[row["name"]]["hardware_id"],
            }
            for i, row in enumerate(secrets)
        ],
    )


def _raise_for(r: httpx.Response, what: str) -> None:
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise RuntimeError(f"{what} failed: HTTP {r.status_code}: {str(detail)[:300]}")


def build_configs(
    spec: FleetSpec,
    *,
    vendor_id: uuid.UUID | None,
    class_id: uuid.UUID | None,
    trust_anchors: list[bytes],
    state_dir: Path,
    mqtt_url: str,
    coap_url: str,
    mqtt_ca_file: Path | None = None,
    trust_root: bytes | None = None,
    base_image: bytes | None = None,
) -> list[DeviceConfig]:
    """One config per device; a device's own vendor, class and hardware id win over the defaults."""
    configs = []
    for d in spec.devices:
        vendor = uuid.UUID(d["vendor_id"]) if d.get("vendor_id") else vendor_id
        klass = uuid.UUID(d["class_id"]) if d.get("class_id") else class_id
        if vendor is None or klass is None:
            raise ValueError(f"no vendor or class id for device {d['name']}: give --vendor-id and --class-id")
        configs.append(
            DeviceConfig(
                name=d["name"],
                tenant=spec.tenant,
                secret=bytes.fromhex(d["secret"]),
                vendor_id=vendor,
                class_id=klass,
                transport="coap" if d["transport"] == "coap" else "mqtt",
                trust_anchors=trust_anchors,
                state_dir=state_dir,
                mqtt_url=mqtt_url,
                mqtt_ca_file=mqtt_ca_file,
                mqtt_username=d.get("mqtt_username") or None,
                mqtt_password=d.get("mqtt_password") or None,
                coap_url=coap_url,
                installed_sequence=int(d.get("sequence", 0)),
                hardware_id=d["hardware_id"] if "hardware_id" in d else f"hw-{d['name']}",
                index=int(d["index"]),
                trust_root=trust_root,
                base_image=base_image,
            )
        )
    return configs


def state_label(status: AgentStatus) -> str:
    """Short label of what a device is doing right now, for displays."""
    if status.results:
        r = status.results[max(status.results)]
        return "succeeded" if r == Result.SUCCESS else "reverted" if r == Result.REVERTED else "failed"
    if status.state == LwState.IDLE:
        return "online" if status.connected else "offline"
    return status.state.name.lower()
