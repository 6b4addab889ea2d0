"""Binary deltas between firmware images (sans-IO): make a patch on the server, apply it on a device.

The library is detools (sequential bsdiff patches, LZMA-compressed), chosen by measurement in
``bench/delta_compare.py``: its patches are within about a third of bsdiff4's (both some 90 times
smaller than the compressed image for a small code change), it applies a patch as a stream (the
new image is written in order and never held whole, the part a device resumes after a dropped
download), it has a C implementation for microcontrollers that shares the format, and it needs far
less memory to apply than bsdiff4's three bzip2 streams.

Applying never trusts the patch: the image it promises must have the size the caller expects,
the output is bounded while it is written and the caller checks the result's digest, so a
malformed or hostile patch surfaces as :class:`DeltaError` and nothing else.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Collection, Mapping

import detools

log = logging.getLogger(__name__)

COMPRESSION = "lzma"
DEFAULT_MAX_SHARE = 0.6
"""A patch larger than this share of the full image is not worth sending: the full image is used."""
MAX_IMAGE_BYTES = 64 * 1024 * 1024
"""Images above this size are not diffed (bsdiff's suffix array costs several times the image)."""


class DeltaError(ValueError):
    """A patch that cannot be made or applied: malformed, for another image, or too large."""


def make_patch(old: bytes, new: bytes) -> bytes:
    """A patch that turns ``old`` into ``new``."""
    if len(old) > MAX_IMAGE_BYTES or len(new) > MAX_IMAGE_BYTES:
        raise DeltaError(f"images above {MAX_IMAGE_BYTES} bytes are not diffed")
    out = io.BytesIO()
    detools.create_patch(io.BytesIO(old), io.BytesIO(new), out, compression=COMPRESSION)
    return out.getvalue()


def worth_sending(patch_size: int, image_size: int, max_share: float = DEFAULT_MAX_SHARE) -> bool:
    """Whether a patch of ``patch_size`` bytes beats sending the ``image_size`` image."""
    return patch_size <= image_size * max_share


MAX_SOURCES = 8
"""A campaign gets patches from at most this many source images (those most devices run)."""
UNKNOWN_SOURCE = "the server does not hold this source image"
BEYOND_SOURCES = f"not among the {MAX_SOURCES} source images most devices run"


def sources_to_diff(
    running: Mapping[str, int], target: str, held: Collection[str], max_sources: int = MAX_SOURCES
) -> tuple[list[str], dict[str, str]]:
    """Which source images (SHA-256 hex → devices running it) get a patch to ``target``, most
    devices first, and why each other source gets the full image. A device already on the
    target needs neither; one whose source the server does not hold cannot be diffed."""
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for digest, _n in sorted(running.items(), key=lambda kv: (-kv[1], kv[0])):
        if digest == target:
            continue
        if digest not in held:
            skipped[digest] = UNKNOWN_SOURCE
        elif len(chosen) >= max_sources:
            skipped[digest] = BEYOND_SOURCES
        else:
            chosen.append(digest)
    return chosen, skipped


class _Bounded(io.RawIOBase):
    """A write-only sink that refuses to grow past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if len(self.buffer) + len(data) > self.limit:
            raise DeltaError(f"patch writes more than the expected {self.limit} bytes")
        self.buffer += data
        return len(data)


def patched_size(patch: bytes) -> int:
    """The size of the image ``patch`` produces, from its header."""
    try:
        kind, info = detools.patch_info(io.BytesIO(patch))
        size = info[6]
    except Exception as exc:  # detools raises its Error and, on hostile input, lzma/index errors too
        raise DeltaError(f"not a patch ({type(exc).__name__}: {exc})") from None
    if kind != "sequential" or not isinstance(size, int):
        raise DeltaError(f"unsupported patch type {kind!r}")
    return size


def apply_patch(old: bytes, patch: bytes, *, expected_size: int) -> bytes:
    """``old`` patched with ``patch``, which must promise and produce ``expected_size`` bytes."""
    size = patched_size(patch)
    if size != expected_size:
        raise DeltaError(f"patch makes {size} bytes, the image has {expected_size}")
    sink = _Bounded(expected_size)
    try:
        detools.apply_patch(io.BytesIO(old), io.BytesIO(patch), sink)
    except DeltaError:
        raise
    except Exception as exc:
        raise DeltaError(f"patch does not apply ({type(exc).__name__}: {exc})") from None
    if len(sink.buffer) != expected_size:
        raise DeltaError(f"patch made {len(sink.buffer)} bytes, expected {expected_size}")
    return bytes(sink.buffer)
