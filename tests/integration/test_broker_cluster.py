"""A campaign through a clustered broker: three nats-server nodes (MQTT on JetStream) on loopback,
the server connected to node 1, the simulated devices spread over all three nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from campaignkit import run_mqtt_campaign, running_server

from fwcm import manifest as mf
from fwcm.server.app import Server
from fwcm.transport.broker import BrokerCluster, nats_binary, start_nats_cluster

pytestmark = pytest.mark.skipif(
    nats_binary() is None, reason="nats-server is not installed (Debian: apt-get install nats-server)"
)

VENDOR = mf.vendor_id_for_domain("cluster.fwcm.example")
CLASS = mf.class_id_for(VENDOR, "sensor-v1")
DEVICES = 30


@pytest.fixture(scope="module")
def cluster() -> Iterator[BrokerCluster]:
    with start_nats_cluster(3) as c:
        yield c


@pytest.fixture
async def server(tmp_path: Path, cluster: BrokerCluster) -> AsyncIterator[Server]:
    async with running_server(tmp_path / "server", cluster.nodes[0], "cluster") as srv:
        yield srv


async def test_campaign_completes_with_devices_on_every_node(
    server: Server, cluster: BrokerCluster, tmp_path: Path
) -> None:
    run = await run_mqtt_campaign(
        server,
        cluster.urls,
        tmp_path / "devices",
        devices=DEVICES,
        vendor=VENDOR,
        klass=CLASS,
        image_size=16 * 1024,
    )
    assert run.stats["state"] == "completed", run.stats
    assert run.stats["counts"]["succeeded"] == DEVICES and run.stats["total"] == DEVICES, run.stats
    assert all(run.report.devices[n].installed_sequence == 2 for n in run.names)
