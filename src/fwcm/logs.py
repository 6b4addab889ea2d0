"""Repeated log lines, rate-limited: what one misbehaving client or an exhausted resource makes the
process log (asyncio logs every failed ``accept()``) must not fill the disk or bury everything else.

Lines are grouped by template: logger, level, and the first line of the unformatted message with
its numbers masked (``log.info("… %s", x)`` keeps its format string; asyncio's pre-formatted
"socket.accept() out of system resource\\nsocket: <…fd=12…>" keeps its first line).  Of each
template the first ``burst`` lines pass; the rest are counted, and once per ``interval`` one line
says how many were suppressed.  A template silent for a whole interval starts afresh.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

BURST = 10
INTERVAL_S = 60.0
MAX_TEMPLATES = 1000
"""Templates tracked at once; beyond that new ones share one count (a storm of distinct lines)."""
OTHERS = ("fwcm.logs", logging.WARNING, "other messages")
_NUMBERS = re.compile(r"\d+")


@dataclass
class _Window:
    start: float
    passed: int = 1
    suppressed: int = 0


@dataclass(frozen=True)
class Suppressed:
    key: Hashable
    count: int
    since: float


class RateLimiter:
    """Per key: the first ``burst`` occurrences of an interval pass, later ones are counted and
    reported by :meth:`due` once the interval is over; then one interval after another, at most
    that report passes, until a key stays quiet for a whole interval.  Pure logic: the caller says
    what time it is."""

    def __init__(
        self, burst: int = BURST, interval: float = INTERVAL_S, max_keys: int = MAX_TEMPLATES
    ) -> None:
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._windows: dict[Hashable, _Window] = {}
        self._next_due = math.inf

    def admit(self, key: Hashable, now: float) -> bool:
        """Whether this occurrence of ``key`` passes (else it is counted)."""
        w = self._windows.get(key)
        if w is None and len(self._windows) >= self.max_keys:
            key, w = OTHERS, self._windows.get(OTHERS)
        if w is None:
            self._windows[key] = _Window(now)
            self._next_due = min(self._next_due, now + self.interval)
            return True
        if w.passed < self.burst:
            w.passed += 1
            return True
        w.suppressed += 1
        return False

    def due(self, now: float) -> list[Suppressed]:
        """The counts of intervals that ended by ``now`` (each reported once); looks at most once
        a second."""
        if now < self._next_due:
            return []
        out: list[Suppressed] = []
        next_due = math.inf
        for key, w in list(self._windows.items()):
            if now - w.start < self.interval:
                next_due = min(next_due, w.start + self.interval)
            elif w.suppressed:
                out.append(Suppressed(key, w.suppressed, w.start))
                self._windows[key] = _Window(now, passed=self.burst)  # still noisy: report only
                next_due = min(next_due, now + self.interval)
            else:
                del self._windows[key]
        self._next_due = max(next_due, now + 1.0) if self._windows else math.inf
        return out

    def pending(self) -> list[Suppressed]:
        """Every count not reported yet (at exit)."""
        out = [Suppressed(k, w.suppressed, w.start) for k, w in self._windows.items() if w.suppressed]
        self._windows.clear()
        self._next_due = math.inf
        return out


def template(record: logging.LogRecord) -> tuple[str, int, str]:
    """What makes two records "the same line": logger, level, masked first line of the template."""
    first = str(record.msg).partition("\n")[0][:200]
    return record.name, record.levelno, _NUMBERS.sub("#", first)


class RateLimited(logging.Handler):
    """Wraps a handler: records reach it through a :class:`RateLimiter` keyed by :func:`template`,
    and each count of suppressed records reaches it as one line of the same logger and level."""

    def __init__(
        self,
        target: logging.Handler,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(target.level)
        self.target = target
        self.limiter = limiter or RateLimiter()
        self.clock = clock

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        now = self.clock()
        with self.lock:  # type: ignore[union-attr]
            due = self.limiter.due(now)
            passed = self.limiter.admit(template(record), now)
        for s in due:
            self.target.handle(self._summary(s, now))
        if passed:
            self.target.handle(record)
        return passed

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        self.target.setFormatter(fmt)

    def flush(self) -> None:
        self.target.flush()

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            pending = self.limiter.pending()
        now = self.clock()
        for s in pending:
            self.target.handle(self._summary(s, now))
        self.target.flush()
        super().close()

    def _summary(self, s: Suppressed, now: float) -> logging.LogRecord:
        name, level, text = s.key if isinstance(s.key, tuple) else OTHERS
        return logging.LogRecord(
            name,
            level,
            __file__,
            0,
            "suppressed %d more lines like %r in the last %.0f s",
            (s.count, text, now - s.since),
            None,
        )
