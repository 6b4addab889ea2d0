"""The notifier against fake notice senders: which notice each device gets, what it carries, and
when it is built. The fakes stand behind the one seam the transports really implement
(:class:`fwcm.transport.notices.NoticeSender`)."""

from __future__ import annotations

import hashlib
import time

import pytest

from fwcm import attestation, manifest, protocol
from fwcm.protocol import (
    NOTICE_CREDENTIAL,
    NOTICE_LIMITS,
    NOTICE_PREPARE,
    NOTICE_REASON,
    NOTICE_TOKEN,
    Invitation,
    Notice,
    NoticeKind,
    UsageLimits,
)
from fwcm.rollout.consent import ConsentSpec
from fwcm.server.metrics import REGISTRY
from fwcm.server.notices import Notifier
from fwcm.store.deployments import Target
from fwcm.transport.notices import NoticeSender, Render

SERVER_KEY = manifest.generate_private_key("eddsa")
IMAGE = b"firmware image " * 64
MANIFEST_ID, CAMPAIGN = 3, 7
SECRETS = {"m1": b"m" * 32, "c1": b"c" * 32, "x1": b"x" * 32}


class FakeSender(NoticeSender):
    """Records what it is asked to carry. ``eager`` renders at once (as MQTT publishes the notice),
    otherwise it keeps the render for when the device reads its notice (as a CoAP observation)."""

    def __init__(self, *, eager: bool) -> None:
        self.eager = eager
        self.sent: list[tuple[str, str, bytes | None]] = []
        self.renders: list[Render] = []

    def send_notice(self, tenant: str, device: str, render: Render) -> bool:
        self.sent.append((tenant, device, render() if self.eager else None))
        self.renders.append(render)
        return True


def envelope() -> bytes:
    vendor = manifest.vendor_id_for_domain("example.com")
    info = manifest.ManifestInfo(
        sequence=2,
        vendor_id=vendor,
        class_id=manifest.class_id_for(vendor, "sensor-v1"),
        image_digest=hashlib.sha256(IMAGE).digest(),
        image_size=len(IMAGE),
        uris=("http://127.0.0.1/p/x",),
    )
    return manifest.build_envelope(info, manifest.generate_private_key("es256"))


def target(name: str, transport: str = "mqtt", tenant: str = "acme", **kw: object) -> Target:
    return Target(1, tenant, name, transport, SECRETS[name], 2, **kw)  # type: ignore[arg-type]


@pytest.fixture
def mqtt() -> FakeSender:
    return FakeSender(eager=True)


@pytest.fixture
def coap() -> FakeSender:
    return FakeSender(eager=False)


@pytest.fixture
def notifier(mqtt: FakeSender, coap: FakeSender) -> Notifier:
    n = Notifier(senders={"mqtt": mqtt, "coap": coap})
    n.envelopes[MANIFEST_ID] = envelope()
    n.signing_key = SERVER_KEY
    n.token_key = attestation.token_key(SERVER_KEY)
    return n


def opened(data: bytes | None, name: str) -> Notice:
    assert data is not None
    return protocol.decode_notice(data, SECRETS[name])


def sent_count(transport: str, kind: str) -> float:
    labels = {"transport": transport, "kind": kind}
    return REGISTRY.get_sample_value("fwcm_notices_sent_total", labels) or 0.0


def test_each_device_is_told_through_the_sender_of_its_transport(
    notifier: Notifier, mqtt: FakeSender, coap: FakeSender
) -> None:
    before = sent_count("coap", "cancel")
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.UPDATE, MANIFEST_ID)
    notifier.send(target("c1", "coap"), CAMPAIGN, NoticeKind.CANCEL, MANIFEST_ID)
    assert [(t, d) for t, d, _ in mqtt.sent] == [("acme", "m1")]
    assert [(t, d) for t, d, _ in coap.sent] == [("acme", "c1")]
    update = opened(mqtt.sent[0][2], "m1")
    assert (update.kind, update.device, update.campaign, update.attempt) == (NoticeKind.UPDATE, "m1", 7, 2)
    cancel = opened(coap.renders[0](), "c1")
    assert (cancel.kind, cancel.device, cancel.campaign) == (NoticeKind.CANCEL, "c1", 7)
    assert sent_count("coap", "cancel") == before + 1


def test_a_transport_without_a_sender_is_skipped(mqtt: FakeSender) -> None:
    """A server started without CoAP still notifies its MQTT devices."""
    notifier = Notifier(senders={"mqtt": mqtt})
    notifier.send(target("c1", "coap"), CAMPAIGN, NoticeKind.CANCEL, MANIFEST_ID)
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.CANCEL, MANIFEST_ID)
    assert [d for _, d, _ in mqtt.sent] == ["m1"]


