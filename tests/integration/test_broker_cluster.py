"""A campaign through a clustered broker: three nats-server nodes (MQTT on JetStream) on loopback,
the server connected to node 1, the simulated devices spread over all three nodes."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from campaignkit import run_mqtt_campaign

from fwcm import manifest as mf
from fwcm.config import Settings
from fwcm.server.app import Server
from fwcm.transport.broker import BrokerCluster, free_port, nats_binary, start_nats_cluster

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
    settings = Settings(
        data_dir=tmp_path / "server",
        mqtt_url=cluster.nodes[0].url,
        http_port=free_port(),
        coap_port=free_port(socket.SOCK_DGRAM),
    )
    srv = Server(settings, replica="cluster")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


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
