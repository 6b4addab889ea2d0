"""The device keys the server checks messages with, cached by (tenant slug, device name).

Short-lived entries, so a deleted device stops being accepted within a minute; primed with the
devices just notified, whose reports follow within seconds.
"""

from __future__ import annotations

import time

from fwcm.store import deployments as dq
from fwcm.store import device_state as ds
from fwcm.store.db import Database

KEY_CACHE_TTL_S = 60.0


class KeyCache:
    """Device keys by (tenant, name); short-lived so deleted devices stop being accepted."""

    def __init__(self, db: Database, ttl: float = KEY_CACHE_TTL_S, size: int = 200_000) -> None:
        self._db = db
        self._ttl = ttl
        self._size = size
        self._entries: dict[tuple[str, str], tuple[float, ds.DeviceKey | None]] = {}

    def prime(self, tenant_id: int, targets: list[dq.Target]) -> None:
        """Remember the keys of devices just notified: their reports follow within seconds."""
        until = time.monotonic() + self._ttl
        if len(self._entries) + len(targets) > self._size:
            self._entries.clear()
        for t in targets:
            self._entries[(t.tenant, t.name)] = (until, ds.DeviceKey(t.device_pk, tenant_id, t.secret))

    def forget(self, names: list[tuple[str, str]]) -> None:
        """Drop these devices' keys (decommissioned or deleted here): the next lookup reads them."""
        for n in names:
            self._entries.pop(n, None)

    def peek(self, name: tuple[str, str]) -> ds.DeviceKey | None:
        """The cached key of a device, without touching the database (None: not cached)."""
        hit = self._entries.get(name)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def lookup(self, names: set[tuple[str, str]]) -> dict[tuple[str, str], ds.DeviceKey | None]:
        now = time.monotonic()
        found: dict[tuple[str, str], ds.DeviceKey | None] = {}
        missing = set()
        for n in names:
            hit = self._entries.get(n)
            if hit is not None and hit[0] > now:
                found[n] = hit[1]
            else:
                missing.add(n)
        if missing:
            with self._db.read() as s:  # a lookup takes no write lock
                loaded = ds.device_keys(s, missing)
            if len(self._entries) + len(missing) > self._size:
                self._entries.clear()
            for n in missing:
                key = loaded.get(n)
                found[n] = key
                self._entries[n] = (now + self._ttl, key)
        return found
