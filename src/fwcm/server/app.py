"""Composition of one server replica: REST API, MQTT, CoAP, ingest and engine on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, ParamSpec, TypeVar
from urllib.parse import parse_qsl

import uvicorn
from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.requests import ClientDisconnect

from fwcm import attestation, manifest, protocol
from fwcm.api.ranges import CHUNK, plan
from fwcm.config import Settings
from fwcm.protocol import NoticeKind
from fwcm.rollout import deployment
from fwcm.rollout.states import CampaignState
from fwcm.server.accounts import AccountSync
from fwcm.server.engine import Engine
from fwcm.server.http import uvicorn_config
from fwcm.server.ingest import Credentials, Ingest
from fwcm.server.metrics import CAMPAIGNS, REGISTRY, TOKENS_REFUSED
from fwcm.server.notices import Notifier
from fwcm.store import attestations as aq
from fwcm.store import deadletters as dl
from fwcm.store import deployments as dq
from fwcm.store import device_state as ds
from fwcm.store import leases as lq
from fwcm.store import notices as nq
from fwcm.store.db import Database
from fwcm.store.models import Campaign
from fwcm.store.payloads import PayloadStore, is_sha256
from fwcm.transport.coap import RETRY_AFTER_S, CoapTransport, Unavailable
from fwcm.transport.mqtt import MqttSettings, MqttTransport

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PROTECTED_REFRESH_S = 2.0
COAP_ADDRESS_SAVE_S = 1.0
STORAGE_ERRORS = (DBAPIError, PoolTimeout)
"""What a lost database connection raises: device resources answer "unavailable", not 5.00."""
A = ParamSpec("A")
R = TypeVar("R")


def storage_guard(fn: Callable[A, Awaitable[R]]) -> Callable[A, Awaitable[R]]:
    """``fn`` for a device-facing resource: a storage failure becomes :class:`Unavailable`, which
    CoAP answers 5.03 and HTTP 503, both with a time to retry after."""

    @functools.wraps(fn)
    async def guarded(*args: A.args, **kwargs: A.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except STORAGE_ERRORS as exc:
            raise Unavailable(str(exc).splitlines()[0][:200]) from None

    return guarded


"""How long the set of token-protected payloads is trusted before it is read again."""


class PayloadCache:
    """Recently served payloads kept in memory: a campaign sends the same image to every device,
    and CoAP asks for every block separately.  Images above ``max_item`` are not cached."""

    def __init__(self, store: PayloadStore, max_bytes: int = 64 * MiB, max_item: int = 8 * MiB) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.max_item = max_item
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    def peek(self, sha256: str) -> bytes | None:
        """The payload if it is in memory (no I/O: safe on the event loop)."""
        data = self._items.get(sha256)
        if data is not None:
            self._items.move_to_end(sha256)
        return data

    def get(self, sha256: str, *, cache_only: bool = False) -> bytes | None:
        """The payload, loaded from the store if needed; None if unknown (or too large and
        ``cache_only``)."""
        data = self.peek(sha256)
        if data is not None:
            return data
        if not self.store.exists(sha256):
            return None
        if self.store.size(sha256) > self.max_item:
            if cache_only:
                return None
            with self.store.open(sha256) as f:
                return f.read()
        with self.store.open(sha256) as f:
            data = f.read()
        self._items[sha256] = data
        self._size += len(data)
        while self._size > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._size -= len(old)
        return data

    def read(self, sha256: str, offset: int, size: int) -> tuple[bytes, int] | None:
        """``size`` bytes of a payload from ``offset``, and the payload's total size; None if
        unknown. An image too large to cache is read from disk, that slice only."""
        data = self.get(sha256, cache_only=True)
        if data is not None:
            return data[offset : offset + size], len(data)
        if not self.store.exists(sha256):
            return None
        with self.store.open(sha256) as f:
            f.seek(offset)
            return f.read(size), self.store.size(sha256)


RefusalFn = Callable[[str, dict[str, str], str], Awaitable[str | None]]
"""(sha256, query, transport) → why a payload fetch is refused, or None."""


class DevicePayloads:
    """ASGI front of the HTTP server: ``GET``/``HEAD /p/{sha256}`` answered from memory with
    Range and ETag, without the API's routing and thread pool (every device of a campaign asks for
    the same image); everything else, and images too large to cache, go to the API."""

    def __init__(self, app: Any, cache: PayloadCache, refusal: RefusalFn | None = None) -> None:
        self.app = app
        self.cache = cache
        self.refusal = refusal

    async def _forward(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """To the API.  A client gone mid-request (one whose body stopped is dropped after a
        while) has nobody to answer: not an error to log with a traceback."""
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            log.debug("client gone during %s %s", scope.get("method"), scope.get("path"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/p/") or scope["method"] not in ("GET", "HEAD"):
            return await self._forward(scope, receive, send)
        sha = path[3:].lower()
        if not is_sha256(sha):
            return await self._forward(scope, receive, send)
        if self.refusal is not None:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            try:
                refused = await self.refusal(sha, query, "http")
            except Unavailable:
                return await _unavailable(send)
            if refused is not None:
                body = f"install token refused: {refused}\n".encode()
                deny = [(b"content-type", b"text/plain"), (b"www-authenticate", b'Bearer realm="fwcm"')]
                await send({"type": "http.response.start", "status": 401, "headers": deny})
                await send({"type": "http.response.body", "body": body})
                return
        data = self.cache.peek(sha)
        if data is None:
            data = await asyncio.to_thread(self.cache.get, sha, cache_only=True)
        if data is None:
            return await self._forward(scope, receive, send)  # unknown (404) or streamed from disk
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        p = plan(headers, len(data), sha)
        raw = [(k.encode(), v.encode()) for k, v in p.headers.items()]
        raw.append((b"content-type", b"application/octet-stream"))
        await send({"type": "http.response.start", "status": p.status, "headers": raw})
        at = p.start
        end = at + p.length if scope["method"] == "GET" else at
        if end - at <= CHUNK:  # one message (a whole small image is the cached object, no copy)
            await send({"type": "http.response.body", "body": data[at:end]})
            return
        # Views of the one cached image, a chunk at a time: send waits while the client's write
        # buffer is full, so a client that reads slowly (or not at all) holds a chunk, not a copy;
        # a view is copied only when it is written (not at all once the client is gone).
        view = memoryview(data)
        while at < end:
            chunk = view[at : min(at + CHUNK, end)]
            at += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": at < end})


async def _unavailable(send: Any) -> None:
    headers = [(b"content-type", b"application/json"), (b"retry-after", str(RETRY_AFTER_S).encode())]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"detail": "storage unavailable; retry later"}'})


class ActiveNotice(NamedTuple):
    """What a device's notice resource shows now (CoAP builds notices on demand)."""

    campaign: int
    target: dq.Target
    manifest_id: int
    kind: NoticeKind
    reason: str | None = None


