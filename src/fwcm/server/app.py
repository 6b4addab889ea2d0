"""Composition of one server replica: the management API, the device-facing gateway, MQTT, CoAP,
LwM2M (when configured), ingest and engine on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from dataclasses import dataclass

import uvicorn
from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from fwcm.config import Settings
from fwcm.protocol import NoticeKind
from fwcm.rollout.states import CampaignState
from fwcm.server.accounts import AccountSync
from fwcm.server.engine import Engine
from fwcm.server.gateway import Gateway, PayloadCache, storage_guard
from fwcm.server.http import uvicorn_config
from fwcm.server.ingest import Credentials, Ingest
from fwcm.server.keys import KeyCache
from fwcm.server.metrics import CAMPAIGNS, REGISTRY
from fwcm.server.notices import Notifier
from fwcm.server.webhooks import WebhookWorker
from fwcm.store import attestations as aq
from fwcm.store import audit, tenants
from fwcm.store import deadletters as dl
from fwcm.store import device_state as ds
from fwcm.store.db import Database
from fwcm.store.models import Campaign
from fwcm.store.payloads import PayloadStore
from fwcm.transport.coap import CoapTransport
from fwcm.transport.lwm2m import Lwm2mTransport
from fwcm.transport.mqtt import MqttSettings, MqttTransport

log = logging.getLogger(__name__)


@dataclass
class Hooks:
    """Called by the API after a campaign or the set of devices changes, so the engine or the
    broker accounts act at once."""

    engine: Engine | None = None
    accounts: AccountSync | None = None
    keys: KeyCache | None = None
    notifier: Notifier | None = None
    webhooks: WebhookWorker | None = None

    def campaign_changed(self, campaign_id: int) -> None:
        if self.engine is not None:
            self.engine.wake()
        if self.webhooks is not None:
            self.webhooks.wake()

    def devices_changed(self) -> None:
        if self.accounts is not None:
            self.accounts.changed()

    def devices_withdrawn(self, tenant: str, names: list[str]) -> None:
        """Decommissioned or deleted: this replica refuses their messages at once (others when
        their key cache expires), their notices are withdrawn and their broker accounts go."""
        if self.keys is not None:
            self.keys.forget([(tenant, n) for n in names])
        if self.notifier is not None:
            for n in names:
                self.notifier.withdraw(tenant, n)
        self.devices_changed()


@dataclass
class Server:
    settings: Settings
    replica: str = ""
    """Stable across restarts (MQTT session and campaign leases are tied to it); default host-port."""
    enable_mqtt: bool = True
    enable_coap: bool = True
    enable_http: bool = True
    migrate: bool = True

    def __post_init__(self) -> None:
        self.replica = self.replica or f"{socket.gethostname()}-{self.settings.http_port}"
        self.settings.ensure_dirs()
        self.db = Database(self.settings.database_url)
        self.payloads = PayloadStore(self.settings.payload_dir)
        self.payload_cache = PayloadCache(self.payloads)
        self.notifier = Notifier()
        self.engine = Engine(self.db, self.notifier, self.replica)
        self.ingest = Ingest(self.db, on_attested=self._deliver_attested)
        self.engine.on_notified = self.ingest.keys.prime
        self.gateway = Gateway(self.db, self.notifier, self.ingest.keys, self.payload_cache)
        st = self.settings
        self.webhooks = WebhookWorker(
            self.db, self.replica, retry_s=st.webhook_retry_s, batch_s=st.webhook_batch_s
        )
        self.hooks = Hooks(self.engine, keys=self.ingest.keys, notifier=self.notifier, webhooks=self.webhooks)
        self.mqtt: MqttTransport | None = None
        self.coap: CoapTransport | None = None
        self.lwm2m: Lwm2mTransport | None = None
        self._http: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def create_api(self):  # type: ignore[no-untyped-def]
        from fwcm.api import create_app
        from fwcm.console import mount

        app = create_app(self.db, self.settings, hooks=self.hooks)
        mount(app, self.db, self.settings, self.hooks)  # the operator console under /ui

        @app.get("/metrics", include_in_schema=False)
        def prometheus() -> Response:
            """Prometheus exposition; campaign counts are read from the database at scrape time."""
            with self.db.read() as s:  # a scrape must never take the write lock
                rows = s.execute(select(Campaign.state, func.count()).group_by(Campaign.state)).all()
            found = dict(rows)
            for state in CampaignState:
                CAMPAIGNS.labels(state.value).set(found.get(state.value, 0))
            return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

        return self.gateway.http_front(app)

    async def start(self) -> None:
        """Start every part; if one fails, stop what had started and raise."""
        try:
            await self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.stop()
            raise

    async def _start(self) -> None:
        self._check_ports()
        if self.migrate:
            await asyncio.to_thread(self.db.migrate)
        await asyncio.to_thread(self.gateway.load_signing_keys)
        if self.settings.broker_accounts is not None:  # before MQTT: the accounts include ours
            self.hooks.accounts = AccountSync(
                self.db,
                self.settings.broker_accounts,
                self.settings.broker_service(),
                self.settings.broker_pid_file,
            )
            await self.hooks.accounts.start()
        if self.enable_mqtt:
            self.mqtt = MqttTransport(self.settings.mqtt_url, self._mqtt_client_id(), self.ingest.submit)
            await self.mqtt.start()
            self.notifier.senders["mqtt"] = self.mqtt
        if self.enable_coap:
            gw = self.gateway
            self.coap = CoapTransport(
                (self.settings.coap_host, self.settings.coap_port),
                self.ingest.submit,
                storage_guard(gw.current_notice),
                storage_guard(gw.coap_payload),
                storage_guard(gw.payload_refusal),
                authorize=storage_guard(gw.coap_authorized),
                observed=gw.coap_observed,
            )
            self.coap.addresses.update(await asyncio.to_thread(gw.load_coap_addresses))
            await self.coap.start()
            self.notifier.senders["coap"] = self.coap
        if self.settings.lwm2m_port:
            base = self.settings.lwm2m_package_url.rstrip("/")
            self.lwm2m = Lwm2mTransport(
                (self.settings.lwm2m_host, self.settings.lwm2m_port),
                self.ingest.submit,
                storage_guard(self.gateway.current_notice),
                storage_guard(self.gateway.lwm2m_admits),
                lambda digest: f"{base}/p/{digest.hex()}",
            )
            await self.lwm2m.start()
            self.notifier.senders["lwm2m"] = self.lwm2m
        if self.enable_http:
            config = uvicorn_config(self.create_api(), self.settings.http_host, self.settings.http_port)
            self._http = uvicorn.Server(config)
            self._tasks.append(asyncio.create_task(self._http.serve(), name="http"))
            while not self._http.started:
                if self._tasks[-1].done():
                    try:
                        self._tasks[-1].result()
                    except SystemExit:  # uvicorn's way of saying it could not listen
                        where = f"{self.settings.http_host}:{self.settings.http_port}"
                        raise RuntimeError(f"HTTP server could not listen on {where} (in use?)") from None
                await asyncio.sleep(0.02)
        self._tasks.append(asyncio.create_task(self.ingest.run(), name="ingest"))
        self._tasks.append(asyncio.create_task(self.engine.run(), name="engine"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        self._tasks.append(asyncio.create_task(self.webhooks.run(), name="webhooks"))
        if self.coap is not None:
            self._tasks.append(asyncio.create_task(self.gateway.save_coap_addresses(), name="coap-addresses"))
        log.info("server %s running", self.replica)

    def _check_ports(self) -> None:
        """Refuse to start before touching the broker if another process holds our ports: a second
        server started by mistake must not disturb the live one."""
        wanted = []
        if self.enable_http:
            wanted.append(("HTTP", socket.SOCK_STREAM, self.settings.http_host, self.settings.http_port))
        if self.enable_coap:
            wanted.append(("CoAP", socket.SOCK_DGRAM, self.settings.coap_host, self.settings.coap_port))
        if self.settings.lwm2m_port:
            wanted.append(("LwM2M", socket.SOCK_DGRAM, self.settings.lwm2m_host, self.settings.lwm2m_port))
        for what, kind, host, port in wanted:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, kind) as probe:
                if kind == socket.SOCK_STREAM:  # as a listener binds: a restart's TIME_WAIT is no conflict
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, port))
                except OSError as exc:
                    why = f"{what} port {host}:{port} is in use ({exc.strerror})"
                    raise RuntimeError(f"{why}; is another fwcm server running?") from None

    def _mqtt_client_id(self) -> str:
        """With MQTT 5 the session ends with the connection, so each process has a client id of its
        own: a second server can never take over the live one's connection. With MQTT 3.1.1 the
        session is persistent and the id stays the replica's, so a restart finds its queued reports."""
        base = f"fwcm-server-{self.replica}"
        if MqttSettings.from_url(self.settings.mqtt_url).version != 5:
            return base
        return f"{base}-{uuid.uuid4().hex[:8]}"

    async def stop(self) -> None:
        await self.ingest.drain(5)
        if self._http is not None:
            self._http.should_exit = True
        for t in self._tasks:
            if t.get_name() != "http":
                t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 10)
        if any(t.get_name() == "engine" for t in self._tasks):  # never a live replica's leases
            with contextlib.suppress(Exception):
                await self.engine.release()
        if any(t.get_name() == "webhooks" for t in self._tasks):
            with contextlib.suppress(Exception):
                await self.webhooks.release()
        if self.hooks.accounts is not None:
            await self.hooks.accounts.stop()
        if self.mqtt is not None:
            await self.mqtt.stop()
        if self.lwm2m is not None:
            await self.lwm2m.stop()
        if self.coap is not None:
            await self.coap.stop()
            if self.gateway.coap_seen:  # where devices observed from since the last save
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.gateway.store_coap_addresses, self.gateway.coap_seen)
        self.db.dispose()

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def _housekeeping(self) -> None:
        """Trim device history, dead letters, the audit log and revoked API keys now and then so
        they stay bounded."""
        while True:
            await asyncio.sleep(60)
            try:
                trimmed = await asyncio.to_thread(self._trim)
                if any(trimmed):
                    log.info(
                        "trimmed %d old device events, %d dead letters, %d audit entries, %d revoked keys",
                        *trimmed,
                    )
            except Exception:
                log.exception("history trim failed")

    def _trim(self) -> tuple[int, int, int, int]:
        with self.db.session() as s:
            return ds.trim_history(s), dl.trim(s), audit.trim(s), tenants.trim_revoked(s)

    def _deliver_attested(self, results: list[aq.AttestationResult], credentials: Credentials) -> None:
        """After ingest committed: install tokens (or refusals) and credentials go to the devices."""
        for r in results:
            if r.reason is None:
                self.notifier.send(r.target, r.campaign, NoticeKind.UPDATE, r.manifest_id)
            else:
                reason = f"attestation refused: {r.reason}"
                self.notifier.send(r.target, r.campaign, NoticeKind.CANCEL, r.manifest_id, reason=reason)
        for campaign, target, manifest_id in credentials:
            self.notifier.send(target, campaign, NoticeKind.CREDENTIAL, manifest_id)
