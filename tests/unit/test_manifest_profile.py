"""SUIT profile breadth: fully-specified algorithms, the text section and severable members,
multi-component manifests. Byte vectors pin the encodings; the draft's Example 2 checks interop."""

from __future__ import annotations

import hashlib
import uuid

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fwcm.manifest import (
    Component,
    ComponentText,
    DeltaPatch,
    ManifestError,
    ManifestInfo,
    ManifestText,
    SignatureError,
    build_envelope,
    class_id_for,
    decode_envelope,
    generate_private_key,
    key_id,
    load_public_key,
    sever,
    vendor_id_for_domain,
    verify_envelope,
)
from fwcm.manifest.encode import encode_manifest

VENDOR = vendor_id_for_domain("example.com")
CLASS = class_id_for(VENDOR, "sensor-v1")
APP = b"application image\n" * 40
RADIO = b"radio core image\n" * 25


def fixed_ed25519() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def single(**extra: object) -> ManifestInfo:
    fields: dict[str, object] = {
        "sequence": 3,
        "vendor_id": VENDOR,
        "class_id": CLASS,
        "image_digest": hashlib.sha256(APP).digest(),
        "image_size": len(APP),
        "uris": ("coap://h/p/app",),
    }
    return ManifestInfo(**(fields | extra))  # type: ignore[arg-type]


def two_components(**extra: object) -> ManifestInfo:
    radio = Component(
        id=(b"radio",),
        image_digest=hashlib.sha256(RADIO).digest(),
        image_size=len(RADIO),
        uris=("coap://h/p/radio", "http://h/p/radio"),
    )
    return single(component_id=(b"app",), extra_components=(radio,), **extra)


TEXT = ManifestText(
    language="en",
    manifest_description="sensor firmware 2.1",
    components=(
        ((b"fw",), ComponentText(vendor_name="Example Ltd", model_name="sensor-v1", version="2.1.0")),
    ),
)


