"""The embedded MQTT broker: amqtt in a child process, admitting fwcm's accounts only.

Run as ``python -m fwcm.transport.amqtt_broker PORT ACCOUNTS_DIR PID_FILE`` (``broker.start_amqtt``
does).  It reads the password files the server writes for Mosquitto (``fwcm.transport.accounts``)
and applies the same rule through two amqtt plugins: :class:`AccountsAuth` (the ``$6$``/``$7$``
hashes, checked with hashlib) and :class:`AccountsTopics` (``accounts.allowed`` on every subscribe,
publish and delivery).  The files are re-read on SIGHUP and whenever they change.

amqtt 0.12 needs four corrections besides, measured against it:

* it looks up, deletes (clean session) or takes over the session of a CONNECT's client id before
  it asks the authentication plugins, so a client without credentials could cut any device off its
  notices by using its client id.  :class:`GuardedHandler` answers a refused CONNECT before that;
* it would let a device take another's session over by client id: a device's client id becomes
  its username, as Mosquitto's ``use_username_as_clientid`` does; and it publishes last wills
  without a topic check, so a will outside the account's topics refuses the CONNECT;
* at every connect it sends the client the retained messages of every filter *anyone* subscribed
  to: :class:`FwcmBroker` sends only those of the client's own subscriptions;
* it acknowledges a QoS 1 PUBLISH on arrival but drops what it had not passed on yet when the
  client disconnects (with the topic checks, half of a 600-report burst from a client that
  disconnected at once): :class:`FwcmBroker` passes the queue on first.

A device whose account disappears keeps its connection but may neither publish nor receive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import amqtt.broker
from amqtt.broker import Broker as AmqttBroker
from amqtt.contexts import Action as AmqttAction
from amqtt.errors import MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from fwcm.transport import accounts
from fwcm.transport.accounts import Action

log = logging.getLogger(__name__)

REFRESH_S = 1.0
"""How often the account files are checked for changes (besides SIGHUP)."""
_ACTIONS = {
    AmqttAction.SUBSCRIBE: Action.SUBSCRIBE,
    AmqttAction.PUBLISH: Action.PUBLISH,
    AmqttAction.RECEIVE: Action.RECEIVE,
}


class AccountBook:
    """The service and device accounts of an accounts directory, re-read when a file changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.service: dict[str, str] = {}
        self.devices: dict[str, str] = {}
        self._stamp: tuple[object, ...] = ()
        self.refresh()

    def _files(self) -> tuple[Path, Path]:
        return self.directory / accounts.SERVICE_PASSWD, self.directory / accounts.DEVICES_PASSWD

    def _current_stamp(self) -> tuple[object, ...]:
        stamp: list[object] = []
        for path in self._files():
            try:
                st = path.stat()
                stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)

    def refresh(self, force: bool = False) -> None:
        """Re-read the password files if they were replaced since the last read."""
        stamp = self._current_stamp()
        if stamp == self._stamp and not force:
            return
        service, devices = self._files()
        self.service = accounts.read_password_file(service) if service.exists() else {}
        self.devices = accounts.read_password_file(devices) if devices.exists() else {}
        self._stamp = stamp
        log.info("accounts: %d service, %d devices", len(self.service), len(self.devices))

    @property
    def service_username(self) -> str:
        return next(iter(self.service), "")

    def authenticate(self, username: str | None, password: str | bytes | None) -> bool:
        if not username or password is None:
            return False
        if isinstance(password, bytes):
            try:
                password = password.decode()
            except UnicodeDecodeError:
                return False
        hashed = self.service.get(username) or self.devices.get(username)
        return hashed is not None and accounts.verify_password(password, hashed)

    def may(self, username: str | None, topic: str, action: Action) -> bool:
        """Whether ``username`` (still) has an account that may use ``topic``."""
        if not username or (username not in self.service and username not in self.devices):
            return False
        return accounts.allowed(username, self.service_username, topic, action)

    def refusal(self, session: Session) -> str | None:
        """Why a CONNECT is refused, or None."""
        if not self.authenticate(session.username, session.password):
            return "not authorised"
        if session.will_flag and not self.may(session.username, session.will_topic or "", Action.PUBLISH):
            return f"will topic {session.will_topic!r} not allowed"
        return None


_books: dict[str, AccountBook] = {}


def book_for(directory: str | Path) -> AccountBook:
    """One book per directory, shared by the plugins and the CONNECT guard."""
    key = str(Path(directory).resolve())
    if key not in _books:
        _books[key] = AccountBook(Path(key))
    return _books[key]


class AccountsAuth(BaseAuthPlugin):
    """Admits a client whose username and password match an account's hash."""

    @dataclass
    class Config:
        directory: str = ""

    async def authenticate(self, *, session: Session) -> bool | None:
        return book_for(self.config.directory).authenticate(session.username, session.password)


class AccountsTopics(BaseTopicPlugin):
    """``accounts.allowed`` on every subscription, publish and delivery."""

    @dataclass
    class Config:
        directory: str = ""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: AmqttAction | None = None
    ) -> bool | None:
        if session is None or topic is None or action is None:
            return False
        return book_for(self.config.directory).may(session.username, topic, _ACTIONS[action])


class GuardedHandler(BrokerProtocolHandler):
    """Refuses a CONNECT before amqtt touches any session; gives a device its username as client id."""

    book: ClassVar[AccountBook]

    @classmethod
    async def init_from_connect(
        cls,
        reader: Any,
        writer: Any,
        plugins_manager: Any,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await super().init_from_connect(reader, writer, plugins_manager, loop)
        refusal = cls.book.refusal(session)
        if refusal is not None:
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"CONNECT of {session.client_id!r} refused: {refusal}")
        if session.username and accounts.device_of(session.username) is not None:
            session.client_id = session.username
        return handler, session


class FwcmBroker(AmqttBroker):
    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        """amqtt acknowledges a QoS 1 PUBLISH when it arrives and passes it on later; what was still
        queued when the client disconnected would be lost although acknowledged: pass it on first."""
        queued = client_session.delivered_message_queue
        while not queued.empty():
            delivered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            delivered.set_result(queued.get_nowait())
            await self._handle_message_delivery(client_session, handler, delivered)
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """amqtt calls this at every connect for every filter anyone holds: only the client's own."""
        holders = self._subscriptions.get(subscription[0], [])
        if any(held.client_id == session.client_id for held, _qos in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def config(port: int, directory: Path) -> dict[str, Any]:
    plugin = {"directory": str(directory)}
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 0}},
        "plugins": {f"{__name__}.AccountsAuth": plugin, f"{__name__}.AccountsTopics": plugin},
    }


async def serve(port: int, directory: Path, pid_file: Path) -> None:
    book = book_for(directory)
    GuardedHandler.book = book
    amqtt.broker.BrokerProtocolHandler = GuardedHandler  # the guard, see above
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, book.refresh, True)
    pid_file.write_text(str(os.getpid()))  # before listening: whoever sees the port may signal
    broker = FwcmBroker(config(port, directory))
    await broker.start()
    while True:
        await asyncio.sleep(REFRESH_S)
        book.refresh()


def main(argv: list[str]) -> None:  # pragma: no cover - runs in the child process
    logging.basicConfig(level=logging.WARNING)
    port, directory, pid_file = int(argv[0]), Path(argv[1]), Path(argv[2])
    asyncio.run(serve(port, directory, pid_file))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
