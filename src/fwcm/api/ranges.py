"""Serving content-addressed files with ETag and single byte ranges (resumable downloads).

Both the authenticated ``/api/v1/payloads/{sha256}/content`` and the public device route
``/p/{sha256}`` answer through ``file_response``, so devices and tenants see the same semantics.
The ETag is the quoted SHA-256: the content never changes under a name, so it is also immutable.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
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
    with path.open("rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


def file_response(headers: Mapping[str, str], path: Path, sha256: str, *, head: bool = False) -> Response:
    """200 / 206 / 304 / 416 for ``path`` as requested by ``headers`` (Range, If-None-Match, If-Range)."""
    size = path.stat().st_size
    etag = f'"{sha256}"'
    base = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "public, max-age=31536000, immutable",
    }
    if _etag_matches(headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=base)
    range_header = headers.get("range")
    if_range = headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        range_header = None  # the client holds another version: send it all
    try:
        rng = parse_range(range_header, size)
    except RangeNotSatisfiable:
        return Response(
            status_code=416,
            headers={**base, "Content-Range": f"bytes */{size}"},
            content=b"",
        )
    if rng is None:
        start, length, status = 0, size, 200
        extra = {}
    else:
        start, end = rng
        length, status = end - start + 1, 206
        extra = {"Content-Range": f"bytes {start}-{end}/{size}"}
    out_headers = {**base, **extra, "Content-Length": str(length)}
    if head:
        return Response(status_code=status, headers=out_headers, media_type="application/octet-stream")
    return StreamingResponse(
        _read(path, start, length),
        status_code=status,
        headers=out_headers,
        media_type="application/octet-stream",
    )
