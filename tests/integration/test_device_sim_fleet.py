"""A small mixed-transport fleet under each fault profile ends exactly as the profile predicts."""

from __future__ import annotations

from pathlib import Path

import pytest
from devicekit import (
    TENANT,
    CoapTestServer,
    MqttServerSide,
    PayloadHttpServer,
    ReportLog,
    Signer,
    device_config,
    firmware,
    update_notice,
)

from device_sim.faults import get_profile
from device_sim.flash import Flash
from device_sim.fleet import all_finished, run_fleet, transport_for
from fwcm.protocol import Result
from fwcm.transport.broker import Broker

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("profile_name", ["none", "flaky", "corrupt", "install-fail", "offline", "slow"])
async def test_fleet_ends_as_profile_expects(broker: Broker, tmp_path: Path, profile_name: str) -> None:
    profile = get_profile(profile_name)
    n = 20
    campaign = 21
    log = ReportLog({})
    payloads: dict[str, bytes] = {}
    signer = Signer()
    image = firmware(64 * 1024, seed=21)
    async with (
        PayloadHttpServer() as http,
        CoapTestServer(log, payloads) as coap,
        MqttServerSide(broker, log) as mqtt,
    ):
        http.payloads = payloads
        sha = http.add(image)
        envelope = signer.envelope(image, [http.url(sha), coap.payload_url(sha)])
        configs = []
        for i in range(n):
            cfg = device_config(
                f"f{profile_name}-{i:02d}",
                transport=transport_for(i, "mixed"),
                trust=[signer.public_pem],
                state_dir=tmp_path,
                mqtt_url=broker.url,
                coap_url=coap.url,
                index=i,
            )
            log.secrets[cfg.name] = cfg.secret
            configs.append(cfg)
        await mqtt.admit([c for c in configs if c.transport == "mqtt"])
        for cfg in configs:
            sealed = update_notice(cfg, campaign, envelope)
            if cfg.transport == "coap":
                coap.notify(TENANT, cfg.name, sealed)
            else:
                await mqtt.notify(TENANT, cfg.name, sealed)
        report = await run_fleet(configs, profile, until=all_finished(campaign), timeout=90)

    assert report.all_finished(campaign), report.by_state(campaign)
    assert report.unexpected(campaign) == []
    expected_failures = sum(1 for i in range(n) if profile.expected_outcome(i) == "failed")
    summary = report.as_dict(campaign)
    assert summary["failed"] == expected_failures
    assert summary["succeeded"] == n - expected_failures
    for cfg in configs:
        final = log.final(cfg.name, campaign)
        assert final is not None and final.result == profile.expected_result(cfg.index)
        flash = Flash(cfg.device_dir)
        if final.result == Result.SUCCESS:
            assert flash.active_image() == image and flash.state.installed_sequence == 2
        else:
            assert flash.active_image() == cfg.factory_image() and flash.state.installed_sequence == 1
    if profile_name == "flaky":
        assert any(start for _path, start in http.requests)  # some MQTT device resumed with a Range