# draft-ietf-suit-manifest, Example 2 (examples/example2.txt of the manifest-spec repository): severable
# install and text, reference-uri and invoke, signed ES256 with the draft's example key.
DRAFT_EXAMPLE_2 = bytes.fromhex(
    "d86ba4025873825824822f58206a5197ed8f9dccf733d1c89a359441708e"
    "070b4c6dcb9a1c2c82c6165f609b90584ad28443a10126a0f65840073d8d"
    "80ca67d61cdf04d813c748b2de98fe786fc67b764431307c8dbcbe91dc6f"
    "762c2c4d7bb998ff9ead4798e03c8ee26b89ef7a9ad4569f6e187ce89e16"
    "c50358d1a80101020203585fa202818141000458568614a40150fa6b4a53"
    "d5ad5fdfbe9de663e4d41ffe02501492af1425695e48bf429b2d51f2ab45"
    "035824822f582000112233445566778899aabbccddeeff0123456789abcd"
    "effedcba98765432100e1987d0010f020f047468747470733a2f2f676974"
    "2e696f2f4a4a596f6a074382030f094382170214822f5820cfa90c5c5859"
    "5e7f5119a72f803fd0370b3e6abbec6315cd38f63135281bc49817822f58"
    "20302196d452bce5e8bfeaf71e395645ede6d365e63507a081379721eeec"
    "f0000714583c8614a1157832687474703a2f2f6578616d706c652e636f6d"
    "2f766572792f6c6f6e672f706174682f746f2f66696c652f66696c652e62"
    "696e1502030f1759020ba165656e2d5553a20179019d2323204578616d70"
    "6c6520323a2053696d756c74616e656f757320446f776e6c6f61642c2049"
    "6e7374616c6c6174696f6e2c2053656375726520426f6f742c2053657665"
    "726564204669656c64730a0a2020202054686973206578616d706c652063"
    "6f766572732074686520666f6c6c6f77696e672074656d706c617465733a"
    "0a202020200a202020202a20436f6d7061746962696c6974792043686563"
    "6b20287b7b74656d706c6174652d636f6d7061746962696c6974792d6368"
    "65636b7d7d290a202020202a2053656375726520426f6f7420287b7b7465"
    "6d706c6174652d7365637572652d626f6f747d7d290a202020202a204669"
    "726d7761726520446f776e6c6f616420287b7b6669726d776172652d646f"
    "776e6c6f61642d74656d706c6174657d7d290a202020200a202020205468"
    "6973206578616d706c6520616c736f2064656d6f6e737472617465732073"
    "6576657261626c6520656c656d656e747320287b7b6f76722d7365766572"
    "61626c657d7d292c20616e64207465787420287b7b6d616e69666573742d"
    "6469676573742d746578747d7d292e814100a2036761726d2e636f6d0578"
    "525468697320636f6d706f6e656e7420697320612064656d6f6e73747261"
    "74696f6e2e205468652064696765737420697320612073616d706c652070"
    "61747465726e2c206e6f742061207265616c206f6e652e"
)
DRAFT_PUBLIC_KEY = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEhJaBGq4LqqvSYVcYnuzaJr6qi/Eb
bz/m4rVlnIXbwK07HypLbAmBMcCjbazR14vTgdzfsJwFLbM5kdtzOLSolg==
-----END PUBLIC KEY-----
"""


def _envelope_map(raw: bytes) -> dict[int, object]:
    return dict(cbor2.loads(raw).value)


def _reassemble(members: dict[int, object]) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(107, members), canonical=True)


# --- fully-specified algorithms ---------------------------------------------------------------------


@pytest.mark.parametrize(("alg", "protected"), [("es256", b"\xa1\x01\x28"), ("eddsa", b"\xa1\x01\x32")])
def test_default_algorithms_are_fully_specified(alg: str, protected: bytes) -> None:
    """P-256 signs ESP256 ({1: -9}), Ed25519 signs Ed25519 ({1: -19}), as the SUIT MTI profiles name."""
    key = generate_private_key(alg)
    raw = build_envelope(single(), key)
    auth = cbor2.loads(_envelope_map(raw)[2])  # type: ignore[arg-type]
    sign1 = cbor2.loads(auth[1])
    assert sign1.value[0] == protected
    env = decode_envelope(raw)
    assert env.signatures[0].alg_name == {"es256": "ESP256", "eddsa": "Ed25519"}[alg]
    assert key_id(verify_envelope(env, [key.public_key()])) == key_id(key)


def test_deterministic_ed25519_vector() -> None:
    raw = build_envelope(single(), fixed_ed25519())
    assert len(raw) == 300
    assert (
        hashlib.sha256(raw).hexdigest() == "4c3dd6703bdb6f0b4ef4adfe5f0e1869c92db144d07ea9a3aed4e17e514034f0"
    )


def test_hand_made_ed25519_signature_verifies() -> None:
    """A -19 COSE_Sign1 assembled from the RFC 9052 Sig_structure by hand (not by build_envelope)."""
    key = fixed_ed25519()
    manifest = encode_manifest(single())
    suit_digest = cbor2.dumps([-16, hashlib.sha256(cbor2.dumps(manifest)).digest()])
    protected = cbor2.dumps({1: -19})
    signature = key.sign(cbor2.dumps(["Signature1", protected, b"", suit_digest]))
    sign1 = cbor2.dumps(cbor2.CBORTag(18, [protected, {}, None, signature]))
    raw = _reassemble({2: cbor2.dumps([suit_digest, sign1]), 3: manifest})
    env = decode_envelope(raw)
    assert env.signatures[0].alg == -19 and env.signatures[0].kid is None
    assert verify_envelope(env, [key.public_key()]) is not None
    with pytest.raises(SignatureError):
        verify_envelope(env, [generate_private_key("eddsa").public_key()])


@pytest.mark.parametrize(("alg", "wrong"), [("es256", -19), ("es256", -8), ("eddsa", -9), ("eddsa", -7)])
def test_algorithm_must_fit_the_key(alg: str, wrong: int) -> None:
    with pytest.raises(ManifestError, match="does not fit this key"):
        build_envelope(single(), generate_private_key(alg), alg=wrong)


@pytest.mark.parametrize(("alg", "claimed"), [("eddsa", -9), ("es256", -19)])
def test_signature_under_another_keys_algorithm_is_refused(alg: str, claimed: int) -> None:
    """A header claiming the other key type's algorithm never verifies, whatever the signature."""
    key = generate_private_key(alg)
    top = _envelope_map(build_envelope(single(), key))
    auth = list(cbor2.loads(top[2]))  # type: ignore[arg-type]
    sign1 = list(cbor2.loads(auth[1]).value)
    sign1[0] = cbor2.dumps({1: claimed})
    auth[1] = cbor2.dumps(cbor2.CBORTag(18, sign1))
    top[2] = cbor2.dumps(auth)
    with pytest.raises(SignatureError):
        verify_envelope(decode_envelope(_reassemble(top)), [key.public_key()])


