"""Evidence, install tokens and credentials: every refusal reason, from made-up inputs."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwcm import attestation as at
from fwcm import manifest

DEVICE_KEY = manifest.generate_private_key("es256")
SERVER_KEY = manifest.generate_private_key("eddsa")
TOKEN_KEY = at.token_key(SERVER_KEY)
NONCE = os.urandom(at.NONCE_BYTES)
MANIFEST = os.urandom(32)
IMAGE = os.urandom(32)


def evidence(key: manifest.PrivateKey = DEVICE_KEY, **kw: object) -> bytes:
    fields = {"nonce": NONCE, "device": "d1", "image_digest": os.urandom(32), "manifest_digest": MANIFEST}
    fields.update(kw)
    return at.make_evidence(key, at.Evidence(**fields))  # type: ignore[arg-type]


def check(data: bytes, **kw: object) -> at.Evidence:
    args: dict[str, object] = {
        "key": manifest.public_of(DEVICE_KEY),
        "device": "d1",
        "nonce": NONCE,
        "nonce_age_s": 1.0,
        "manifest_digest": MANIFEST,
    }
    args.update(kw)
    key = args.pop("key")
    return at.check_evidence(data, key, **args)  # type: ignore[arg-type]


def reason(fn: object, *a: object, **kw: object) -> str:
    with pytest.raises(at.AttestationError) as e:
        fn(*a, **kw)  # type: ignore[operator]
    return e.value.reason


def test_genuine_evidence_is_accepted() -> None:
    ev = check(evidence())
    assert ev.nonce == NONCE and ev.device == "d1" and ev.manifest_digest == MANIFEST


@pytest.mark.parametrize(
    ("data", "kw", "expected"),
    [
        (lambda: evidence(manifest.generate_private_key("es256")), {}, "bad_signature"),
        (lambda: evidence(device="d2"), {}, "wrong_device"),
        (lambda: evidence(), {"nonce": None}, "replayed"),
        (lambda: evidence(nonce=os.urandom(16)), {}, "stale_nonce"),
        (lambda: evidence(), {"nonce_age_s": at.NONCE_TTL_S + 1}, "expired"),
        (lambda: evidence(manifest_digest=os.urandom(32)), {}, "wrong_manifest"),
        (lambda: evidence(), {"key": None}, "no_key"),
        (lambda: b"\xa1\x01\x02", {}, "malformed"),
        (lambda: b"", {}, "malformed"),
    ],
    ids=[
        "forged",
        "wrong-device",
        "replayed",
        "stale",
        "expired",
        "wrong-manifest",
        "no-key",
        "map",
        "empty",
    ],
)
def test_evidence_refusals(data: object, kw: dict[str, object], expected: str) -> None:
    assert reason(check, data(), **kw) == expected  # type: ignore[operator]


def test_evidence_with_a_flipped_bit_is_refused() -> None:
    data = bytearray(evidence())
    data[-5] ^= 0x01
    assert reason(check, bytes(data)) in ("bad_signature", "malformed")


def grant(**kw: object) -> at.Grant:
    fields: dict[str, object] = {
        "tenant": "acme",
        "device": "d1",
        "manifest_digest": MANIFEST,
        "image_digest": IMAGE,
        "campaign": 7,
        "expires": 2_000,
    }
    fields.update(kw)
    return at.Grant(**fields)  # type: ignore[arg-type]


def check_token(data: bytes, **kw: object) -> at.Grant:
    args: dict[str, object] = {"tenant": "acme", "device": "d1", "image_digest": IMAGE, "now": 1_000.0}
    args.update(kw)
    return at.check_token(data, [TOKEN_KEY], **args)  # type: ignore[arg-type]


def test_token_for_the_right_device_and_image_is_accepted() -> None:
    g = check_token(at.issue_token(TOKEN_KEY, grant()))
    assert (g.tenant, g.device, g.campaign, g.expires) == ("acme", "d1", 7, 2_000)


@pytest.mark.parametrize(
    ("token", "kw", "expected"),
    [
        (lambda: at.issue_token(TOKEN_KEY, grant()), {"device": "d2"}, "wrong_device"),
        (lambda: at.issue_token(TOKEN_KEY, grant()), {"tenant": "other"}, "wrong_device"),
        (lambda: at.issue_token(TOKEN_KEY, grant()), {"image_digest": os.urandom(32)}, "wrong_payload"),
        (lambda: at.issue_token(TOKEN_KEY, grant()), {"now": 2_000.0}, "expired"),
        (
            lambda: at.issue_token(at.token_key(manifest.generate_private_key("eddsa")), grant()),
            {},
            "bad_signature",
        ),
        (lambda: at.issue_token(at.token_key(DEVICE_KEY), grant()), {}, "bad_signature"),  # nor a device
        (lambda: b"garbage", {}, "malformed"),
    ],
    ids=["other-device", "other-tenant", "other-image", "expired", "forged", "device-signed", "garbage"],
)
def test_token_refusals(token: object, kw: dict[str, object], expected: str) -> None:
    assert reason(check_token, token(), **kw) == expected  # type: ignore[operator]


def test_credential_round_trip_and_forgery() -> None:
    g = grant(sequence=3, installed_at=1_234)
    cred = at.issue_credential(SERVER_KEY, g)
    read = at.read_credential(cred, [manifest.public_of(SERVER_KEY)])
    assert (read.device, read.sequence, read.installed_at, read.image_digest) == ("d1", 3, 1_234, IMAGE)
    forged = at.issue_credential(DEVICE_KEY, g)
    assert reason(at.read_credential, forged, [manifest.public_of(SERVER_KEY)]) == "bad_signature"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_verify(data: bytes) -> None:
    with pytest.raises(at.AttestationError):
        at.open_sign1(data, [manifest.public_of(SERVER_KEY)])


@given(st.binary(max_size=64))
def test_base64url_round_trip(data: bytes) -> None:
    assert at.unb64(at.b64(data)) == data


def test_token_fits_one_coap_uri_query_option_whatever_the_names() -> None:
    """CoAP carries each Uri-Query option in at most 255 bytes (RFC 7252 5.10); the token is a
    fixed 36 bytes, 50 characters as ``t=`` in a query."""
    longest = grant(tenant="t" * 64, device="d" * 64, campaign=2**63 - 1, expires=2**32 - 1)
    token = at.issue_token(TOKEN_KEY, longest)
    assert len("t=" + at.b64(token)) == 50
    g = check_token(token, tenant="t" * 64, device="d" * 64, now=0.0)
    assert (g.tenant, g.device, g.campaign) == ("t" * 64, "d" * 64, 2**63 - 1)
