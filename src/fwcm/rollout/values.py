"""Policy values (pure): the range of every number, and how amounts, durations, rates, retries and
windows are read from a campaign definition or a stored policy.

Every reader names the key it reads (``path``), so a refusal says which key is wrong and what its
range is; with ``strict`` false (a stored policy) a value outside its range is clamped instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from fractions import Fraction
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fwcm.protocol import TRANSIENT_RESULTS

"""A rate limit is also paced: at most this many seconds' worth of notices leave at once."""

Mode = Literal["notify", "install"]
OnError = Literal["stop", "pause"]
Advance = Literal["auto", "approval"]


class PolicyError(ValueError):
    """A policy (or campaign definition) is invalid; the message names the offending key."""


# --------------------------------------------------------------------------------------------
# Ranges: every number of a policy has one (docs/rollout.md lists them)

DAY_S = 86400.0
MAX_DURATION_S = 365 * DAY_S
"""Longest duration of any policy key: timeouts, backoffs, deadlines, usage limits."""
MAX_DEVICES = 1_000_000_000
"""Largest device count a policy names (phase sizes, thresholds, ramp steps, quorums)."""
MAX_PHASES = 100
MAX_RESULT_CODES = 64
MAX_NAME_CHARS = 100
_MAX_TEXT_VALUE = 64
"""Longest string form of a duration or percentage: no sensible one comes near it."""


