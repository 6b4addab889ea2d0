"""docs/vectors: the files are what the code generates today, and each vector decodes, verifies or
is refused through fwcm's own code exactly as the vector says."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from fwcm import attestation, manifest, protocol
from fwcm.conformance import vectors
from fwcm.protocol import Result

DOCS = Path(__file__).resolve().parents[2] / "docs" / "vectors"


def load(name: str) -> dict[str, Any]:
    return json.loads((DOCS / name).read_text())


def test_docs_vectors_are_what_the_code_generates() -> None:
    generated = vectors.generate()
    assert sorted(p.name for p in DOCS.glob("*.json")) == sorted(generated)
    for name, text in generated.items():
        assert (DOCS / name).read_text() == text, (
            f"docs/vectors/{name} is stale: run python -m fwcm.conformance.vectors --write docs/vectors"
        )


def test_generation_is_deterministic() -> None:
    assert vectors.generate() == vectors.generate()


def test_the_documented_password_example() -> None:
    device = load("keys.json")["device"]
    assert device["mqtt_password"] == "PbWzyygP3BefeNWtT0hiXxTm03boYCb3-gMEAeuneQw"
    assert device["mqtt_username"] == "acme/dev-1"
    assert (DOCS.parent / "protocol.md").read_text().count(device["mqtt_password"]) >= 1


def secret() -> bytes:
    return bytes.fromhex(load("keys.json")["device"]["secret"])


@pytest.mark.parametrize("kind", ["notices", "reports"])
def test_message_vectors(kind: str) -> None:
    decode = protocol.decode_notice if kind == "notices" else protocol.decode_report
    encode: Any = protocol.encode_notice if kind == "notices" else protocol.encode_report
    cases = load("messages.json")[kind]
    assert cases
    for case in cases:
        data = bytes.fromhex(case["hex"])
        if case["expect"] == "ok":
            message = decode(data, secret())
            assert encode(secret(), message) == data, case["name"]  # deterministic CBOR both ways
            assert message.device == "dev-1"
        else:
            with pytest.raises(protocol.ProtocolError) as refused:
                decode(data, secret())
            assert case["expect"] == f"refused: {refused.value.reason}", case["name"]


def device_verdict(envelope: bytes, trusted: manifest.PublicKey, served: bytes, installed: int) -> str:
    """What a device does with an update (docs/protocol.md, "Order of messages"), through fwcm's code."""
    try:
        env = manifest.decode_envelope(envelope)
    except manifest.ManifestError:
        return f"refused: {Result.UNSUPPORTED_PACKAGE.value}"
    try:
        manifest.verify_envelope(env, [trusted])
    except manifest.SignatureError:
        return f"refused: {Result.SIGNATURE_INVALID.value}"
    keys = load("keys.json")["device"]
    if (str(env.info.vendor_id), str(env.info.class_id)) != (keys["vendor_id"], keys["class_id"]):
        return f"refused: {Result.CONDITION_MISMATCH.value}"
    if env.info.sequence < installed:
        return f"refused: {Result.ROLLBACK_REFUSED.value}"
    if env.info.sequence == installed:
        return f"refused: {Result.UP_TO_DATE.value}"
    if hashlib.sha256(served).digest() != env.info.image_digest or len(served) != env.info.image_size:
        return f"refused: {Result.INTEGRITY_FAILURE.value}"
    return "ok"


def test_manifest_vectors() -> None:
    doc = load("manifests.json")
    keys = load("keys.json")["keys"]
    image = bytes.fromhex(doc["image"])
    assert hashlib.sha256(image).hexdigest() == doc["image_sha256"]
    seen = set()
    for case in doc["vectors"]:
        trusted = manifest.load_public_key(keys[case["trusted_key"]]["public_pem"].encode())
        served = image if case["served_image"] == "IMAGE" else bytes.fromhex(case["served_image"])
        assert hashlib.sha256(served).hexdigest() == case["served_image_sha256"]
        verdict = device_verdict(bytes.fromhex(case["envelope"]), trusted, served, doc["installed_sequence"])
        assert verdict == case["expect"], case["name"]
        seen.add(case["expect"])
    assert seen == {
        "ok",
        "refused: 5",
        "refused: 6",
        "refused: 12",
        "refused: 13",
        "refused: 14",
        "refused: 15",
    }


def test_good_manifests_carry_their_algorithm() -> None:
    algs = {
        case["name"]: manifest.decode_envelope(bytes.fromhex(case["envelope"])).signatures[0].alg
        for case in load("manifests.json")["vectors"]
        if case["name"].startswith("good-")
    }
    assert algs == {"good-esp256": -9, "good-es256": -7, "good-ed25519": -19, "good-eddsa": -8}


def judge_evidence(case: dict[str, Any], doc: dict[str, Any], key: manifest.PublicKey) -> str:
    try:
        ev = attestation.check_evidence(
            bytes.fromhex(case["hex"]),
            key,
            device="dev-1",
            nonce=bytes.fromhex(doc["nonce"]),
            nonce_age_s=1.0,
            manifest_digest=bytes.fromhex(doc["manifest_digest"]),
        )
    except attestation.AttestationError as exc:
        return f"refused: {exc.reason}"
    assert ev.image_digest.hex() == doc["running_image_sha256"]
    return "ok"


def judge_token(case: dict[str, Any], doc: dict[str, Any], key: bytes, image_digest: bytes) -> str:
    token = bytes.fromhex(case["hex"])
    assert len(token) == attestation.TOKEN_BYTES == 36
    try:
        grant = attestation.check_token(
            token,
            [key],
            tenant="acme",
            device="dev-1",
            image_digest=image_digest,
            now=case.get("now", doc["now"]),
        )
    except attestation.AttestationError as exc:
        return f"refused: {exc.reason}"
    assert grant.campaign == 8
    return "ok"


def test_attestation_vectors() -> None:
    doc = load("attestation.json")
    keys = load("keys.json")["keys"]
    registered = {
        label: manifest.load_public_key(keys[label]["public_pem"].encode())
        for label in ("attestation-ed25519", "attestation-p256")
    }
    for case in doc["evidence"]:
        # the last case is signed by a key other than the one registered for the device
        key = registered[
            "attestation-ed25519" if case["name"] == "evidence-unregistered-key" else case["key"]
        ]
        assert judge_evidence(case, doc, key) == case["expect"], case["name"]
    token_key = bytes.fromhex(doc["tokens"][0]["token_key"])
    image_digest = bytes.fromhex(load("manifests.json")["image_sha256"])
    for case in doc["tokens"]:
        assert judge_token(case, doc, token_key, image_digest) == case["expect"], case["name"]
    token = doc["tokens"][0]
    assert token["query"].endswith("t=" + attestation.b64(bytes.fromhex(token["hex"])))
    assert len(attestation.b64(bytes.fromhex(token["hex"]))) == 48  # 36 bytes: base64url without padding
    server = manifest.load_public_key(keys["server-ed25519"]["public_pem"].encode())
    grant = attestation.read_credential(bytes.fromhex(doc["credentials"][0]["hex"]), [server])
    assert (grant.tenant, grant.device, grant.sequence, grant.campaign) == ("acme", "dev-1", 3, 8)
