"""Process-wide settings for the long-running commands (server, demo, simulated fleet)."""

from __future__ import annotations

import gc
import logging
from typing import TextIO

from fwcm.logs import RateLimited

YOUNG_THRESHOLD = 20_000
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int, stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) at ``level``, repeated lines rate-limited (:mod:`fwcm.logs`) on
    every handler of the root logger, which uvicorn's and asyncio's records reach too."""
    logging.basicConfig(level=level, stream=stream, format=LOG_FORMAT)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, RateLimited):
            root.removeHandler(handler)
            root.addHandler(RateLimited(handler))


def tune_gc() -> None:
    """Run the cyclic garbage collector far less often, and exempt what startup created.

    Every report costs a few short-lived containers (packet, frame, dicts, rows) while the process
    holds many long-lived ones (ORM metadata, key caches). At CPython's default threshold the
    collector runs every 700 allocations; in ``bench/run`` ingest it took about a quarter of the
    server's CPU. Young garbage still goes at every 20,000 allocations, so memory stays bounded.
    Called by commands that run for long, never by the library (it is a process-wide choice).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)