@dataclass(frozen=True)
class Range:
    """The inclusive range of one policy number; ``duration`` values are seconds."""

    lo: float
    hi: float
    duration: bool = False
    instant: bool = False
    """POSIX seconds, shown as UTC date-times."""

    def show(self, x: float) -> str:
        if self.instant:
            return datetime.fromtimestamp(x, UTC).isoformat().replace("+00:00", "Z")
        if not self.duration:
            return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"
        for unit, size in (("d", DAY_S), ("h", 3600.0), ("m", 60.0)):
            if x >= size and x % size == 0:
                return f"{x / size:g}{unit}"
        return f"{x:g}s"

    def __str__(self) -> str:
        return f"at least {self.show(self.lo)} and at most {self.show(self.hi)}"

    def __contains__(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def fit(self, x: float, raw: Any, path: str, strict: bool) -> float:
        """``x`` when inside; else PolicyError naming ``path`` and the range (``strict``), or the
        nearest bound (reading a stored policy)."""
        if x in self:
            return x
        if strict:
            raise PolicyError(f"{path}: must be {self}, not {shown(raw)}")
        return min(max(x, self.lo), self.hi)


def bounded_duration(seconds: float) -> float:
    """``seconds`` within 0 and ``MAX_DURATION_S``: what time arithmetic on a policy value uses, so
    no value (however it was stored) yields a time outside what datetimes and columns hold."""
    if math.isnan(seconds):
        return MAX_DURATION_S
    return min(max(seconds, 0.0), MAX_DURATION_S)


RATE_RANGE = Range(1, 1_000_000)
"""Devices per minute (``rate_per_minute``, ``ramp.base``)."""
FACTOR_RANGE = Range(1, 100)
COUNT_RANGE = Range(1, MAX_DEVICES)
SIZE_RANGE = Range(0, MAX_DEVICES)
ATTEMPTS_RANGE = Range(1, 100)
BATCH_RANGE = Range(1, 100_000)
RESULT_RANGE = Range(1, 255)
TIMEOUT_RANGE = Range(1, MAX_DURATION_S, duration=True)
"""A duration that must pass before something happens: at least a second."""
DELAY_RANGE = Range(0, MAX_DURATION_S, duration=True)
"""A wait that may be zero (retry backoffs)."""
PERCENT_RANGE = Range(0, 100)
INSTANT_RANGE = Range(0, datetime(9999, 12, 31, tzinfo=UTC).timestamp(), instant=True)
"""``start_at``: every instant that has a UTC date-time, whichever offset it is written with."""


# --------------------------------------------------------------------------------------------
# Values: amounts, durations, windows


@dataclass(frozen=True)
class Amount:
    """A number of devices: a count, or a percentage of the campaign's frozen subset."""

    count: int | None = None
    percent: float | None = None

    def resolve(self, total: int) -> int:
        """Devices this amount stands for; a percentage rounds up so a 1 % canary is never empty."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return math.ceil(Fraction(str(self.percent)) * total / 100)

    def to_json(self) -> int | str:
        return self.count if self.count is not None else f"{self.percent:g}%"

    def __str__(self) -> str:
        return str(self.to_json())


@dataclass(frozen=True)
class Ramp:
    """Exponential ramp: ``base`` devices/minute, times ``factor`` after every ``every_successes``."""

    base: float
    factor: float
    every_successes: int

    def rate(self, successes: int) -> float:
        steps = max(successes, 0) // self.every_successes
        try:
            return self.base * self.factor**steps
        except OverflowError:
            return math.inf


@dataclass(frozen=True)
class Retries:
    """Retries of transient failures with exponential backoff; ``max_attempts`` counts the first."""

    max_attempts: int = 1
    backoff_s: float = 30.0
    factor: float = 2.0
    max_backoff_s: float | None = None
    results: frozenset[int] = frozenset(int(r) for r in TRANSIENT_RESULTS)
    on_timeout: bool = True

    def delay(self, attempt: int) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None when attempts are used up.

        Never more than ``MAX_DURATION_S``, whatever the values: the result becomes a timestamp.
        """
        if attempt >= self.max_attempts:
            return None
        try:
            d = self.backoff_s * self.factor ** max(attempt - 1, 0) if self.backoff_s > 0 else 0.0
        except OverflowError:
            d = math.inf
        if self.max_backoff_s is not None:
            d = min(d, self.max_backoff_s)
        return bounded_duration(d)


@dataclass(frozen=True)
class Window:
    """A daily maintenance window in a time zone; ``end <= start`` means it crosses midnight."""

    start: dtime
    end: dtime
    tz: str = "UTC"
    mode: Mode = "notify"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def _occurrence(self, day: date) -> tuple[float, float]:
        zone = self.zone
        opens = datetime.combine(day, self.start, tzinfo=zone)
        close_day = day + timedelta(days=1) if self.end <= self.start else day
        closes = datetime.combine(close_day, self.end, tzinfo=zone)
        return opens.timestamp(), closes.timestamp()

    def span(self, now: float) -> tuple[float, float]:
        """The window open at ``now``, else the next one: (opens, closes) in POSIX seconds."""
        today = datetime.fromtimestamp(now, self.zone).date()
        for offset in (-1, 0, 1, 2):
            opens, closes = self._occurrence(today + timedelta(days=offset))
            if closes > now and closes > opens:
                return opens, closes
        raise AssertionError("a daily window always opens within two days")  # pragma: no cover

    def contains(self, now: float) -> bool:
        opens, closes = self.span(now)
        return opens <= now < closes

    def describe(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.tz}"


# --------------------------------------------------------------------------------------------
# Parsing (shared with fwcm.rollout.definition, which names keys as they appear in TOML)

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def check_keys(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    allowed = list(allowed)
    for k in d:
        if k not in allowed:
            raise PolicyError(f"{where or 'policy'}: unknown key {k!r}; expected one of {', '.join(allowed)}")


def read_table(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise PolicyError(f"{path}: must be a table of keys")
    return v


def shown(v: Any) -> str:
    """A value as an error message quotes it: short, and never too large to print."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**24:
        return f"{'-' if v < 0 else ''}about 1e{int(math.log10(abs(v)))}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def read_number(v: Any, path: str, rng: Range, strict: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v in (math.inf, -math.inf) or v != v:
        raise PolicyError(f"{path}: must be a number, not {shown(v)}")
    return float(rng.fit(v, v, path, strict))


def read_int(v: Any, path: str, rng: Range, strict: bool = True) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PolicyError(f"{path}: must be a whole number, not {shown(v)}")
    return int(rng.fit(v, v, path, strict))


def read_bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise PolicyError(f"{path}: must be true or false, not {shown(v)}")
    return v


def read_choice(v: Any, path: str, choices: tuple[str, ...]) -> Any:
    if not isinstance(v, str) or v not in choices:
        raise PolicyError(f"{path}: must be one of {', '.join(repr(c) for c in choices)}, not {shown(v)}")
    return v


def parse_percent(v: Any, path: str) -> float:
    """A percentage written as a string such as ``"95%"`` (a bare number would be ambiguous)."""
    m = _PERCENT.match(v) if isinstance(v, str) and len(v) <= _MAX_TEXT_VALUE else None
    if m is None:
        raise PolicyError(f'{path}: must be a percentage such as "95%", not {shown(v)}')
    p = float(m.group(1))
    if p > 100:
        raise PolicyError(f"{path}: must be at most 100%, not {shown(v)}")
    return p


def parse_amount(v: Any, path: str, strict: bool = True, rng: Range = SIZE_RANGE) -> Amount:
    """A device count (whole number in ``rng``) or a share of the subset (``"5%"``)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return Amount(count=read_int(v, path, rng, strict))
    if isinstance(v, str):
        return Amount(percent=parse_percent(v, path))
    raise PolicyError(f'{path}: must be a device count such as 10 or a share such as "5%", not {shown(v)}')


def parse_duration(v: Any, path: str, rng: Range = DELAY_RANGE, strict: bool = True) -> float:
    """Seconds in ``rng``, from a number of seconds or a string such as ``"90s"``, ``"1h30m"``."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return read_number(v, path, rng, strict)
    if isinstance(v, str) and len(v) <= _MAX_TEXT_VALUE:
        text = v.strip()
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return rng.fit(sum(float(n) * _DURATION_UNITS[u] for n, u in parts), v, path, strict)
    raise PolicyError(f'{path}: must be a duration such as "30s", "10m", "2h" or "1d", not {shown(v)}')


def parse_instant(v: Any, path: str, strict: bool = True) -> float:
    """POSIX seconds (in ``INSTANT_RANGE``) from an RFC 3339 date-time with an offset (TOML
    date-time or string)."""
    dt: datetime | None = None
    if isinstance(v, datetime):
        dt = v
    elif isinstance(v, str) and len(v) <= _MAX_TEXT_VALUE:
        try:
            dt = datetime.fromisoformat(v.strip())
        except ValueError:
            dt = None
    if dt is None:
        raise PolicyError(f'{path}: must be a date-time such as "2026-12-01T02:00:00Z", not {shown(v)}')
    if dt.tzinfo is None:
        raise PolicyError(f"{path}: needs a UTC offset or Z, as in 2026-12-01T02:00:00Z")
    try:
        at = dt.timestamp()
    except (OverflowError, ValueError):  # year 1 with a positive offset is before year 1 in UTC
        at = -math.inf
    return INSTANT_RANGE.fit(at, v, path, strict)


def read_clock(v: Any, path: str) -> dtime:
    if isinstance(v, dtime):
        return v.replace(tzinfo=None)
    m = _CLOCK.match(v.strip()) if isinstance(v, str) else None
    if m is not None:
        h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        if h < 24 and mi < 60 and s < 60:
            return dtime(h, mi, s)
    raise PolicyError(f'{path}: must be a time of day such as "01:30", not {v!r}')


def join_key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def read_ramp(v: Any, path: str, strict: bool) -> Ramp:
    d = read_table(v, path)
    check_keys(d, ("base", "factor", "every_successes"), path)
    for k in ("base", "factor", "every_successes"):
        if k not in d:
            raise PolicyError(f"{join_key(path, k)}: missing")
    return Ramp(
        base=read_number(d["base"], join_key(path, "base"), RATE_RANGE, strict),
        factor=read_number(d["factor"], join_key(path, "factor"), FACTOR_RANGE, strict),
        every_successes=read_int(
            d["every_successes"], join_key(path, "every_successes"), COUNT_RANGE, strict
        ),
    )


def read_retries(v: Any, path: str, strict: bool) -> Retries:
    d = read_table(v, path)
    check_keys(d, ("max_attempts", "backoff", "factor", "max_backoff", "results", "on_timeout"), path)
    kw: dict[str, Any] = {}
    if "max_attempts" in d:
        kw["max_attempts"] = read_int(
            d["max_attempts"], join_key(path, "max_attempts"), ATTEMPTS_RANGE, strict
        )
    if "backoff" in d:
        kw["backoff_s"] = parse_duration(d["backoff"], join_key(path, "backoff"), DELAY_RANGE, strict)
    if "factor" in d:
        kw["factor"] = read_number(d["factor"], join_key(path, "factor"), FACTOR_RANGE, strict)
    if "max_backoff" in d:
        kw["max_backoff_s"] = parse_duration(
            d["max_backoff"], join_key(path, "max_backoff"), DELAY_RANGE, strict
        )
    if "results" in d:
        codes, where = d["results"], join_key(path, "results")
        if not isinstance(codes, list):
            raise PolicyError(f"{where}: must be a list of result codes")
        if strict and len(codes) > MAX_RESULT_CODES:
            raise PolicyError(f"{where}: at most {MAX_RESULT_CODES} result codes, not {len(codes)}")
        kw["results"] = frozenset(read_int(c, where, RESULT_RANGE, strict) for c in codes)
    if "on_timeout" in d:
        kw["on_timeout"] = read_bool(d["on_timeout"], join_key(path, "on_timeout"))
    return Retries(**kw)


def read_window(v: Any, path: str) -> Window:
    d = read_table(v, path)
    check_keys(d, ("start", "end", "tz", "mode"), path)
    for k in ("start", "end"):
        if k not in d:
            raise PolicyError(f"{join_key(path, k)}: missing")
    start, end = read_clock(d["start"], join_key(path, "start")), read_clock(d["end"], join_key(path, "end"))
    if start == end:
        raise PolicyError(f"{path}: start and end are equal; leave the window out to allow any time")
    tz = d.get("tz", "UTC")
    try:
        if not isinstance(tz, str):
            raise ValueError
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        hint = 'use a name such as "Europe/Berlin"'
        raise PolicyError(f"{join_key(path, 'tz')}: unknown time zone {tz!r}; {hint}") from None
    mode = read_choice(d.get("mode", "notify"), join_key(path, "mode"), ("notify", "install"))
    return Window(start=start, end=end, tz=tz, mode=mode)
