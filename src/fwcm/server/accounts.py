"""Keeping the broker's accounts in step with the device table.

Every device gets a broker account (``fwcm.transport.accounts``) from the moment it is registered,
imported or claimed until it is released, transferred away or deleted.  The files are rewritten
whole from the database, never patched, so whatever changed the devices (this replica's API, another
replica, a migration) the next write is right:

* at start, before the server connects to the broker (its own account is written too);
* shortly after this replica's API says devices changed (``changed``, from any thread); changes
  that arrive meanwhile are collected into the next write, and writes are spaced by at least twice
  the duration of the last one, so a steady stream of registrations into a large fleet costs at
  most a third of a core here and a reload every few seconds on the broker (100,000 devices: a
  write takes 1.3-2.7 s, Mosquitto's reload 0.3-0.6 s);
* when a cheap periodic check (number of devices and highest id) sees a change made elsewhere.

After each write the broker is sent SIGHUP (when its pid file is configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from fwcm.store import devices
from fwcm.store.db import Database
from fwcm.transport import accounts
from fwcm.transport.accounts import Credentials

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 3.0
"""How often the device table is checked for changes made by other replicas."""
DEBOUNCE_S = 0.2
"""How long a change waits for others to join it in one write."""


class AccountSync:
    """Writes the broker's accounts from the database and asks the broker to reload them."""

    def __init__(
        self,
        db: Database,
        directory: Path,
        service: Credentials,
        pid_file: Path | None = None,
        *,
        interval: float = CHECK_INTERVAL_S,
    ) -> None:
        self.db = db
        self.directory = Path(directory)
        self.service = service
        self.pid_file = pid_file
        self.interval = interval
        self.written: tuple[int, int] | None = None
        """Device fingerprint of the last write (None: none yet, or it failed)."""
        self._last_duration = 0.0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Write the accounts once (errors propagate: the server cannot work without them), then
        keep them in step."""
        if not self.directory.is_dir():
            raise FileNotFoundError(f"broker accounts directory {self.directory} does not exist")
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.sync)
        self._task = asyncio.create_task(self._run(), name="broker-accounts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def changed(self) -> None:
        """Devices were added or removed: write soon.  Safe from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def sync(self) -> int:
        """Rewrite the files from the database and signal the broker; returns the device count."""
        started = time.monotonic()
        with self.db.read() as s:
            fingerprint = devices.devices_fingerprint(s)
            creds = (
                accounts.device_credentials(r.secret, r.tenant, r.device)
                for r in devices.broker_account_rows(s)
            )
            count = accounts.write_accounts(self.directory, self.service, creds)
        self.written = fingerprint
        self._last_duration = time.monotonic() - started
        if self.pid_file is not None:
            accounts.signal_reload(self.pid_file)
        log.debug("broker accounts: %d devices written in %.2f s", count, self._last_duration)
        return count

    def _fingerprint(self) -> tuple[int, int]:
        with self.db.read() as s:
            return devices.devices_fingerprint(s)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            try:
                if self._wake.is_set():
                    await asyncio.sleep(max(DEBOUNCE_S, 2 * self._last_duration))
                    self._wake.clear()
                elif await asyncio.to_thread(self._fingerprint) == self.written:
                    continue
                await asyncio.to_thread(self.sync)
            except Exception:  # the next round writes again
                self.written = None
                log.exception("writing the broker accounts to %s failed", self.directory)
