"""The simulated device's trust checks, over a real broker, CoAP stack and HTTP payload server.

Devices provisioned with the operator root refuse manifests without a valid chain, developer
builds for other hardware, and revoked signers; attested updates wait for an install token.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from devicekit import CLASS, VENDOR, cancel_notice, firmware, running, update_notice, wait_until
from test_device_sim_agent import World, world  # noqa: F401  (fixture)

from device_sim.agent import DeviceAgent, DeviceConfig
from device_sim.faults import DeviceFaults
from device_sim.flash import Flash
from fwcm import attestation, manifest, pki, protocol
from fwcm.protocol import LwState, Result

pytestmark = pytest.mark.timeout(90)


@dataclasses.dataclass
class Chain:
    root_key: manifest.PrivateKey
    root: object
    ca_key: manifest.PrivateKey
    ca: object

    @classmethod
    def make(cls) -> Chain:
        root_key = manifest.generate_private_key("es256")
        root = pki.make_root(root_key, "root")
        ca_key = manifest.generate_private_key("es256")
        return cls(
            root_key, root, ca_key, pki.make_tenant_ca(root_key, root, manifest.public_of(ca_key), "acme")
        )

    @property
    def root_pem(self) -> bytes:
        return pki.cert_pem(self.root)  # type: ignore[arg-type]

    def x5chain(self, key: manifest.PrivateKey, hardware_ids: list[str] | None = None) -> list[bytes]:
        cert = pki.make_signer(
            self.ca_key,
            self.ca,  # type: ignore[arg-type]
            manifest.public_of(key),
            "signer",
            hardware_ids=hardware_ids,
        )
        return [pki.cert_der(cert), pki.cert_der(self.ca)]  # type: ignore[arg-type]


def envelope(image: bytes, uris: list[str], key: manifest.PrivateKey, chain: list[bytes] | None) -> bytes:
    info = manifest.ManifestInfo(
        sequence=2,
        vendor_id=VENDOR,
        class_id=CLASS,
        image_digest=hashlib.sha256(image).digest(),
        image_size=len(image),
        uris=tuple(uris),
    )
    return manifest.build_envelope(info, key, x5chain=chain)


async def provisioned(world: World, name: str, chain: Chain, **kw: object) -> DeviceConfig:  # noqa: F811
    cfg = await world.device(name)
    return dataclasses.replace(cfg, trust_root=chain.root_pem, hardware_id=f"hw-{name}", **kw)  # type: ignore[arg-type]


async def test_device_checks_the_chain_the_hardware_list_and_revocations(world: World) -> None:  # noqa: F811
    chain, foreign = Chain.make(), Chain.make()
    key, other = manifest.generate_private_key("es256"), manifest.generate_private_key("es256")
    image = firmware(6_000, seed=4)
    _sha, uris = world.publish_payload(image)
    kid = manifest.key_id(key)
    cases: dict[str, tuple[bytes, Result, dict[str, object]]] = {
        "c-good": (envelope(image, uris, key, chain.x5chain(key)), Result.SUCCESS, {}),
        "c-nochain": (envelope(image, uris, key, None), Result.CHAIN_INVALID, {}),
        "c-foreign": (envelope(image, uris, key, foreign.x5chain(key)), Result.CHAIN_INVALID, {}),
        "c-otherkey": (envelope(image, uris, other, chain.x5chain(key)), Result.SIGNATURE_INVALID, {}),
        "c-listed": (envelope(image, uris, key, chain.x5chain(key, ["hw-c-listed"])), Result.SUCCESS, {}),
        "c-unlisted": (
            envelope(image, uris, key, chain.x5chain(key, ["hw-c-listed"])),
            Result.HARDWARE_NOT_LISTED,
            {},
        ),
        "c-revoked": (
            envelope(image, uris, key, chain.x5chain(key)),
            Result.SIGNER_REVOKED,
            {"revoked": (kid,)},
        ),
    }
    configs = {name: await provisioned(world, name, chain) for name in cases}
    agents = [DeviceAgent(cfg, world.clients) for cfg in configs.values()]
    async with running(agents):
        for name, (env, _r, kw) in cases.items():
            await world.notify(configs[name], update_notice(configs[name], 5, env, **kw))
        for name, (_e, expected, _kw) in cases.items():
            assert (await world.final(configs[name], 5))[1] == expected, name
    for name, (_e, expected, _kw) in cases.items():
        running_image = Flash(configs[name].device_dir).active_image()
        assert (running_image == image) == (expected == Result.SUCCESS), name


async def test_revocation_in_a_cancel_notice_aborts_the_download(world: World) -> None:  # noqa: F811
    chain = Chain.make()
    key = manifest.generate_private_key("es256")
    image = firmware(300_000, seed=6)
    _sha, uris = world.publish_payload(image)
    cfg = await provisioned(world, "c-abort", chain)
    agent = DeviceAgent(cfg, world.clients, faults=DeviceFaults(throttle_bps=100_000))
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 6, envelope(image, uris, key, chain.x5chain(key))))
        await wait_until(lambda: bool(world.log.campaign("c-abort", 6)), 15, "downloading")
        cancel = protocol.Notice(
            protocol.NoticeKind.CANCEL, cfg.name, 6, 1, 0, revoked=(manifest.key_id(key),)
        )
        await world.notify(cfg, protocol.encode_notice(cfg.secret, cancel))
        assert await world.final(cfg, 6) == (LwState.IDLE, Result.SIGNER_REVOKED)
    assert Flash(cfg.device_dir).active_image() == cfg.factory_image()


async def test_attested_update_sends_evidence_and_waits_for_a_token(world: World) -> None:  # noqa: F811
    chain = Chain.make()
    key = manifest.generate_private_key("es256")
    attest_key = manifest.generate_private_key("es256")
    image = firmware(5_000, seed=8)
    _sha, uris = world.publish_payload(image)
    env = envelope(image, uris, key, chain.x5chain(key))
    cfgs = [
        await provisioned(world, "c-attest", chain, attest_key=manifest.private_key_pem(attest_key)),
        await provisioned(world, "c-nokey", chain),
    ]
    agents = [DeviceAgent(cfg, world.clients, token_timeout=1.0) for cfg in cfgs]
    nonce = b"n" * 16
    async with running(agents):
        for cfg in cfgs:
            await world.notify(cfg, update_notice(cfg, 7, env, nonce=nonce))
        for cfg in cfgs:
            assert (await world.final(cfg, 7))[1] == Result.ATTESTATION_REFUSED
    sent = [r for r in world.log.campaign("c-attest", 7) if protocol.REPORT_EVIDENCE in r.extra]
    assert len(sent) == 1
    ev = attestation.check_evidence(
        sent[0].extra[protocol.REPORT_EVIDENCE],
        manifest.public_of(attest_key),
        device="c-attest",
        nonce=nonce,
        nonce_age_s=0,
        manifest_digest=manifest.decode_envelope(env).digest,
    )
    assert ev.image_digest == hashlib.sha256(cfgs[0].factory_image()).digest()
    assert world.http.requests == []  # without a token nothing was fetched
    assert not [r for r in world.log.campaign("c-nokey", 7) if protocol.REPORT_EVIDENCE in r.extra]


async def test_cancel_still_works_without_revocation(world: World) -> None:  # noqa: F811
    chain = Chain.make()
    key = manifest.generate_private_key("es256")
    image = firmware(300_000, seed=10)
    _sha, uris = world.publish_payload(image)
    cfg = await provisioned(world, "c-cancel", chain)
    agent = DeviceAgent(cfg, world.clients, faults=DeviceFaults(throttle_bps=100_000))
    async with running([agent]):
        await world.notify(cfg, update_notice(cfg, 8, envelope(image, uris, key, chain.x5chain(key))))
        await wait_until(lambda: bool(world.log.campaign("c-cancel", 8)), 15, "downloading")
        await world.notify(cfg, cancel_notice(cfg, 8))
        assert await world.final(cfg, 8) == (LwState.IDLE, Result.CANCELLED)
