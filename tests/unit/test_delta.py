"""Binary deltas: round trips over random images and edits, and every bad patch refused as DeltaError."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwcm import delta
from fwcm.delta import DeltaError, apply_patch, make_patch, patched_size, worth_sending


def edited(old: bytes, seed: int, edits: int) -> bytes:
    """``old`` with ``edits`` insertions, deletions and overwrites at random places."""
    rng = random.Random(seed)
    new = bytearray(old)
    for _ in range(edits):
        at = rng.randrange(len(new) + 1)
        kind = rng.choice(("insert", "delete", "overwrite"))
        chunk = rng.randbytes(rng.randrange(1, 64))
        if kind == "insert":
            new[at:at] = chunk
        elif kind == "delete":
            del new[at : at + len(chunk)]
        else:
            new[at : at + len(chunk)] = chunk
    return bytes(new)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    old=st.binary(min_size=0, max_size=4096),
    seed=st.integers(0, 2**32 - 1),
    edits=st.integers(0, 12),
)
def test_round_trip_random_images_and_edits(old: bytes, seed: int, edits: int) -> None:
    new = edited(old, seed, edits)
    patch = make_patch(old, new)
    assert patched_size(patch) == len(new)
    assert apply_patch(old, patch, expected_size=len(new)) == new


def test_small_change_to_a_large_image_is_a_small_patch() -> None:
    rng = random.Random(3)
    words = [rng.randbytes(16) for _ in range(512)]
    old = b"".join(rng.choice(words) for _ in range(12_000))  # ~190 KB with code-like repetition
    new = edited(old, seed=5, edits=4)
    patch = make_patch(old, new)
    assert worth_sending(len(patch), len(new)) and len(patch) < len(new) // 20
    assert apply_patch(old, patch, expected_size=len(new)) == new


def test_worth_sending_threshold() -> None:
    assert worth_sending(600, 1000) and not worth_sending(601, 1000)
    assert worth_sending(300, 1000, max_share=0.3) and not worth_sending(301, 1000, max_share=0.3)


def test_patch_for_another_base_does_not_give_the_image() -> None:
    old, other = random.Random(1).randbytes(5000), random.Random(2).randbytes(5000)
    new = edited(old, 9, 3)
    patch = make_patch(old, new)
    assert apply_patch(other, patch, expected_size=len(new)) != new  # the caller's digest check refuses it


def test_wrong_expected_size_is_refused() -> None:
    old = random.Random(1).randbytes(3000)
    new = edited(old, 4, 2)
    with pytest.raises(DeltaError, match="patch makes"):
        apply_patch(old, make_patch(old, new), expected_size=len(new) + 1)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_are_refused_or_bounded(data: bytes) -> None:
    old = b"base image " * 50
    try:
        out = apply_patch(old, data, expected_size=100)
    except DeltaError:
        return
    assert len(out) == 100


@settings(max_examples=100, deadline=None)
@given(position=st.integers(0, 10_000), value=st.integers(1, 255))
def test_corrupted_patches_are_refused_or_bounded(position: int, value: int) -> None:
    old = random.Random(7).randbytes(4000)
    new = edited(old, 8, 5)
    patch = bytearray(make_patch(old, new))
    patch[position % len(patch)] ^= value
    try:
        out = apply_patch(old, bytes(patch), expected_size=len(new))
    except DeltaError:
        return
    assert len(out) == len(new)


def test_sources_to_diff_most_devices_first_and_why_not_the_others() -> None:
    running = {"a" * 64: 5, "b" * 64: 50, "c" * 64: 7, "t" * 64: 100, "u" * 64: 9}
    held = {"a" * 64, "b" * 64, "c" * 64, "t" * 64}
    chosen, skipped = delta.sources_to_diff(running, "t" * 64, held, max_sources=2)
    assert chosen == ["b" * 64, "c" * 64]  # the target itself needs no patch
    assert skipped == {"u" * 64: delta.UNKNOWN_SOURCE, "a" * 64: delta.BEYOND_SOURCES}


def test_delta_policy_values() -> None:
    from fwcm.rollout.policy import Policy, PolicyError

    assert Policy.from_dict({}).delta_max_share is None
    assert Policy.from_dict({"delta": True}).delta_max_share == 60.0
    assert Policy.from_dict({"delta": "25%"}).delta_max_share == 25.0
    assert Policy.from_dict(Policy.from_dict({"delta": "25%"}).to_dict()).delta_max_share == 25.0
    for bad in ("0%", 0.3, "120%", "lots"):
        with pytest.raises(PolicyError, match="delta"):
            Policy.from_dict({"delta": bad})