@dataclass
class Hooks:
    """Called by the API after a campaign or the set of devices changes, so the engine or the
    broker accounts act at once."""

    engine: Engine | None = None
    accounts: AccountSync | None = None

    def campaign_changed(self, campaign_id: int) -> None:
        if self.engine is not None:
            self.engine.wake()

    def devices_changed(self) -> None:
        if self.accounts is not None:
            self.accounts.changed()


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
        self.token_keys: list[bytes] = []
        self._protected: set[str] = set()
        self._protected_at = -PROTECTED_REFRESH_S
        self._tokens_ok: dict[tuple[str, str, str], float] = {}
        self._coap_seen: dict[tuple[str, str], str] = {}
        """CoAP devices that observed from a new address since the last save."""
        self.hooks = Hooks(self.engine)
        self.mqtt: MqttTransport | None = None
        self.coap: CoapTransport | None = None
        self._http: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def create_api(self):  # type: ignore[no-untyped-def]
        from fwcm.api import create_app

        app = create_app(self.db, self.settings, hooks=self.hooks)

        @app.get("/metrics", include_in_schema=False)
        def prometheus() -> Response:
            """Prometheus exposition; campaign counts are read from the database at scrape time."""
            with self.db.read() as s:  # a scrape must never take the write lock
                rows = s.execute(select(Campaign.state, func.count()).group_by(Campaign.state)).all()
            found = dict(rows)
            for state in CampaignState:
                CAMPAIGNS.labels(state.value).set(found.get(state.value, 0))
            return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

        return DevicePayloads(app, self.payload_cache, storage_guard(self.payload_refusal))

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
        await asyncio.to_thread(self._load_signing_keys)
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
            self.coap = CoapTransport(
                (self.settings.coap_host, self.settings.coap_port),
                self.ingest.submit,
                storage_guard(self.current_notice),
                storage_guard(self.coap_payload),
                storage_guard(self.payload_refusal),
                authorize=storage_guard(self.coap_authorized),
                observed=self._coap_observed,
            )
            self.coap.addresses.update(await asyncio.to_thread(self._load_coap_addresses))
            await self.coap.start()
            self.notifier.senders["coap"] = self.coap
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
        if self.coap is not None:
            self._tasks.append(asyncio.create_task(self._save_coap_addresses(), name="coap-addresses"))
        log.info("server %s running", self.replica)

    def _check_ports(self) -> None:
        """Refuse to start before touching the broker if another process holds our ports: a second
        server started by mistake must not disturb the live one."""
        wanted = []
        if self.enable_http:
            wanted.append(("HTTP", socket.SOCK_STREAM, self.settings.http_host, self.settings.http_port))
        if self.enable_coap:
            wanted.append(("CoAP", socket.SOCK_DGRAM, self.settings.coap_host, self.settings.coap_port))
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
        if self.hooks.accounts is not None:
            await self.hooks.accounts.stop()
        if self.mqtt is not None:
            await self.mqtt.stop()
        if self.coap is not None:
            await self.coap.stop()
            if self._coap_seen:  # where devices observed from since the last save
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._store_coap_addresses, self._coap_seen)
        self.db.dispose()

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def _housekeeping(self) -> None:
        """Trim device history and dead letters now and then so they stay bounded."""
        while True:
            await asyncio.sleep(60)
            try:
                events, letters = await asyncio.to_thread(self._trim)
                if events or letters:
                    log.info("trimmed %d old device events and %d old dead letters", events, letters)
            except Exception:
                log.exception("history trim failed")

    def _trim(self) -> tuple[int, int]:
        with self.db.session() as s:
            return ds.trim_history(s), dl.trim(s)

    # -- CoAP sources -------------------------------------------------------------------------

    async def current_notice(self, tenant: str, device: str) -> bytes | None:
        """The notice a CoAP device sees when it (re-)observes, built from the database."""
        found = await asyncio.to_thread(self._active_notice, tenant, device)
        if found is None:
            return None
        if found.manifest_id not in self.notifier.envelopes:
            self.notifier.envelopes[found.manifest_id] = await asyncio.to_thread(
                self._envelope, found.manifest_id
            )
        return self.notifier.build(
            found.target, found.campaign, found.kind, found.manifest_id, reason=found.reason
        )

    def _active_notice(self, tenant: str, device: str) -> ActiveNotice | None:
        """The notice a device's newest deployment shows now; else its credential, if one is due."""
        with self.db.read() as s:
            found = nq.speaking_deployment(s, tenant, device)
            if found is not None:
                kind = deployment.notice_kind(found.state, found.campaign_state, found.group_decision)
                reason = deployment.notice_reason(kind, found.detail)
                return ActiveNotice(found.campaign, found.target, found.manifest_id, kind, reason)
            done = nq.last_attested_success(s, tenant, device)
            if done is not None:
                return ActiveNotice(done[0], done[1], done[2], NoticeKind.CREDENTIAL)
        return None

    def _envelope(self, manifest_id: int) -> bytes:
        with self.db.read() as s:
            return lq.manifest_envelope(s, manifest_id)

    async def coap_authorized(self, tenant: str, device: str, credential: str) -> bool:
        """Whether ``credential`` is the password of a known device ``tenant/device``."""
        name = (tenant, device)
        key = self.ingest.keys.peek(name)
        if key is None:
            key = (await asyncio.to_thread(self.ingest.keys.lookup, {name})).get(name)
        return key is not None and hmac.compare_digest(
            protocol.device_password(key.secret, tenant, device), credential
        )

    def _coap_observed(self, tenant: str, device: str, address: str) -> None:
        self._coap_seen[(tenant, device)] = address

    def _load_coap_addresses(self) -> dict[tuple[str, str], str]:
        with self.db.read() as s:
            return ds.coap_addresses(s)

    async def _save_coap_addresses(self) -> None:
        """Store where CoAP devices observe from, in batches: after a restart their notices are
        pushed there until they observe again."""
        while True:
            await asyncio.sleep(COAP_ADDRESS_SAVE_S)
            seen, self._coap_seen = self._coap_seen, {}
            if not seen:
                continue
            try:
                await asyncio.to_thread(self._store_coap_addresses, seen)
            except Exception as exc:
                log.warning("could not save %d CoAP device addresses: %s", len(seen), exc)
                self._coap_seen = seen | self._coap_seen

    def _store_coap_addresses(self, seen: dict[tuple[str, str], str]) -> None:
        with self.db.session() as s:
            ds.set_coap_addresses(s, seen)

    # -- attestation ----------------------------------------------------------------------------

    def _load_signing_keys(self) -> None:
        with self.db.session() as s:
            pems = nq.server_signing_keys(s)
        keys = [manifest.load_private_key(p) for p in pems]
        self.notifier.signing_key = keys[0]
        self.notifier.token_key = attestation.token_key(keys[0])
        self.token_keys = [attestation.token_key(k) for k in keys]

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

    def _protected_images(self) -> set[str]:
        now = time.monotonic()
        if now - self._protected_at >= PROTECTED_REFRESH_S:
            with self.db.read() as s:
                self._protected = nq.protected_images(s)
            self._protected_at = now
        return self._protected

    async def payload_refusal(self, sha256: str, query: dict[str, str], transport: str) -> str | None:
        """Why a payload fetch is refused (None: serve it). Images of attested campaigns need a
        valid install token (``t``) for the asking device (``d=tenant/device``) and that image."""
        protected = self._protected
        if time.monotonic() - self._protected_at >= PROTECTED_REFRESH_S:
            protected = await asyncio.to_thread(self._protected_images)
        if sha256 not in protected:
            return None
        tenant, _, device = query.get("d", "").partition("/")
        seen = (sha256, query.get("d", ""), query.get("t", ""))
        if self._tokens_ok.get(seen, 0.0) > time.time():
            return None  # CoAP asks once per block: verify a token once
        try:
            if "t" not in query or not device:
                raise attestation.AttestationError(
                    "missing", "an install token (t) and device (d) are required"
                )
            grant = attestation.check_token(
                attestation.unb64(query["t"]),
                self.token_keys,
                tenant=tenant,
                device=device,
                image_digest=bytes.fromhex(sha256),
                now=time.time(),
            )
        except attestation.AttestationError as err:
            TOKENS_REFUSED.labels(transport, err.reason).inc()
            log.warning(
                "payload %s… refused to %s/%s over %s: %s", sha256[:12], tenant, device, transport, err
            )
            return f"{err.reason}: {err}"
        if len(self._tokens_ok) > 50_000:
            self._tokens_ok.clear()
        self._tokens_ok[seen] = float(grant.expires)
        return None

    async def coap_payload(self, sha256: str, offset: int, size: int) -> tuple[bytes, int] | None:
        """One Block2 block of a payload and the payload's size: from memory when cached (every
        block is a request of its own), else that block alone from disk."""
        data = self.payload_cache.peek(sha256)
        if data is not None:
            return data[offset : offset + size], len(data)
        return await asyncio.to_thread(self.payload_cache.read, sha256, offset, size)