# --- the draft's Example 2: severable install and text ----------------------------------------------


def test_draft_example_2_decodes_verifies_and_shows_text() -> None:
    env = decode_envelope(DRAFT_EXAMPLE_2)
    key = load_public_key(DRAFT_PUBLIC_KEY)
    assert verify_envelope(env, [key]) is key
    info = env.info
    assert info.sequence == 2 and info.component_id == (b"\x00",)
    assert info.uris == ("http://example.com/very/long/path/to/file/file.bin",)
    assert info.reference_uri == "https://git.io/JJYoj"
    assert [(m.key, m.name, m.present) for m in env.severable] == [(20, "install", True), (23, "text", True)]
    assert env.severable[1].digest.hex() == "302196d452bce5e8bfeaf71e395645ede6d365e63507a081379721eeecf00007"
    (text,) = info.texts
    assert text.language == "en-US"
    assert text.manifest_description is not None and text.manifest_description.startswith("## Example 2")
    ((cid, ctext),) = text.components
    assert cid == (b"\x00",) and ctext.vendor_domain == "arm.com"
    assert ctext.description is not None and ctext.description.startswith("This component is a demonstration")


def test_draft_example_2_severed_text_still_verifies() -> None:
    raw = sever(DRAFT_EXAMPLE_2, [23])
    assert len(raw) < len(DRAFT_EXAMPLE_2)
    env = decode_envelope(raw)
    verify_envelope(env, [load_public_key(DRAFT_PUBLIC_KEY)])
    assert env.info.texts == () and [(m.key, m.present) for m in env.severable] == [(20, True), (23, False)]
    assert env.info.uris  # install, still carried, holds the fetch


def test_draft_example_2_without_install_has_no_uri() -> None:
    with pytest.raises(ManifestError, match="no payload URI"):
        decode_envelope(sever(DRAFT_EXAMPLE_2))


@pytest.mark.parametrize(("key", "name"), [(20, "install"), (23, "text")])
def test_tampered_severable_member_is_refused_precisely(key: int, name: str) -> None:
    top = _envelope_map(DRAFT_EXAMPLE_2)
    member = bytearray(top[key])  # type: ignore[arg-type]
    member[-1] ^= 0x01
    top[key] = bytes(member)
    with pytest.raises(ManifestError, match=rf"{name} \({key}\) does not match its digest in the manifest"):
        decode_envelope(_reassemble(top))


def test_only_severable_members_can_be_severed() -> None:
    with pytest.raises(ManifestError, match="only severable members"):
        sever(DRAFT_EXAMPLE_2, [3])


# --- the text section fwcm writes -------------------------------------------------------------------


