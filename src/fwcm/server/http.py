"""The HTTP listener's limits: uvicorn's h11 protocol with the timeouts and connection cap it lacks.

uvicorn closes a keep-alive connection that stays silent, but waits forever for a request head
that never ends, for a body that stops arriving and for a client that stops reading a response;
and it accepts connections until the process runs out of file descriptors.  Each connection here
has one deadline for what it waits on (see :meth:`BoundedH11Protocol._settle`), and the number
of open connections is capped below the descriptor limit: over the cap the connection that has
waited longest for a request head makes room, and when every connection is busy the newcomer's
request is answered with a 503.  Every such closing is counted in ``fwcm_http_connections_closed_total``.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from fwcm.server.metrics import HTTP_CLOSED

log = logging.getLogger(__name__)

FD_RESERVE = 256
"""Descriptors kept for everything but HTTP: database connections (three each for SQLite in WAL
mode), the MQTT and CoAP sockets, log files, payload files being stored."""


@dataclass(frozen=True)
class HttpLimits:
    head_timeout: float = 5.0
    """A request line and headers must arrive within this (from the connection, or from the end of
    the previous response on a kept-alive connection)."""
    idle_timeout: float = 60.0
    """Longest silence inside a transfer: a request body that stops arriving, or a response the
    client reads nothing of (less than the 48 KiB between the write buffer's high and low water
    marks).  Like nginx's ``send_timeout``, generous for slow radio links."""
    max_connections: int = 0
    """Open HTTP connections; 0: derived from the process's descriptor limit (:meth:`derive`)."""
    backlog: int = 0
    """Listen backlog, which is also how many connections asyncio accepts in one go; 0: derived."""

    def derive(self, nofile: int | None = None) -> HttpLimits:
        """These limits with what is 0 derived from the soft ``RLIMIT_NOFILE``: a backlog of an
        eighth of it (at most uvicorn's 2,048: bursts of connections wait in the kernel, not in a
        SYN retry), and two descriptors per connection (an upload holds its temporary file open)
        for what is left after the reserve and one accepted backlog."""
        if self.max_connections and self.backlog:
            return self
        if nofile is None:
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            nofile = min(nofile, 1 << 20) if nofile != resource.RLIM_INFINITY else 1 << 20
        backlog = self.backlog or min(2048, max(64, nofile // 8))
        cap = self.max_connections or max(16, (nofile - FD_RESERVE - backlog) // 2)
        return replace(self, max_connections=cap, backlog=backlog)


class _ReadingFlow(FlowControl):
    """uvicorn's flow control, telling the connection when it reads again after a pause."""

    def __init__(self, transport: asyncio.Transport, resumed: Callable[[], None]) -> None:
        super().__init__(transport)
        self._resumed = resumed

    def resume_reading(self) -> None:
        paused = self.read_paused
        super().resume_reading()
        if paused:
            self._resumed()


class BoundedH11Protocol(H11Protocol):
    """One HTTP connection (uvicorn's h11 protocol) with a deadline and a place under the cap."""

    limits: ClassVar[HttpLimits]
    waiting: ClassVar[dict[BoundedH11Protocol, None]]
    """Connections waiting for a request head, oldest first (the first to make room)."""

    _timer: asyncio.TimerHandle | None = None
    _reason: str | None = None
    _deadline = 0.0
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _ReadingFlow(transport, self._reading_resumed)
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            # Every other connection is busy: this one answers its request with uvicorn's 503
            # (and closes), or makes room for the next newcomer if that comes first.
            self._refused = True
            self.limit_concurrency = 0
            HTTP_CLOSED.labels("refused").inc()
        self._settle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._expect(None)
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._settle(progress=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._settle()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._settle()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._settle(progress=True)

    def shutdown(self) -> None:
        super().shutdown()
        if self.flow.write_paused:  # a client that reads nothing must not hold up the shutdown
            self.transport.abort()

    # -- deadlines ------------------------------------------------------------------------------

    def _settle(self, progress: bool = False) -> None:
        """Set the deadline for what the connection waits on now; ``progress``: bytes moved."""
        if self.transport.is_closing():
            self._expect(None)
        elif self.flow.write_paused:
            self._expect("stalled", self.limits.idle_timeout)
        elif self.conn.their_state is h11.SEND_BODY:
            self._expect("body_timeout", self.limits.idle_timeout, restart=progress)
        elif self.cycle is None or self.cycle.response_complete:
            self._expect("head_timeout", self.limits.head_timeout)
        else:
            self._expect(None)  # the application is working on a request: its own business

    def _expect(self, reason: str | None, timeout: float = 0.0, restart: bool = False) -> None:
        """Close the connection for ``reason`` in ``timeout`` s, unless it is already due for the
        same reason (and not ``restart``); None: no deadline (a pending timer finds nothing due)."""
        if reason == self._reason and not restart:
            return
        if self._reason == "head_timeout":
            del self.waiting[self]
        self._reason = reason
        if reason is None:
            return
        if reason == "head_timeout":
            self.waiting[self] = None
        self._deadline = self.loop.time() + timeout
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(self._deadline, self._on_timer)

    def _reading_resumed(self) -> None:
        """The application took the body read so far and the connection reads again: the client
        was not silent while it did not, so its time starts now. (Checked only when the timer
        fires, the pause could end in the same turn of the loop as the deadline, before the bytes
        waiting in the socket were read: the connection then closed under a client that had sent
        its whole body.)"""
        if self._reason == "body_timeout":
            self._deadline = self.loop.time() + self.limits.idle_timeout

    def _on_timer(self) -> None:
        self._timer = None
        if self._reason is None:
            return
        if self._reason == "body_timeout" and self.flow.read_paused:
            # The application is behind on the body (uvicorn stopped reading): the client is not
            # the one that is silent, so its time starts again when reading resumes.
            self._deadline = self.loop.time() + self.limits.idle_timeout
        if self.loop.time() < self._deadline:  # pushed back since the timer was set
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._drop(self._reason)

    def _drop(self, reason: str) -> None:
        if not self._refused:  # counted once, as refused
            HTTP_CLOSED.labels(reason).inc()
        log.debug("closing HTTP connection from %s: %s", self.client, reason)
        self._expect(None)
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # unread bytes would keep a closing transport open forever
        else:
            self.transport.close()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request head; False if none does."""
        oldest = next(iter(self.waiting), None)
        if oldest is None:
            return False
        oldest._drop("evicted")
        return True


def protocol_class(limits: HttpLimits) -> type[BoundedH11Protocol]:
    """The protocol uvicorn instantiates per connection, bound to ``limits`` and its own set of
    waiting connections (one class per listener)."""
    attrs: dict[str, Any] = {"limits": limits.derive(), "waiting": {}}
    return type("BoundedH11Protocol", (BoundedH11Protocol,), attrs)


def uvicorn_config(app: Any, host: str, port: int, limits: HttpLimits | None = None) -> uvicorn.Config:
    """uvicorn settings of the server's listener.  Its log records go to the root logger (no
    ``log_config`` of uvicorn's own), so the commands' rate limit applies to them too."""
    limits = (limits or HttpLimits()).derive()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(limits),
        backlog=limits.backlog,
        timeout_keep_alive=max(1, round(limits.head_timeout)),
        log_config=None,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
