"""Content-addressed payload files: ``{root}/ab/cdef…`` named by the SHA-256 of the bytes.

Uploads stream into a temporary file while the digest is computed, are fsynced and then renamed
into place, so a reader never sees a partial file and a crash leaves at most a stray temp file.
Identical images from any tenant share one file; ownership lives in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
WRITE_BATCH = 1 << 20


class PayloadTooLarge(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"payload exceeds the limit of {limit} bytes")
        self.limit = limit


class EmptyPayload(ValueError):
    def __init__(self) -> None:
        super().__init__("payload is empty")


@dataclass(frozen=True)
class StoredPayload:
    sha256: str
    size: int


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def is_sha256(text: str) -> bool:
    return bool(SHA256_RE.match(text))


class PayloadStore:
    """Files under ``root``; every method takes a lower-case hex SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"

    def path_for(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:]

    def exists(self, sha256: str) -> bool:
        return is_sha256(sha256) and self.path_for(sha256).is_file()

    def remove(self, sha256: str) -> None:
        """Delete the file (no error when it is already gone)."""
        self.path_for(sha256).unlink(missing_ok=True)

    def open(self, sha256: str) -> BinaryIO:
        return self.path_for(sha256).open("rb")

    def size(self, sha256: str) -> int:
        return self.path_for(sha256).stat().st_size

    def _begin(self) -> tuple[int, str]:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-")

    def _finish(self, fd: int, tmp: str, digest: str) -> None:
        os.fsync(fd)
        os.close(fd)
        final = self.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        with contextlib.suppress(OSError):  # directory fsync is best effort (not on every FS)
            dfd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def write_chunks(self, chunks: Iterable[bytes], limit: int) -> StoredPayload:
        """Store a stream of chunks; raise PayloadTooLarge as soon as ``limit`` is passed."""
        fd, tmp = self._begin()
        h, size = hashlib.sha256(), 0
        try:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(limit)
                h.update(chunk)
                _write_all(fd, chunk)
            if size == 0:
                raise EmptyPayload()
            self._finish(fd, tmp, h.hexdigest())
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return StoredPayload(h.hexdigest(), size)

    async def write_stream(self, chunks: AsyncIterable[bytes], limit: int) -> StoredPayload:
        """Async variant for request bodies: the bytes never sit in memory as a whole.

        Disk writes and the final fsync run in a worker thread, in 1 MiB batches, so a large
        upload does not stall the event loop that also serves devices.
        """
        fd, tmp = await asyncio.to_thread(self._begin)
        h, size = hashlib.sha256(), 0
        pending: list[bytes] = []
        pending_size = 0
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(limit)
                h.update(chunk)
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= WRITE_BATCH:
                    await asyncio.to_thread(_write_all, fd, b"".join(pending))
                    pending, pending_size = [], 0
            if size == 0:
                raise EmptyPayload()
            if pending:
                await asyncio.to_thread(_write_all, fd, b"".join(pending))
            await asyncio.to_thread(self._finish, fd, tmp, h.hexdigest())
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return StoredPayload(h.hexdigest(), size)

    def write_bytes(self, data: bytes, limit: int | None = None) -> StoredPayload:
        return self.write_chunks([data], limit if limit is not None else len(data))