def test_text_round_trip_is_severable() -> None:
    key = generate_private_key("eddsa")
    info = single(texts=(TEXT,))
    raw = build_envelope(info, key)
    top = _envelope_map(raw)
    assert sorted(top) == [2, 3, 23]
    manifest = cbor2.loads(top[3])  # type: ignore[arg-type]
    assert manifest[23] == [-16, hashlib.sha256(cbor2.dumps(top[23])).digest()]
    assert cbor2.loads(top[23]) == {  # type: ignore[arg-type]
        "en": {1: "sensor firmware 2.1", (b"fw",): {1: "Example Ltd", 2: "sensor-v1", 6: "2.1.0"}}
    }
    env = decode_envelope(raw)
    assert env.info == info
    verify_envelope(env, [key.public_key()])
    severed = decode_envelope(sever(raw))
    assert severed.info == single() and severed.digest == env.digest
    verify_envelope(severed, [key.public_key()])


def test_text_vector() -> None:
    raw = build_envelope(single(texts=(TEXT,)), fixed_ed25519())
    assert len(raw) == 402
    assert (
        hashlib.sha256(raw).hexdigest() == "d5d1cee8e6c549d02932d344adff51fa367909643e72834b946026115660c056"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ({"en": {9: "x"}}, r"text \(en\): unsupported key 9"),
        ({"en": {1: 5}}, "must be a text string"),
        ({"not a tag!": {1: "x"}}, "not a language tag"),
        ({"en": {(b"other",): {1: "x"}}}, "not in common"),
        ({"en": {(b"fw",): {8: "x"}}}, r"component: unsupported key 8"),
        ({}, "non-empty map"),
    ],
)
def test_bad_text_is_refused_precisely(text: object, message: str) -> None:
    key = generate_private_key("eddsa")
    top = _envelope_map(build_envelope(single(texts=(TEXT,)), key))
    body = cbor2.dumps(text, canonical=True)
    manifest = dict(cbor2.loads(top[3]))  # type: ignore[arg-type]
    manifest[23] = [-16, hashlib.sha256(cbor2.dumps(body)).digest()]
    top[3] = cbor2.dumps(manifest, canonical=True)
    top[23] = body
    digest = cbor2.dumps([-16, hashlib.sha256(cbor2.dumps(top[3])).digest()])
    auth = cbor2.loads(top[2])  # type: ignore[arg-type]
    top[2] = cbor2.dumps([digest, auth[1]])
    with pytest.raises(ManifestError, match=message):
        decode_envelope(_reassemble(top))


def test_text_carried_without_digest_is_refused() -> None:
    top = _envelope_map(build_envelope(single(), fixed_ed25519()))
    top[23] = cbor2.dumps({"en": {1: "x"}})
    with pytest.raises(ManifestError, match=r"text \(23\) is carried but the manifest has no digest"):
        decode_envelope(_reassemble(top))


def test_text_for_unknown_component_is_not_built() -> None:
    text = ManifestText(components=(((b"nope",), ComponentText(model_name="x")),))
    with pytest.raises(ManifestError, match="does not have"):
        build_envelope(single(texts=(text,)), fixed_ed25519())


# --- multi-component manifests ----------------------------------------------------------------------


def test_two_components_round_trip_and_layout() -> None:
    key = generate_private_key("es256")
    info = two_components()
    raw = build_envelope(info, key)
    env = decode_envelope(raw)
    assert env.info == info
    assert [c.id for c in env.info.components] == [(b"app",), (b"radio",)]
    assert env.info.components[1].uris == ("coap://h/p/radio", "http://h/p/radio")
    assert env.signatures[0].alg == -9
    verify_envelope(env, [key.public_key()])

    m = cbor2.loads(_envelope_map(raw)[3])  # type: ignore[arg-type]
    common = cbor2.loads(m[3])
    assert common[2] == [[b"app"], [b"radio"]]
    shared = cbor2.loads(common[4])
    assert shared[:3] == [12, 0, 20] and shared[4:8] == [1, 15, 2, 15]
    assert shared[8:] == [12, 1, 20, {3: cbor2.dumps([-16, hashlib.sha256(RADIO).digest()]), 14: len(RADIO)}]
    fetch = cbor2.loads(m[16])
    assert fetch[:2] == [12, 0] and fetch[2:8] == [20, {21: "coap://h/p/app"}, 21, 2, 3, 15]
    assert fetch[8:10] == [12, 1] and fetch[10] == 15
    assert cbor2.loads(m[20]) == cbor2.loads(m[7]) == [12, True, 3, 15]


