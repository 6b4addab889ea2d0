"""The release policy and the audit hash chain (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fwcm import audit_chain, signing
from fwcm.roles import Role


def test_four_eyes_by_default_and_none_for_developer_signers() -> None:
    prod, dev = signing.default_policy(False), signing.default_policy(True)
    assert not signing.ready(prod, "ci", [])
    assert signing.ready(dev, "ci", [])
    assert not signing.ready(prod, "ci", [("ci", Role.ADMIN)])  # the requester's own does not count
    assert not signing.ready(prod, "ci", [("ops", Role.OPERATOR)])  # too low a role
    assert signing.ready(prod, "ci", [("boss", Role.ADMIN)])
    two = signing.Policy(2, Role.OPERATOR)
    assert signing.counted(two, "ci", [("a", Role.OPERATOR), ("a", Role.ADMIN), ("ci", Role.ADMIN)]) == 1
    assert signing.ready(two, "ci", [("a", Role.OPERATOR), ("b", Role.ADMIN)])
    assert "own approval" in (signing.approval_refusal(prod, "ci", "ci", Role.ADMIN) or "")
    assert signing.request_refusal(prod, Role.VIEWER) is not None
    assert signing.request_refusal(prod, Role.OPERATOR) is None
    with pytest.raises(ValueError):
        signing.Policy(signing.MAX_APPROVALS + 1)


def _chain(n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    prev = audit_chain.GENESIS
    t0 = datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=UTC)
    for i in range(n):
        e: dict[str, Any] = {
            "id": i + 1,
            "tenant_id": 7,
            "at": t0 + timedelta(seconds=i),
            "key_name": "ci",
            "role": "operator",
            "method": "POST",
            "route": "/api/v1/releases",
            "object": {"release": str(i)},
            "status": 201,
            "source": "127.0.0.1",
            "prev_hash": prev,
        }
        e["hash"] = prev = audit_chain.entry_hash(prev, e)
        out.append(e)
    return out


def test_chain_verifies_and_names_altered_and_removed_entries() -> None:
    entries = _chain(5)
    report = audit_chain.verify(entries)
    assert report.ok and report.checked == 5 and report.head == entries[-1]["hash"]
    naive = [{**e, "at": e["at"].replace(tzinfo=None)} for e in entries]  # SQLite hands times back naive
    assert audit_chain.verify(naive).ok
    altered = [dict(e) for e in entries]
    altered[1]["status"] = 200
    assert audit_chain.verify(altered).problems == (
        "entry 2 was altered (its hash does not match its content)",
    )
    removed = entries[:2] + entries[3:]
    assert audit_chain.verify(removed).problems == (
        "entry 4 does not follow the entry before it (removed or reordered)",
    )
    trimmed = entries[2:]  # trimmed by age: the oldest kept entry anchors the chain
    assert audit_chain.verify(trimmed).ok
    legacy = [{**entries[0], "id": 0, "hash": None, "prev_hash": None}, *entries]
    assert audit_chain.verify(legacy).unchained == 1 and audit_chain.verify(legacy).ok
