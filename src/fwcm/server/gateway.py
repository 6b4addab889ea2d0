"""The device-facing side of one replica: what devices fetch and observe, as opposed to the
management API.  Payload delivery (from memory, with install tokens for attested campaigns), the
CoAP notice resource built from the database, CoAP credentials, and where CoAP devices observe from.
Every source here is wrapped in :func:`storage_guard`: a lost database answers "unavailable"."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, ParamSpec, TypeVar
from urllib.parse import parse_qsl

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.requests import ClientDisconnect

from fwcm import attestation, manifest, protocol
from fwcm.api.ranges import CHUNK, plan
from fwcm.protocol import NoticeKind
from fwcm.rollout import deployment
from fwcm.server.keys import KeyCache
from fwcm.server.metrics import PAYLOAD_BYTES, TOKENS_REFUSED
from fwcm.server.notices import Notifier
from fwcm.store import deltas as dz
from fwcm.store import deployments as dq
from fwcm.store import device_state as ds
from fwcm.store import leases as lq
from fwcm.store import notices as nq
from fwcm.store.db import Database
from fwcm.store.payloads import PayloadStore, is_sha256
from fwcm.transport.coap import RETRY_AFTER_S, Unavailable

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PROTECTED_REFRESH_S = 2.0
"""How long the set of token-protected payloads is trusted before it is read again."""
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

    def __init__(
        self,
        app: Any,
        cache: PayloadCache,
        refusal: RefusalFn | None = None,
        served: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self.app = app
        self.cache = cache
        self.refusal = refusal
        self.served = served

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
        if self.served is not None:
            self.served(sha, end - at, "http")
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


class Gateway:
    """The sources the CoAP transport and the HTTP front ask on a device's behalf."""

    def __init__(self, db: Database, notifier: Notifier, keys: KeyCache, cache: PayloadCache) -> None:
        self.db = db
        self.notifier = notifier
        self.keys = keys
        self.payload_cache = cache
        self.token_keys: list[bytes] = []
        self._protected: set[str] = set()
        self._patches: set[str] = set()
        """Payloads that are server-made patches: their bytes are counted apart (``served``)."""
        self._protected_at = -PROTECTED_REFRESH_S
        self._reading: asyncio.Task[set[str]] | None = None
        self._tokens_ok: dict[tuple[str, str, str], float] = {}
        self.coap_seen: dict[tuple[str, str], str] = {}
        """CoAP devices that observed from a new address since the last save."""
        self._served: dict[tuple[str, str], Any] = {}

    def http_front(self, app: Any) -> DevicePayloads:
        """The HTTP server's application: device payloads here, everything else to ``app``."""
        return DevicePayloads(app, self.payload_cache, storage_guard(self.payload_refusal), self.served)

    def load_signing_keys(self) -> None:
        with self.db.session() as s:  # creates the first key on a fresh database
            pems = nq.server_signing_keys(s)
        keys = [manifest.load_private_key(p) for p in pems]
        self.notifier.signing_key = keys[0]
        self.notifier.token_key = attestation.token_key(keys[0])
        self.token_keys = [attestation.token_key(k) for k in keys]

    # -- CoAP ---------------------------------------------------------------------------------

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
        key = self.keys.peek(name)
        if key is None:
            key = (await asyncio.to_thread(self.keys.lookup, {name})).get(name)
        return (
            key is not None
            and not key.retired
            and hmac.compare_digest(protocol.device_password(key.secret, tenant, device), credential)
        )

    def coap_observed(self, tenant: str, device: str, address: str) -> None:
        self.coap_seen[(tenant, device)] = address

    def load_coap_addresses(self) -> dict[tuple[str, str], str]:
        with self.db.read() as s:
            return ds.coap_addresses(s)

    async def save_coap_addresses(self) -> None:
        """Store where CoAP devices observe from, in batches: after a restart their notices are
        pushed there until they observe again."""
        while True:
            await asyncio.sleep(COAP_ADDRESS_SAVE_S)
            seen, self.coap_seen = self.coap_seen, {}
            if not seen:
                continue
            try:
                await asyncio.to_thread(self.store_coap_addresses, seen)
            except Exception as exc:
                log.warning("could not save %d CoAP device addresses: %s", len(seen), exc)
                self.coap_seen = seen | self.coap_seen

    def store_coap_addresses(self, seen: dict[tuple[str, str], str]) -> None:
        with self.db.session() as s:
            ds.set_coap_addresses(s, seen)

    # -- LwM2M ----------------------------------------------------------------------------------

    async def lwm2m_admits(self, tenant: str, device: str) -> bool:
        """Whether ``tenant:device`` may register over LwM2M: an active device of that transport."""
        return await asyncio.to_thread(self._transport_of, tenant, device) == "lwm2m"

    def _transport_of(self, tenant: str, device: str) -> str | None:
        with self.db.read() as s:
            return ds.transport_of(s, tenant, device)

    # -- payloads -------------------------------------------------------------------------------

    def _protected_images(self) -> set[str]:
        now = time.monotonic()
        if now - self._protected_at >= PROTECTED_REFRESH_S:
            with self.db.read() as s:
                self._protected = nq.protected_images(s)
                self._patches = dz.patch_digests(s)
            self._protected_at = now
        return self._protected

    async def _refresh_protected(self) -> set[str]:
        """Read the protected payloads again, once for every request that finds them stale: a
        thousand CoAP devices ask for blocks at once, and each starting its own read queued
        hundreds of them behind the worker threads while the blocks waited."""
        loop = asyncio.get_running_loop()
        reading = self._reading
        if reading is None or reading.get_loop() is not loop:
            reading = self._reading = loop.create_task(asyncio.to_thread(self._protected_images))
            reading.add_done_callback(self._read_done)
        return await asyncio.shield(reading)

    def _read_done(self, task: asyncio.Task[set[str]]) -> None:
        if self._reading is task:
            self._reading = None
        if not task.cancelled():
            task.exception()  # every waiter saw it; the task itself need not log it

    async def payload_refusal(self, sha256: str, query: dict[str, str], transport: str) -> str | None:
        """Why a payload fetch is refused (None: serve it). Images of attested campaigns need a
        valid install token (``t``) for the asking device (``d=tenant/device``) and that image."""
        protected = self._protected
        if time.monotonic() - self._protected_at >= PROTECTED_REFRESH_S:
            protected = await self._refresh_protected()
        if sha256 not in protected:
            return None
        tenant, _, device = query.get("d", "").partition("/")
        if device and await self._retired(tenant, device):
            TOKENS_REFUSED.labels(transport, "decommissioned").inc()
            return f"decommissioned: device {tenant}/{device} is decommissioned"
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

    async def _retired(self, tenant: str, device: str) -> bool:
        """Whether the device was decommissioned: its install tokens open nothing any more."""
        name = (tenant, device)
        key = self.keys.peek(name)
        if key is None:
            key = (await asyncio.to_thread(self.keys.lookup, {name})).get(name)
        return key is not None and key.retired

    def served(self, sha256: str, sent: int, transport: str) -> None:
        """Count payload bytes sent, patches apart from full images (``/metrics``)."""
        kind = "delta" if sha256 in self._patches else "full"
        counter = self._served.get((transport, kind))
        if counter is None:  # the labelled counter once: CoAP counts every block
            counter = self._served[(transport, kind)] = PAYLOAD_BYTES.labels(transport, kind)
        counter.inc(sent)

    async def coap_payload(self, sha256: str, offset: int, size: int) -> tuple[bytes, int] | None:
        """One Block2 block of a payload and the payload's size: from memory when cached (every
        block is a request of its own), else that block alone from disk."""
        data = self.payload_cache.peek(sha256)
        if data is not None:
            block = data[offset : offset + size], len(data)
        else:
            found = await asyncio.to_thread(self.payload_cache.read, sha256, offset, size)
            if found is None:
                return None
            block = found
        self.served(sha256, len(block[0]), "coap")
        return block