def test_multi_component_vector() -> None:
    text = ManifestText(components=(((b"radio",), ComponentText(version="1.4")),))
    raw = build_envelope(two_components(texts=(text,)), fixed_ed25519())
    assert len(raw) == 478
    assert (
        hashlib.sha256(raw).hexdigest() == "c17ffdf515be83883270e46335bb74809440a4067d41209640c17bef69630db3"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"component_id": (b"radio",)}, "distinct"),
        ({"component_id": ()}, "component id"),
        ({"component_id": (b"x" * 65,)}, "component id"),
    ],
)
def test_bad_components_are_not_built(change: dict[str, object], message: str) -> None:
    info = two_components()
    fields = info.__dict__ | change
    with pytest.raises(ManifestError, match=message):
        build_envelope(ManifestInfo(**fields), fixed_ed25519())  # type: ignore[arg-type]


def test_too_many_components_are_not_built() -> None:
    extra = tuple(Component((bytes([i]),), bytes(32), 1, ("coap://h/p",)) for i in range(8))
    with pytest.raises(ManifestError, match="at most 8 components"):
        build_envelope(single(extra_components=extra), fixed_ed25519())


def _with_manifest(info: ManifestInfo, edit: dict[int, object]) -> bytes:
    """An envelope whose manifest has ``edit`` applied (re-digested; the signature no longer holds)."""
    top = _envelope_map(build_envelope(info, fixed_ed25519()))
    manifest = dict(cbor2.loads(top[3]))  # type: ignore[arg-type]
    manifest.update(edit)
    top[3] = cbor2.dumps(manifest, canonical=True)
    digest = cbor2.dumps([-16, hashlib.sha256(cbor2.dumps(top[3])).digest()])
    top[2] = cbor2.dumps([digest, cbor2.loads(top[2])[1]])  # type: ignore[arg-type]
    return _reassemble(top)


def test_component_without_uri_is_refused() -> None:
    fetch = [12, 0, 20, {21: "coap://h/p/app"}, 21, 2, 3, 15]
    with pytest.raises(ManifestError, match=r"no payload URI .* for component 1"):
        decode_envelope(_with_manifest(two_components(), {16: cbor2.dumps(fetch)}))


def test_component_index_out_of_range_is_refused() -> None:
    fetch = [12, 2, 20, {21: "coap://h/p/app"}, 21, 2]
    with pytest.raises(ManifestError, match="component index 2 out of range"):
        decode_envelope(_with_manifest(two_components(), {16: cbor2.dumps(fetch)}))


def test_components_of_another_class_are_refused() -> None:
    m = cbor2.loads(_envelope_map(build_envelope(two_components(), fixed_ed25519()))[3])  # type: ignore[arg-type]
    common = dict(cbor2.loads(m[3]))
    shared = cbor2.loads(common[4])
    shared[11][2] = uuid.uuid4().bytes
    common[4] = cbor2.dumps(shared)
    with pytest.raises(ManifestError, match="different vendor or class"):
        decode_envelope(_with_manifest(two_components(), {3: cbor2.dumps(common, canonical=True)}))


# --- delta manifests --------------------------------------------------------------------------------

BASE = b"application image v1\n" * 40
PATCH = b"a patch, whatever its bytes"


