"""The log rate limit: first lines pass, the rest are counted and reported once per interval."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from fwcm.logs import OTHERS, RateLimited, RateLimiter, Suppressed, template


def test_first_lines_pass_then_one_count_per_interval() -> None:
    limiter = RateLimiter(burst=3, interval=60.0)
    assert [limiter.admit("k", t) for t in range(10)] == [True] * 3 + [False] * 7
    assert limiter.admit("other", 5.0)  # keys are counted apart
    assert limiter.due(59.0) == []
    assert limiter.due(61.0) == [Suppressed("k", 7, 0.0)]
    assert limiter.due(62.0) == []  # each count is reported once

    # Still noisy: nothing more passes, the next interval's count is reported at its end.
    assert [limiter.admit("k", 70.0 + t) for t in range(5)] == [False] * 5
    assert limiter.due(122.0) == [Suppressed("k", 5, 61.0)]

    # Quiet for a whole interval: the key starts afresh.
    assert limiter.due(190.0) == []
    assert [limiter.admit("k", 200.0 + t) for t in range(4)] == [True] * 3 + [False]


def test_a_storm_of_distinct_lines_shares_one_count() -> None:
    limiter = RateLimiter(burst=2, interval=60.0, max_keys=10)
    passed = [limiter.admit(f"line {i}", 1.0) for i in range(100)]
    assert passed == [True] * 12 + [False] * 88  # 10 keys, then 2 of the shared count
    assert limiter.due(61.0) == [Suppressed(OTHERS, 88, 1.0)]


def test_pending_counts_are_reported_at_exit() -> None:
    limiter = RateLimiter(burst=1, interval=60.0)
    for t in range(4):
        limiter.admit("k", float(t))
    assert limiter.pending() == [Suppressed("k", 3, 0.0)]
    assert limiter.pending() == []


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage().splitlines()[0]}")


def test_asyncio_accept_storm_is_one_template() -> None:
    """asyncio logs every failed accept() pre-formatted, with the socket's repr on a second line:
    the first line is the template, whatever socket it names."""
    now = [0.0]
    out = Collect()
    handler = RateLimited(out, RateLimiter(burst=5, interval=60.0), clock=lambda: now[0])
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(handler)
    loop = asyncio.new_event_loop()
    sockets = [socket.socket() for _ in range(3)]
    try:
        for i in range(1000):
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                    "socket": sockets[i % 3],
                }
            )
        now[0] = 61.0
        logging.getLogger("asyncio").error("something else")
    finally:
        asyncio_log.removeHandler(handler)
        loop.close()
        for s in sockets:
            s.close()
    assert out.lines == [
        *["ERROR asyncio: socket.accept() out of system resource"] * 5,
        "ERROR asyncio: suppressed 995 more lines like 'socket.accept() out of system resource'"
        " in the last 61 s",
        "ERROR asyncio: something else",
    ]


def test_templates_mask_numbers_and_keep_format_strings() -> None:
    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("fwcm.x", logging.WARNING, __file__, 1, msg, args, None)

    assert template(record("payload %s refused to %s", "ab", "cd")) == (
        "fwcm.x",
        logging.WARNING,
        "payload %s refused to %s",
    )
    assert template(record("device dev-0042 gone after 17 s")) == template(
        record("device dev-7 gone after 3 s")
    )
    assert template(record("first\nsecond 1")) == template(record("first\nsecond 2"))


def test_handler_passes_counts_and_closes_with_pending_counts() -> None:
    now = [0.0]
    out = Collect()
    handler = RateLimited(out, RateLimiter(burst=2, interval=10.0), clock=lambda: now[0])
    log = logging.getLogger("fwcm.test_logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        for i in range(6):
            log.warning("refused %d", i)
            now[0] += 1.0
        handler.close()
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert out.lines == [
        "WARNING fwcm.test_logs: refused 0",
        "WARNING fwcm.test_logs: refused 1",
        "WARNING fwcm.test_logs: suppressed 4 more lines like 'refused %d' in the last 6 s",
    ]
