"""The payload gate under a burst: every block request that finds the set of protected payloads
stale shares one read of it (a CoAP campaign asks for a thousand blocks at once)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fwcm.server.gateway import Gateway, PayloadCache
from fwcm.server.keys import KeyCache
from fwcm.server.notices import Notifier
from fwcm.store.db import Database
from fwcm.store.payloads import PayloadStore

SHA = "ab" * 32


class CountingGateway(Gateway):
    """The real gateway on a real database, counting its reads of the protected payloads."""

    reads = 0
    fail = False

    def _protected_images(self) -> set[str]:
        type(self).reads += 1
        time.sleep(0.05)  # a read that takes a while, as under load: requests keep arriving
        if self.fail:
            raise OSError("database unreachable")
        return super()._protected_images()


def gateway(db: Database, tmp_path: Path) -> CountingGateway:
    CountingGateway.reads, CountingGateway.fail = 0, False
    return CountingGateway(db, Notifier(), KeyCache(db), PayloadCache(PayloadStore(tmp_path / "payloads")))


async def test_a_burst_of_requests_shares_one_read(db: Database, tmp_path: Path) -> None:
    gw = gateway(db, tmp_path)
    answers = await asyncio.gather(*(gw.payload_refusal(SHA, {}, "coap") for _ in range(300)))
    assert answers == [None] * 300  # nothing is protected: every block is served
    assert CountingGateway.reads == 1
    await gw.payload_refusal(SHA, {}, "coap")  # fresh: no read at all
    assert CountingGateway.reads == 1


async def test_a_failed_read_fails_its_waiters_and_the_next_request_reads_again(
    db: Database, tmp_path: Path
) -> None:
    gw = gateway(db, tmp_path)
    gw.fail = True
    answers = await asyncio.gather(
        *(gw.payload_refusal(SHA, {}, "coap") for _ in range(50)), return_exceptions=True
    )
    assert all(isinstance(a, OSError) for a in answers) and CountingGateway.reads == 1
    gw.fail = False
    assert await gw.payload_refusal(SHA, {}, "coap") is None
    assert CountingGateway.reads == 2
