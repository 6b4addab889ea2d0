"""SUIT envelope codec: round trips, byte-level vectors, the draft's own example, signature checks."""

from __future__ import annotations

import hashlib
import uuid

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils

from fwcm.manifest import (
    ManifestError,
    ManifestInfo,
    SignatureError,
    build_envelope,
    class_id_for,
    decode_envelope,
    generate_private_key,
    key_alg,
    key_id,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
    vendor_id_for_domain,
    verify_envelope,
)

IMAGE = b"fwcm test image\n" * 64
VENDOR = vendor_id_for_domain("example.com")
CLASS = class_id_for(VENDOR, "sensor-v1")
SEED = bytes(range(32))


def make_info(uris: tuple[str, ...] = ("coap://127.0.0.1/p/x", "http://127.0.0.1:8080/p/x")) -> ManifestInfo:
    return ManifestInfo(
        sequence=7,
        vendor_id=VENDOR,
        class_id=CLASS,
        image_digest=hashlib.sha256(IMAGE).digest(),
        image_size=len(IMAGE),
        uris=uris,
    )


def fixed_ed25519() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(SEED)


# draft-ietf-suit-manifest-27, Appendix B.2 (Example 1), signed with the draft's P-256 example key, ESP256.
DRAFT_EXAMPLE_1 = bytes.fromhex(
    "d86ba2025873825824822f58201f2e7acca0dc2786f2fe4eb947f50873a6"
    "a3cfaa98866c5b02e621f42074daf2584ad28443a10128a0f65840991492"
    "41cc392690aa15590cc0d97b8bf5084b3efbf2ca82f33179eed6e7370e44"
    "517bdd75f5bab97773fca4601e1ada8a5068619de0c648c1208e5a16141d"
    "21035894a50101020103585fa202818141000458568614a40150fa6b4a53"
    "d5ad5fdfbe9de663e4d41ffe02501492af1425695e48bf429b2d51f2ab45"
    "035824822f582000112233445566778899aabbccddeeff0123456789abcd"
    "effedcba98765432100e1987d0010f020f074382030f1458258614a11578"
    "1b687474703a2f2f6578616d706c652e636f6d2f66696c652e62696e1502"
    "030f"
)
DRAFT_PUBLIC_KEY = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEhJaBGq4LqqvSYVcYnuzaJr6qi/Eb
bz/m4rVlnIXbwK07HypLbAmBMcCjbazR14vTgdzfsJwFLbM5kdtzOLSolg==
-----END PUBLIC KEY-----
"""


# --- keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["es256", "eddsa"])
def test_key_pem_round_trip(alg: str) -> None:
    key = generate_private_key(alg)
    assert key_alg(key) == alg
    priv_pem = private_key_pem(key)
    pub_pem = public_key_pem(key)
    assert priv_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    again = load_private_key(priv_pem)
    assert key_id(again) == key_id(key) == key_id(load_public_key(pub_pem))
    assert len(key_id(key)) == 32
    assert public_key_pem(load_public_key(pub_pem)) == pub_pem


def test_key_errors() -> None:
    with pytest.raises(ManifestError):
        generate_private_key("rsa")
    with pytest.raises(ManifestError):
        load_private_key(b"not a key")
    with pytest.raises(ManifestError):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ManifestError, match="unsupported"):
        load_public_key(_pem(p384))
    # a public key where a private one is expected
    with pytest.raises(ManifestError):
        load_private_key(public_key_pem(generate_private_key()))


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_uuid5_convention() -> None:
    assert uuid.uuid5(uuid.NAMESPACE_DNS, "example.com") == VENDOR
    assert uuid.uuid5(VENDOR, "sensor-v1") == CLASS
    assert VENDOR.version == 5 and CLASS.version == 5


# --- round trips ------------------------------------------------------------------------------------


LEGACY_ALGS = {"es256": -7, "eddsa": -8}
FULLY_SPECIFIED_ALGS = {"es256": -9, "eddsa": -19}


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("alg", ["es256", "eddsa"])
@pytest.mark.parametrize("uris", [("coap://h/p/1",), ("coap://h/p/1", "http://h/p/1", "https://cdn/p/1")])
def test_round_trip(alg: str, uris: tuple[str, ...], legacy: bool) -> None:
    key = generate_private_key(alg)
    info = make_info(uris)
    raw = build_envelope(info, key, alg=LEGACY_ALGS[alg] if legacy else None)
    env = decode_envelope(raw)
    assert env.info == info
    assert env.raw == raw
    assert env.digest == hashlib.sha256(env.manifest_bstr).digest()
    (sig,) = env.signatures
    assert sig.alg == (LEGACY_ALGS if legacy else FULLY_SPECIFIED_ALGS)[alg]
    assert sig.kid == key_id(key)
    assert sig.x5chain == ()
    other = generate_private_key(alg).public_key()
    assert key_id(verify_envelope(env, [other, key.public_key()])) == key_id(key)


@pytest.mark.parametrize("chain", [[b"\x30\x03\x02\x01\x01"], [b"\x30\x01\x00", b"\x30\x02\x01\x00"]])
def test_x5chain_in_protected_header(chain: list[bytes]) -> None:
    key = generate_private_key("es256")
    env = decode_envelope(build_envelope(make_info(), key, x5chain=chain))
    assert env.signatures[0].x5chain == tuple(chain)
    protected = cbor2.loads(env.signatures[0].protected)
    assert protected[33] == (chain[0] if len(chain) == 1 else chain)
    verify_envelope(env, [key.public_key()])


@pytest.mark.parametrize(
    "bad",
    [
        {"sequence": -1},
        {"sequence": 2**64},
        {"image_digest": b"\x00" * 31},
        {"image_size": -5},
        {"uris": ()},
        {"uris": ("",)},
        {"vendor_id": "not-a-uuid"},
    ],
)
def test_build_rejects_bad_info(bad: dict[str, object]) -> None:
    fields = make_info().__dict__ | bad
    with pytest.raises(ManifestError):
        build_envelope(ManifestInfo(**fields), generate_private_key())  # type: ignore[arg-type]


# --- byte-level vectors -----------------------------------------------------------------------------


def test_envelope_layout_bytes() -> None:
    raw = build_envelope(make_info(("coap://h/p",)), fixed_ed25519(), alg=-8)
    assert raw[:2] == b"\xd8\x6b"  # tag 107
    assert raw[2] == 0xA2  # map(2)
    assert raw[3] == 0x02  # authentication-wrapper
    top = cbor2.loads(raw)
    assert list(top.value) == [2, 3]
    auth_bytes, manifest = top.value[2], top.value[3]
    auth = cbor2.loads(auth_bytes)
    # SUIT_Digest: bstr-wrapped [-16, h'…32 bytes…'] = 82 2f 58 20 …
    assert auth[0][:4] == b"\x82\x2f\x58\x20"
    manifest_bstr = cbor2.dumps(manifest)
    assert len(manifest) < 256 and manifest_bstr == b"\x58" + bytes([len(manifest)]) + manifest
    assert raw.endswith(b"\x03" + manifest_bstr)  # key 3, then the bstr-wrapped manifest as hashed
    assert auth[0][4:] == hashlib.sha256(manifest_bstr).digest()
    assert auth[0][4:] != hashlib.sha256(manifest).digest()  # the bstr header is included
    sign1 = cbor2.loads(auth[1])
    assert sign1.tag == 18
    protected, unprotected, payload, signature = sign1.value
    assert protected == b"\xa1\x01\x27"  # {1: -8}
    assert unprotected == {4: key_id(fixed_ed25519())}
    assert payload is None
    # the detached payload is the encoded SUIT_Digest
    sig_structure = cbor2.dumps(["Signature1", protected, b"", auth[0]])
    fixed_ed25519().public_key().verify(signature, sig_structure)

    m = cbor2.loads(manifest)
    assert list(m) == [1, 2, 3, 7, 16, 20]
    assert m[1] == 1 and m[2] == 7
    common = cbor2.loads(m[3])
    assert common[2] == [[b"fw"]]
    shared = cbor2.loads(common[4])
    assert shared[:3] == [12, 0, 20]
    params = shared[3]
    assert list(params) == [1, 2, 3, 14]
    assert params[1] == VENDOR.bytes and params[2] == CLASS.bytes
    assert params[3] == b"\x82\x2f\x58\x20" + hashlib.sha256(IMAGE).digest()
    assert params[14] == len(IMAGE)
    assert shared[4:] == [1, 15, 2, 15]
    assert cbor2.loads(m[7]) == [3, 15]
    assert cbor2.loads(m[16]) == [20, {21: "coap://h/p"}, 21, 2, 3, 15]
    assert cbor2.loads(m[20]) == [3, 15]


def test_try_each_layout() -> None:
    raw = build_envelope(make_info(("coap://a/p", "http://b/p")), fixed_ed25519())
    m = cbor2.loads(cbor2.loads(raw).value[3])
    fetch = cbor2.loads(m[16])
    assert fetch[0] == 15 and len(fetch) == 2
    options = [cbor2.loads(o) for o in fetch[1]]
    assert options == [
        [20, {21: "coap://a/p"}, 21, 2, 3, 15],
        [20, {21: "http://b/p"}, 21, 2, 3, 15],
    ]


def test_deterministic_eddsa_vector() -> None:
    """Ed25519 is deterministic, so a fixed key and info give fixed bytes: any encoding change shows here."""
    info = make_info()
    raw = build_envelope(info, fixed_ed25519(), alg=-8)
    assert raw == build_envelope(info, fixed_ed25519(), alg=-8)
    assert len(raw) == 349
    assert (
        hashlib.sha256(raw).hexdigest() == "b1a6d6aa2bedf853d5edc1f8ab806632b961e8e634ccf334a4724cecc0259466"
    )
    env = decode_envelope(raw)
    assert env.info == info
    assert env.info.vendor_id == uuid.UUID("cfbff0d1-9375-5685-968c-48ce8b15ae17")
    verify_envelope(env, [fixed_ed25519().public_key()])


def test_canonical_map_order() -> None:
    raw = build_envelope(make_info(), fixed_ed25519())
    top = cbor2.loads(raw)
    assert cbor2.dumps(top, canonical=True) == raw
    m = cbor2.loads(top.value[3])
    assert cbor2.dumps(m, canonical=True) == top.value[3]


# --- the draft's own example ------------------------------------------------------------------------


def test_draft_example_decodes_and_verifies_esp256() -> None:
    env = decode_envelope(DRAFT_EXAMPLE_1)
    assert env.digest.hex() == "1f2e7acca0dc2786f2fe4eb947f50873a6a3cfaa98866c5b02e621f42074daf2"
    assert env.info == ManifestInfo(
        sequence=1,
        vendor_id=uuid.UUID("fa6b4a53-d5ad-5fdf-be9d-e663e4d41ffe"),
        class_id=uuid.UUID("1492af14-2569-5e48-bf42-9b2d51f2ab45"),
        image_digest=bytes.fromhex("00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210"),
        image_size=34768,
        uris=("http://example.com/file.bin",),
        component_id=(b"\x00",),
    )
    (sig,) = env.signatures
    assert sig.alg == -9 and sig.kid is None
    key = load_public_key(DRAFT_PUBLIC_KEY)
    assert verify_envelope(env, [key]) is key
    with pytest.raises(SignatureError):
        verify_envelope(env, [generate_private_key("es256").public_key()])


def _sign1_envelope(alg: int, key: ec.EllipticCurvePrivateKey, info: ManifestInfo) -> bytes:
    """Assemble an envelope by hand so the algorithm id can be chosen (ESP256 is never produced)."""
    built = cbor2.loads(build_envelope(info, key))
    manifest = built.value[3]
    suit_digest = cbor2.dumps([-16, hashlib.sha256(cbor2.dumps(manifest)).digest()])
    protected = cbor2.dumps({1: alg})
    der = key.sign(cbor2.dumps(["Signature1", protected, b"", suit_digest]), ec.ECDSA(hashes.SHA256()))
    r, s = utils.decode_dss_signature(der)
    sign1 = cbor2.CBORTag(18, [protected, {4: key_id(key)}, None, r.to_bytes(32) + s.to_bytes(32)])
    auth = cbor2.dumps([suit_digest, cbor2.dumps(sign1)])
    return cbor2.dumps(cbor2.CBORTag(107, {2: auth, 3: manifest}), canonical=True)


def test_esp256_accepted_when_verifying() -> None:
    key = generate_private_key("es256")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    env = decode_envelope(_sign1_envelope(-9, key, make_info()))
    assert env.signatures[0].alg == -9
    assert key_id(verify_envelope(env, [key.public_key()])) == key_id(key)


def test_unknown_alg_refused() -> None:
    key = generate_private_key("es256")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    with pytest.raises(ManifestError, match="algorithm"):
        decode_envelope(_sign1_envelope(-35, key, make_info()))


# --- signature failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["es256", "eddsa"])
def test_wrong_key(alg: str) -> None:
    env = decode_envelope(build_envelope(make_info(), generate_private_key(alg)))
    with pytest.raises(SignatureError, match="unknown key"):
        verify_envelope(env, [generate_private_key("es256").public_key(), generate_private_key("eddsa")])
    with pytest.raises(SignatureError, match="no trusted keys"):
        verify_envelope(env, [])


def test_kid_matches_but_signature_bad() -> None:
    key = generate_private_key("eddsa")
    top = cbor2.loads(build_envelope(make_info(), key))
    auth = cbor2.loads(top.value[2])
    sign1 = cbor2.loads(auth[1])
    fields = list(sign1.value)
    fields[3] = bytes([fields[3][0] ^ 0x80]) + fields[3][1:]
    auth[1] = cbor2.dumps(cbor2.CBORTag(18, fields))
    tampered = cbor2.dumps(cbor2.CBORTag(107, {2: cbor2.dumps(auth), 3: top.value[3]}), canonical=True)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(decode_envelope(tampered), [key.public_key()])


def test_digest_mismatch_is_refused() -> None:
    key = generate_private_key("eddsa")
    top = cbor2.loads(build_envelope(make_info(), key))
    other = cbor2.loads(build_envelope(make_info(("coap://elsewhere/p",)), key))
    swapped = cbor2.dumps(cbor2.CBORTag(107, {2: top.value[2], 3: other.value[3]}), canonical=True)
    with pytest.raises(ManifestError, match="digest does not match"):
        decode_envelope(swapped)


# --- malformed envelopes name their problem ---------------------------------------------------------


def _parts() -> tuple[bytes, list[object], list[object], bytes]:
    top = cbor2.loads(build_envelope(make_info(), fixed_ed25519()))
    auth = list(cbor2.loads(top.value[2]))
    sign1 = list(cbor2.loads(auth[1]).value)
    return top.value[2], auth, sign1, top.value[3]


def _with_sign1(sign1: list[object]) -> bytes:
    _, auth, _, manifest = _parts()
    auth[1] = cbor2.dumps(cbor2.CBORTag(18, sign1))
    return cbor2.dumps(cbor2.CBORTag(107, {2: cbor2.dumps(auth), 3: manifest}), canonical=True)


def _case(name: str) -> bytes:
    auth_bytes, auth, sign1, manifest = _parts()
    valid = cbor2.dumps(cbor2.CBORTag(107, {2: auth_bytes, 3: manifest}), canonical=True)
    if name == "unsigned":
        return cbor2.dumps(cbor2.CBORTag(107, {3: manifest}))
    if name == "untagged":
        return cbor2.dumps({2: auth_bytes, 3: manifest}, canonical=True)
    if name == "extra-key":
        return cbor2.dumps(cbor2.CBORTag(107, {2: auth_bytes, 3: manifest, 24: b"text"}), canonical=True)
    if name == "trailing":
        return valid + b"\x00"
    if name == "non-canonical":
        return valid[:2] + b"\xb8\x02" + valid[3:]  # map(2) with a one-byte length argument
    if name == "indefinite":
        return b"\xd8\x6b\xbf" + valid[3:] + b"\xff"
    if name == "duplicate-key":
        return valid[:2] + b"\xa3" + valid[3:] + b"\x02\x40"
    if name == "unprotected-x5chain":
        return _with_sign1([sign1[0], {4: sign1[1][4], 33: b"\x30\x00"}, None, sign1[3]])  # type: ignore[index]
    if name == "attached-payload":
        return _with_sign1([sign1[0], sign1[1], auth[0], sign1[3]])
    if name == "short-signature":
        return _with_sign1([sign1[0], sign1[1], None, b"\x00" * 63])
    if name == "crit-header":
        return _with_sign1([cbor2.dumps({1: -8, 2: [99]}), sign1[1], None, sign1[3]])
    if name == "huge-sequence":
        m = dict(cbor2.loads(manifest))
        m[2] = 2**64
        new = cbor2.dumps(m, canonical=True)
        digest = cbor2.dumps([-16, hashlib.sha256(cbor2.dumps(new)).digest()])
        return cbor2.dumps(cbor2.CBORTag(107, {2: cbor2.dumps([digest, auth[1]]), 3: new}), canonical=True)
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("unsigned", "authentication-wrapper missing"),
        ("untagged", "tag 107"),
        ("extra-key", "unsupported key 24"),
        ("trailing", "trailing bytes"),
        ("non-canonical", "deterministically"),
        ("indefinite", "malformed CBOR"),
        ("duplicate-key", "malformed CBOR"),
        ("unprotected-x5chain", "unprotected header: unsupported key 33"),
        ("attached-payload", "detached"),
        ("short-signature", "64 bytes"),
        ("crit-header", "protected header: unsupported key 2"),
        ("huge-sequence", "sequence-number"),
    ],
)
def test_malformed_envelopes(name: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        decode_envelope(_case(name))


@pytest.mark.parametrize("data", [b"", b"\xd8\x6b", "text", None, b"\x00" * (256 * 1024 + 1)])
def test_not_bytes_or_empty(data: object) -> None:
    with pytest.raises(ManifestError):
        decode_envelope(data)  # type: ignore[arg-type]
