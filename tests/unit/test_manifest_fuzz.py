"""Hostile input: every bit flip is caught, and decoding anything raises only ManifestError."""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwcm.manifest import (
    Component,
    ComponentText,
    DeltaPatch,
    ManifestError,
    ManifestInfo,
    ManifestText,
    SignatureError,
    build_envelope,
    decode_envelope,
    generate_private_key,
    verify_envelope,
)

ES_KEY = generate_private_key("es256")
ED_KEY = generate_private_key("eddsa")
SMALL = ManifestInfo(
    sequence=1,
    vendor_id=uuid.UUID(int=1),
    class_id=uuid.UUID(int=2),
    image_digest=hashlib.sha256(b"img").digest(),
    image_size=3,
    uris=("coap://h/p",),
)
VALID = build_envelope(SMALL, ES_KEY)
RICH = ManifestInfo(
    sequence=1,
    vendor_id=uuid.UUID(int=1),
    class_id=uuid.UUID(int=2),
    image_digest=hashlib.sha256(b"img").digest(),
    image_size=3,
    uris=("coap://h/p",),
    component_id=(b"app",),
    extra_components=(
        Component((b"radio",), hashlib.sha256(b"r").digest(), 1, ("coap://h/r", "http://h/r")),
    ),
    texts=(ManifestText(manifest_description="d", components=(((b"radio",), ComponentText(version="1")),)),),
)
"""Two components and a severable text section: a flipped bit in the text must fail its digest."""
DELTA = ManifestInfo(
    sequence=1,
    vendor_id=uuid.UUID(int=1),
    class_id=uuid.UUID(int=2),
    image_digest=hashlib.sha256(b"img").digest(),
    image_size=3,
    uris=(),
    delta=DeltaPatch(hashlib.sha256(b"old").digest(), 3, hashlib.sha256(b"p").digest(), 1, ("coap://h/d",)),
)


def decode_or_manifest_error(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        decode_envelope(data)


@pytest.mark.parametrize("info", [SMALL, RICH, DELTA], ids=["small", "rich", "delta"])
@pytest.mark.parametrize("key", [ES_KEY, ED_KEY], ids=["es256", "eddsa"])
def test_every_single_bit_flip_fails(key: Any, info: ManifestInfo) -> None:
    raw = build_envelope(info, key)
    public = key.public_key()
    verify_envelope(decode_envelope(raw), [public])
    accepted = []
    for i in range(len(raw) * 8):
        mutated = bytearray(raw)
        mutated[i // 8] ^= 0x80 >> (i % 8)
        try:
            env = decode_envelope(bytes(mutated))
        except ManifestError:
            continue
        try:
            verify_envelope(env, [public])
        except SignatureError:
            continue
        accepted.append(i)
    assert accepted == []


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data: bytes) -> None:
    decode_or_manifest_error(data)


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_behind_tag_107(data: bytes) -> None:
    decode_or_manifest_error(b"\xd8\x6b" + data)
    decode_or_manifest_error(b"\xd8\x6b\xa2\x02" + data)


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


@settings(max_examples=500)
@given(mutations())
def test_mutated_envelopes(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except ManifestError:
        return
    if data != VALID:
        with pytest.raises(SignatureError):
            verify_envelope(env, [ES_KEY.public_key()])


# Arbitrary CBOR values placed where the codec expects specific shapes, with correct digests, so the
# deeper parsing (manifest, sequences, headers) meets hostile values rather than failing early.
cbor_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 12, 14, 15, 20, 21, -16, -7, -8, -9]),
    st.floats(allow_nan=False),
    st.binary(max_size=40),
    st.text(max_size=20),
)
cbor_value = st.recursive(
    cbor_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.integers(-20, 40), st.text(max_size=3)), inner, max_size=6),
        st.builds(cbor2.CBORTag, st.sampled_from([2, 3, 18, 24, 107, 1, 258, 28, 29]), inner),
        inner.map(lambda v: cbor2.dumps(v)),
    ),
    max_leaves=25,
)


def _envelope(manifest: bytes, sign1: Any, digest_item: Any = None) -> bytes:
    manifest_bstr = cbor2.dumps(manifest)
    digest = digest_item if digest_item is not None else [-16, hashlib.sha256(manifest_bstr).digest()]
    auth = cbor2.dumps([cbor2.dumps(digest), cbor2.dumps(sign1)])
    return cbor2.dumps(cbor2.CBORTag(107, {2: auth, 3: manifest}), canonical=True)


_VALID_TOP = cbor2.loads(VALID)
_VALID_MANIFEST = cbor2.loads(_VALID_TOP.value[3])
_VALID_SIGN1 = cbor2.loads(cbor2.loads(_VALID_TOP.value[2])[1])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([1, 2, 3, 7, 9, 16, 20, 99]), cbor_value, st.booleans())
def test_hostile_manifest_fields(key: int, value: Any, wrap: bool) -> None:
    manifest = dict(_VALID_MANIFEST)
    manifest[key] = cbor2.dumps(value) if wrap else value
    decode_or_manifest_error(_envelope(cbor2.dumps(manifest, canonical=True), _VALID_SIGN1))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 7), cbor_value)
def test_hostile_shared_sequence_and_params(index: int, value: Any) -> None:
    manifest = dict(_VALID_MANIFEST)
    common = dict(cbor2.loads(manifest[3]))
    shared = list(cbor2.loads(common[4]))
    shared[index] = value
    common[4] = cbor2.dumps(shared)
    manifest[3] = cbor2.dumps(common)
    decode_or_manifest_error(_envelope(cbor2.dumps(manifest, canonical=True), _VALID_SIGN1))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 3), cbor_value, st.one_of(st.none(), cbor_value))
def test_hostile_cose_and_digest(index: int, value: Any, digest: Any) -> None:
    fields = list(_VALID_SIGN1.value)
    fields[index] = value
    decode_or_manifest_error(_envelope(_VALID_TOP.value[3], cbor2.CBORTag(18, fields), digest))


@settings(max_examples=50, deadline=None)
@given(
    sequence=st.integers(0, 2**64 - 1),
    vendor=st.uuids(),
    klass=st.uuids(),
    digest=st.binary(min_size=32, max_size=32),
    size=st.integers(0, 2**64 - 1),
    uris=st.lists(st.text(min_size=1, max_size=60), min_size=1, max_size=5, unique=True),
)
def test_round_trip_property(
    sequence: int, vendor: uuid.UUID, klass: uuid.UUID, digest: bytes, size: int, uris: list[str]
) -> None:
    info = ManifestInfo(sequence, vendor, klass, digest, size, tuple(uris))
    env = decode_envelope(build_envelope(info, ED_KEY))
    assert env.info == info
    verify_envelope(env, [ED_KEY.public_key()])
