"""Serving content-addressed files with ETag and single byte ranges (resumable downloads).

Both the authenticated ``/api/v1/payloads/{sha256}/content`` and the public device route
``/p/{sha256}`` answer through ``file_response``, so devices and tenants see the same semantics.
The ETag is the quoted SHA-256: the content never changes under a name, so it is also immutable.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.responses import Response, StreamingResponse

CHUNK = 64 * 1024
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class RangeNotSatisfiable(ValueError):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range`` header → inclusive (start, end), or None to send the whole file.

    Multiple ranges and syntactically invalid headers are ignored (RFC 9110 allows that);
    a valid range outside the file raises RangeNotSatisfiable.
    """
    if not header:
        return None
    m = _RANGE_RE.match(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable()
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable()
    return start, end


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return etag in tags


def _read(path: Path, start: int, length: int) -> Iterator[bytes]:
    """``length`` bytes from ``start`` in chunks, the file open only while a chunk is read: the
    response waits while the client's buffer is full, and an abandoned response is closed only
    when the garbage collector gets to it, so an open file would be held by every slow reader."""
    end = start + length
    while start < end:
        with path.open("rb") as f:
            f.seek(start)
            chunk = f.read(min(CHUNK, end - start))
        if not chunk:
            return
        start += len(chunk)
        yield chunk


@dataclass(frozen=True)
class Plan:
    """What to answer: status, headers, and which bytes of the file (none for 304/416)."""

    status: int
    headers: dict[str, str]
    start: int = 0
    length: int = 0


def plan(headers: Mapping[str, str], size: int, sha256: str) -> Plan:
    """200 / 206 / 304 / 416 for a file of ``size`` bytes as requested by ``headers``
    (Range, If-None-Match, If-Range); shared by every route that serves payload bytes."""
    etag = f'"{sha256}"'
    base = {
        "etag": etag,
        "accept-ranges": "bytes",
        "cache-control": "public, max-age=31536000, immutable",
    }
    if _etag_matches(headers.get("if-none-match"), etag):
        return Plan(304, base)
    range_header = headers.get("range")
    if_range = headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        range_header = None  # the client holds another version: send it all
    try:
        rng = parse_range(range_header, size)
    except RangeNotSatisfiable:
        return Plan(416, {**base, "content-range": f"bytes */{size}", "content-length": "0"})
    if rng is None:
        return Plan(200, {**base, "content-length": str(size)}, 0, size)
    first, last = rng
    length = last - first + 1
    return Plan(
        206,
        {**base, "content-range": f"bytes {first}-{last}/{size}", "content-length": str(length)},
        first,
        length,
    )


def file_response(headers: Mapping[str, str], path: Path, sha256: str, *, head: bool = False) -> Response:
    """The Starlette response for ``path`` according to :func:`plan`."""
    p = plan(headers, path.stat().st_size, sha256)
    if p.status in (304, 416) or head:
        return Response(status_code=p.status, headers=p.headers, media_type="application/octet-stream")
    return StreamingResponse(
        _read(path, p.start, p.length),
        status_code=p.status,
        headers=p.headers,
        media_type="application/octet-stream",
    )