def delta_info() -> ManifestInfo:
    return single(
        uris=(),
        delta=DeltaPatch(
            base_digest=hashlib.sha256(BASE).digest(),
            base_size=len(BASE),
            patch_digest=hashlib.sha256(PATCH).digest(),
            patch_size=len(PATCH),
            uris=("coap://h/p/patch", "http://h/p/patch"),
        ),
    )


def test_delta_manifest_round_trip_and_layout() -> None:
    key = generate_private_key("eddsa")
    info = delta_info()
    raw = build_envelope(info, key)
    env = decode_envelope(raw)
    assert env.info == info and env.info.uris == ()
    verify_envelope(env, [key.public_key()])
    m = cbor2.loads(_envelope_map(raw)[3])  # type: ignore[arg-type]
    common = cbor2.loads(m[3])
    assert common[2] == [[b"fw"], [b"fwcm-patch"]]
    shared = cbor2.loads(common[4])
    assert shared[8:] == [12, 1, 20, {3: cbor2.dumps([-16, hashlib.sha256(PATCH).digest()]), 14: len(PATCH)}]
    fetch = cbor2.loads(m[16])
    assert fetch[:3] == [12, 1, 15]
    install = cbor2.loads(m[20])
    assert install == [
        12, 0,
        20, {3: cbor2.dumps([-16, hashlib.sha256(BASE).digest()]), 14: len(BASE)},
        3, 15,  # image-match: the running image is the base
        20, {22: 1, -1: "detools-sequential-lzma"},
        22, 2,  # copy: apply the patch from component 1
        20, {3: cbor2.dumps([-16, hashlib.sha256(APP).digest()]), 14: len(APP)},
        3, 15,  # image-match: the result is the new image
    ]  # fmt: skip


def test_delta_vector() -> None:
    raw = build_envelope(delta_info(), fixed_ed25519())
    assert len(raw) == 522
    assert (
        hashlib.sha256(raw).hexdigest() == "e40a6f9581d22ecd44ad1da97fd54895072b21cab5ac976cf38bd1a658da5f98"
    )


def _delta_with_install(install: list[object]) -> bytes:
    return _with_manifest(delta_info(), {20: cbor2.dumps(install)})


def _install(**change: object) -> list[object]:
    base = cbor2.dumps([-16, hashlib.sha256(BASE).digest()])
    new = cbor2.dumps([-16, hashlib.sha256(APP).digest()])
    fmt = change.get("fmt", "detools-sequential-lzma")
    result = change.get("result", new)
    steps: list[object] = [12, 0, 20, {3: base, 14: len(BASE)}]
    if not change.get("skip_base"):
        steps += [3, 15]
    steps += [20, {22: 1, -1: fmt}, 22, 2, 20, {3: result, 14: len(APP)}, 3, 15]
    return steps


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fmt": "bsdiff"}, "unsupported patch format 'bsdiff'"),
        ({"skip_base": True}, "copy before image-match checked the base"),
        ({"result": cbor2.dumps([-16, bytes(32)])}, "patched image must match"),
    ],
)
def test_bad_delta_installs_are_refused_precisely(change: dict[str, object], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        decode_envelope(_delta_with_install(_install(**change)))


def test_delta_without_patch_uri_is_refused() -> None:
    with pytest.raises(ManifestError, match="no payload URI for the patch"):
        decode_envelope(_with_manifest(delta_info(), {16: cbor2.dumps([12, 1, 3, 15])}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"uris": ("coap://h/full",)}, "give no image URIs"),
        ({"extra_components": (Component((b"r",), bytes(32), 1, ("coap://h/r",)),)}, "one image"),
        ({"component_id": (b"fwcm-patch",)}, "is the patch's"),
    ],
)
def test_bad_delta_manifests_are_not_built(change: dict[str, object], message: str) -> None:
    fields = delta_info().__dict__ | change
    with pytest.raises(ManifestError, match=message):
        build_envelope(ManifestInfo(**fields), fixed_ed25519())  # type: ignore[arg-type]
