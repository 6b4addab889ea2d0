"""The audit log as a hash chain (pure): each entry's hash covers its fields and the hash of the
tenant's previous entry, so altering or removing an entry breaks every link after it.

``entry_hash`` is what the store computes when it appends; ``verify`` walks a tenant's entries
oldest first and names every entry whose hash or link does not hold.  The oldest entry kept is the
anchor (older ones may have been trimmed by age or count); removing entries from the newest end
is only visible against a head hash noted elsewhere (``fwcm audit verify`` prints it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64
"""``prev_hash`` of a tenant's first chained entry."""
FIELDS = ("tenant_id", "at", "key_name", "role", "method", "route", "object", "status", "source")


def _at(value: datetime) -> str:
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of the entry's FIELDS and ``prev_hash``."""
    doc = {name: fields[name] for name in FIELDS}
    doc["at"] = _at(fields["at"])
    doc["prev_hash"] = prev_hash
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Report:
    checked: int
    """Chained entries checked."""
    unchained: int
    """Entries written before the log was chained (oldest first), not checked."""
    head: str | None
    """Hash of the newest entry: note it to detect later removals at the newest end."""
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(entries: Iterable[Mapping[str, Any]]) -> Report:
    """Check a tenant's entries, oldest first (each with ``id``, FIELDS, ``prev_hash``, ``hash``)."""
    problems: list[str] = []
    prev: str | None = None
    checked = unchained = 0
    for e in entries:
        if e.get("hash") is None:
            if prev is None:
                unchained += 1
                continue
            problems.append(f"entry {e['id']} has no hash")
            continue
        checked += 1
        if prev is not None and e["prev_hash"] != prev:
            problems.append(f"entry {e['id']} does not follow the entry before it (removed or reordered)")
        if entry_hash(str(e["prev_hash"]), e) != e["hash"]:
            problems.append(f"entry {e['id']} was altered (its hash does not match its content)")
        prev = str(e["hash"])
    return Report(checked, unchained, prev, tuple(problems))