def test_the_kind_decides_what_a_notice_carries(notifier: Notifier, mqtt: FakeSender) -> None:
    notifier.windows[CAMPAIGN] = (1_700_000_000, 1_700_003_600)
    nonce = b"n" * 16
    notifier.send(target("m1", nonce=nonce), CAMPAIGN, NoticeKind.UPDATE, MANIFEST_ID)
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.CANCEL, MANIFEST_ID, reason="why " * 40)
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.CREDENTIAL, MANIFEST_ID)
    update, cancel, credential = (opened(data, "m1") for _, _, data in mqtt.sent)
    assert update.envelope == notifier.envelopes[MANIFEST_ID]
    assert update.nonce == nonce and update.window == (1_700_000_000, 1_700_003_600)
    assert cancel.envelope is None and cancel.nonce is None and cancel.window is None
    assert cancel.extra[NOTICE_REASON] == ("why " * 40)[:100]
    grant = attestation.read_credential(credential.extra[NOTICE_CREDENTIAL], [manifest.public_of(SERVER_KEY)])
    assert (grant.tenant, grant.device, grant.campaign, grant.sequence) == ("acme", "m1", CAMPAIGN, 2)
    assert grant.image_digest == hashlib.sha256(IMAGE).digest()


def test_install_tokens_go_to_attested_devices_only(notifier: Notifier, mqtt: FakeSender) -> None:
    attested = target("m1", attested=True)
    notifier.send(attested, CAMPAIGN, NoticeKind.UPDATE, MANIFEST_ID)
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.UPDATE, MANIFEST_ID)
    notifier.send(attested, CAMPAIGN, NoticeKind.CANCEL, MANIFEST_ID)
    with_token, without, cancel = (opened(data, "m1") for _, _, data in mqtt.sent)
    assert NOTICE_TOKEN not in without.extra and NOTICE_TOKEN not in cancel.extra
    assert notifier.token_key is not None
    grant = attestation.check_token(
        with_token.extra[NOTICE_TOKEN],
        [notifier.token_key],
        tenant="acme",
        device="m1",
        image_digest=hashlib.sha256(IMAGE).digest(),
        now=time.time(),
    )
    assert grant.campaign == CAMPAIGN


def test_revoked_key_ids_reach_every_notice_of_their_tenant(notifier: Notifier, mqtt: FakeSender) -> None:
    kid = hashlib.sha256(b"revoked signer").digest()
    notifier.revoked["acme"] = (kid,)
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.UPDATE, MANIFEST_ID)
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.CANCEL, MANIFEST_ID)
    notifier.send(target("x1", tenant="other"), CAMPAIGN, NoticeKind.UPDATE, MANIFEST_ID)
    update, cancel = opened(mqtt.sent[0][2], "m1"), opened(mqtt.sent[1][2], "m1")
    assert update.revoked == cancel.revoked == (kid,)
    assert opened(mqtt.sent[2][2], "x1").revoked == ()


def test_consent_campaigns_invite_and_limit(notifier: Notifier, mqtt: FakeSender) -> None:
    spec = ConsentSpec.parse(
        {
            "deadline": "10m",
            "options": {"variant": ["basic", "pro"]},
            "group": True,
            "max_uses": 3,
            "expires_after": "1h",
            "accounting_every": "1m",
            "requester": "Acme Service",
        }
    )
    notifier.consent_notices(CAMPAIGN, "spring", spec, deadline=1_700_000_600.9)
    notifier.consent_notices(8, "plain", ConsentSpec.parse({"deadline": "10m"}), deadline=1_700_000_000)
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.INVITE, MANIFEST_ID)
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.UPDATE, MANIFEST_ID)
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.CANCEL, MANIFEST_ID)
    notifier.send(target("m1"), 8, NoticeKind.UPDATE, MANIFEST_ID)
    notifier.send(target("m1"), 8, NoticeKind.INVITE, MANIFEST_ID)
    invite, update, cancel, plain_update, plain_invite = (opened(data, "m1") for _, _, data in mqtt.sent)
    assert invite.invitation == Invitation(
        requester="Acme Service",
        campaign_name="spring",
        options={"variant": ("basic", "pro")},
        deadline=1_700_000_600,
        initiator="",
    )
    assert invite.limits is None and invite.envelope is None
    assert update.extra[NOTICE_PREPARE] is True
    assert update.limits == UsageLimits(max_uses=3, expires_after_s=3600, accounting_every_s=60)
    assert update.invitation is None
    assert NOTICE_PREPARE not in cancel.extra and cancel.limits is None
    assert NOTICE_PREPARE not in plain_update.extra and NOTICE_LIMITS not in plain_update.extra
    assert plain_invite.invitation == Invitation("", "plain", {}, 1_700_000_000, "")


def test_coap_renders_on_demand_mqtt_sends_the_bytes_of_the_moment(
    notifier: Notifier, mqtt: FakeSender, coap: FakeSender
) -> None:
    """An MQTT device gets the notice as it was when sent; a CoAP device reads it when woken, as it
    stands then (a revocation in between is in it)."""
    notifier.send(target("m1"), CAMPAIGN, NoticeKind.UPDATE, MANIFEST_ID)
    notifier.send(target("c1", "coap"), CAMPAIGN, NoticeKind.UPDATE, MANIFEST_ID)
    assert coap.sent == [("acme", "c1", None)]  # woken, nothing built yet
    kid = hashlib.sha256(b"revoked since").digest()
    notifier.revoked["acme"] = (kid,)
    assert opened(mqtt.sent[0][2], "m1").revoked == ()
    assert opened(coap.renders[0](), "c1").revoked == (kid,)
