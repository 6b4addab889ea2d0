"""Rollout policy (pure): which devices to notify now, and when a phase or a campaign ends.

The policy is sans-IO. The engine hands it a :class:`CampaignView` (deployment counts per phase
and state, the campaign state and current phase), the policy's own small memory
(:class:`PolicyState`: what was notified when, what an operator acknowledged) and the current
time in POSIX seconds; it answers with a :class:`Decision` the engine carries out. Nothing here
reads a clock, a database or a socket, so every rule can be tested with made-up numbers.

The policy's dictionary form (:meth:`Policy.from_dict` / :meth:`Policy.to_dict`) is what
``campaigns.policy`` stores; ``docs/rollout.md`` describes every key and the range of every
number. :meth:`Policy.from_dict` refuses a value outside its range, naming the key and the range;
:meth:`Policy.from_stored` reads a stored row and clamps such a value into its range instead, so
a campaign stored before a range existed still runs and never makes the time arithmetic raise.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from fractions import Fraction
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fwcm.protocol import TRANSIENT_RESULTS
from fwcm.rollout.states import DEVICE_TERMINAL, IN_PROGRESS, NOT_FOR_ME, CampaignState, DeviceState

DEFAULT_BATCH = 1000
"""Most devices notified in one decision: keeps one engine transaction small, not a rate cap."""
DEFAULT_DEVICE_TIMEOUT_S = 3600.0
RATE_WINDOW_S = 60.0
PACE_BURST_S = 2.0
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


def _table(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise PolicyError(f"{path}: must be a table of keys")
    return v


def shown(v: Any) -> str:
    """A value as an error message quotes it: short, and never too large to print."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**24:
        return f"{'-' if v < 0 else ''}about 1e{int(math.log10(abs(v)))}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(v: Any, path: str, rng: Range, strict: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v in (math.inf, -math.inf) or v != v:
        raise PolicyError(f"{path}: must be a number, not {shown(v)}")
    return float(rng.fit(v, v, path, strict))


def _int(v: Any, path: str, rng: Range, strict: bool = True) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PolicyError(f"{path}: must be a whole number, not {shown(v)}")
    return int(rng.fit(v, v, path, strict))


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise PolicyError(f"{path}: must be true or false, not {shown(v)}")
    return v


def _choice(v: Any, path: str, choices: tuple[str, ...]) -> Any:
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
        return Amount(count=_int(v, path, rng, strict))
    if isinstance(v, str):
        return Amount(percent=parse_percent(v, path))
    raise PolicyError(f'{path}: must be a device count such as 10 or a share such as "5%", not {shown(v)}')


def parse_duration(v: Any, path: str, rng: Range = DELAY_RANGE, strict: bool = True) -> float:
    """Seconds in ``rng``, from a number of seconds or a string such as ``"90s"``, ``"1h30m"``."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return _number(v, path, rng, strict)
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


def _clock(v: Any, path: str) -> dtime:
    if isinstance(v, dtime):
        return v.replace(tzinfo=None)
    m = _CLOCK.match(v.strip()) if isinstance(v, str) else None
    if m is not None:
        h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        if h < 24 and mi < 60 and s < 60:
            return dtime(h, mi, s)
    raise PolicyError(f'{path}: must be a time of day such as "01:30", not {v!r}')


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _parse_ramp(v: Any, path: str, strict: bool) -> Ramp:
    d = _table(v, path)
    check_keys(d, ("base", "factor", "every_successes"), path)
    for k in ("base", "factor", "every_successes"):
        if k not in d:
            raise PolicyError(f"{_join(path, k)}: missing")
    return Ramp(
        base=_number(d["base"], _join(path, "base"), RATE_RANGE, strict),
        factor=_number(d["factor"], _join(path, "factor"), FACTOR_RANGE, strict),
        every_successes=_int(d["every_successes"], _join(path, "every_successes"), COUNT_RANGE, strict),
    )


def _parse_retries(v: Any, path: str, strict: bool) -> Retries:
    d = _table(v, path)
    check_keys(d, ("max_attempts", "backoff", "factor", "max_backoff", "results", "on_timeout"), path)
    kw: dict[str, Any] = {}
    if "max_attempts" in d:
        kw["max_attempts"] = _int(d["max_attempts"], _join(path, "max_attempts"), ATTEMPTS_RANGE, strict)
    if "backoff" in d:
        kw["backoff_s"] = parse_duration(d["backoff"], _join(path, "backoff"), DELAY_RANGE, strict)
    if "factor" in d:
        kw["factor"] = _number(d["factor"], _join(path, "factor"), FACTOR_RANGE, strict)
    if "max_backoff" in d:
        kw["max_backoff_s"] = parse_duration(
            d["max_backoff"], _join(path, "max_backoff"), DELAY_RANGE, strict
        )
    if "results" in d:
        codes, where = d["results"], _join(path, "results")
        if not isinstance(codes, list):
            raise PolicyError(f"{where}: must be a list of result codes")
        if strict and len(codes) > MAX_RESULT_CODES:
            raise PolicyError(f"{where}: at most {MAX_RESULT_CODES} result codes, not {len(codes)}")
        kw["results"] = frozenset(_int(c, where, RESULT_RANGE, strict) for c in codes)
    if "on_timeout" in d:
        kw["on_timeout"] = _bool(d["on_timeout"], _join(path, "on_timeout"))
    return Retries(**kw)


def _parse_window(v: Any, path: str) -> Window:
    d = _table(v, path)
    check_keys(d, ("start", "end", "tz", "mode"), path)
    for k in ("start", "end"):
        if k not in d:
            raise PolicyError(f"{_join(path, k)}: missing")
    start, end = _clock(d["start"], _join(path, "start")), _clock(d["end"], _join(path, "end"))
    if start == end:
        raise PolicyError(f"{path}: start and end are equal; leave the window out to allow any time")
    tz = d.get("tz", "UTC")
    try:
        if not isinstance(tz, str):
            raise ValueError
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        hint = 'use a name such as "Europe/Berlin"'
        raise PolicyError(f"{_join(path, 'tz')}: unknown time zone {tz!r}; {hint}") from None
    mode = _choice(d.get("mode", "notify"), _join(path, "mode"), ("notify", "install"))
    return Window(start=start, end=end, tz=tz, mode=mode)


# --------------------------------------------------------------------------------------------
# Phases


@dataclass(frozen=True)
class Phase:
    """One wave of the rollout.

    ``size`` is this phase's own share of the subset, ``until`` a cumulative target ("extend the
    rollout until 25 % of the subset"); exactly one is given, except on the last phase, which
    always takes every device not in an earlier phase.
    """

    size: Amount | None = None
    until: Amount | None = None
    success_threshold: float = 100.0
    error_threshold: float | None = None
    error_min_devices: int = 1
    advance: Advance = "auto"
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.name is not None:
            d["name"] = self.name
        if self.size is not None:
            d["size"] = self.size.to_json()
        if self.until is not None:
            d["until"] = self.until.to_json()
        d["success_threshold"] = f"{self.success_threshold:g}%"
        if self.error_threshold is not None:
            d["error_threshold"] = f"{self.error_threshold:g}%"
        d["error_min_devices"] = self.error_min_devices
        d["advance"] = self.advance
        return d


PHASE_KEYS = ("name", "size", "until", "success_threshold", "error_threshold", "error_min_devices", "advance")
THRESHOLD_KEYS = ("success_threshold", "error_threshold", "error_min_devices")


def _parse_phase(v: Any, path: str, defaults: Mapping[str, Any], last: bool, strict: bool) -> Phase:
    d = _table(v, path)
    check_keys(d, PHASE_KEYS, path)
    name = d.get("name")
    if name is not None and not isinstance(name, str):
        raise PolicyError(f"{_join(path, 'name')}: must be text")
    if strict and name is not None and len(name) > MAX_NAME_CHARS:
        raise PolicyError(f"{_join(path, 'name')}: at most {MAX_NAME_CHARS} characters, not {len(name):,}")
    size = parse_amount(d["size"], _join(path, "size"), strict) if "size" in d else None
    until = parse_amount(d["until"], _join(path, "until"), strict) if "until" in d else None
    if size is not None and until is not None:
        raise PolicyError(f"{path}: give size (this phase's share) or until (a cumulative target), not both")
    if last:
        if size is not None or (until is not None and until != Amount(percent=100.0)):
            raise PolicyError(
                f'{path}: the last phase takes every remaining device; omit its size or write until = "100%"'
            )
    elif size is None and until is None:
        raise PolicyError(f'{path}: needs size (e.g. size = "5%" or 10) or until (e.g. until = "25%")')

    def pick(key: str) -> tuple[Any, str]:
        if key in d:
            return d[key], _join(path, key)
        return defaults[key]

    success_v, success_p = pick("success_threshold")
    error_v, error_p = pick("error_threshold")
    min_v, min_p = pick("error_min_devices")
    return Phase(
        size=size,
        until=until,
        success_threshold=parse_percent(success_v, success_p),
        error_threshold=parse_percent(error_v, error_p) if error_v is not None else None,
        error_min_devices=_int(min_v, min_p, COUNT_RANGE, strict),
        advance=_choice(d.get("advance", "auto"), _join(path, "advance"), ("auto", "approval")),
        name=name,
    )


# --------------------------------------------------------------------------------------------
# Views, state and decisions


@dataclass(frozen=True)
class CampaignView:
    """What the engine knows right now: campaign state, current phase, counts per phase and state."""

    state: CampaignState
    phase: int
    counts: Mapping[int, Mapping[str, int]]

    @classmethod
    def from_rows(cls, state: str, phase: int, rows: Iterable[tuple[int, str, int]]) -> CampaignView:
        """Build from ``SELECT phase, state, count(*) … GROUP BY phase, state`` rows."""
        counts: dict[int, Counter[str]] = {}
        for p, st, n in rows:
            counts.setdefault(int(p), Counter())[st] += int(n)
        return cls(CampaignState(state), phase, counts)

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


@dataclass
class PolicyState:
    """What the policy remembers between decisions (per campaign, in the engine's memory).

    Losing it (a restart) is safe: seed the rate window with :meth:`seed`; acknowledgements are
    forgotten, so a resumed campaign still above a threshold pauses again rather than going on.
    """

    notified_at: list[tuple[float, int]] = field(default_factory=list)
    clock: float = -math.inf
    tokens: float | None = None
    refilled_at: float | None = None
    last_state: CampaignState | None = None
    paused_for: tuple[str, int] | None = None
    error_ack: dict[int, int] = field(default_factory=dict)
    success_override: set[int] = field(default_factory=set)

    def observe(self, now: float) -> float:
        """The policy's clock never runs backwards: a wall clock stepped back reads as standing still."""
        self.clock = max(self.clock, now)
        return self.clock

    def seed(self, times: Iterable[float]) -> None:
        """Restore the rate window from the notification times of the last minute (after a restart)."""
        for t in times:
            self.notified_at.append((t, 1))
            self.clock = max(self.clock, t)

    def record_notified(self, n: int, now: float) -> None:
        """The engine notified ``n`` devices at ``now`` (call with the same ``now`` as ``decide``)."""
        if n <= 0:
            return
        now = self.observe(now)
        self.notified_at.append((now, n))
        if self.tokens is not None:
            self.tokens -= n

    def notified_since(self, since: float) -> int:
        """Devices notified at or after ``since``; drops older records."""
        self.notified_at = [(t, n) for t, n in self.notified_at if t >= since]
        return sum(n for _, n in self.notified_at)

    def allowance(self, rate: float, now: float) -> int:
        """Devices that may be notified at ``now`` under ``rate`` per minute.

        Hard rule: at most ``rate`` in any 60 s window. Pacing: a token bucket refilled at
        ``rate / 60`` per second holding ``PACE_BURST_S`` seconds' worth, so a large rate is
        spread over the minute instead of leaving in one burst.
        """
        in_window = self.notified_since(now - RATE_WINDOW_S - 1e-6)  # margin for float rounding
        left = math.floor(rate) - in_window
        per_s = rate / RATE_WINDOW_S
        cap = max(1.0, per_s * PACE_BURST_S)
        if self.tokens is None or self.refilled_at is None:
            self.tokens = cap
        else:
            self.tokens = min(cap, self.tokens + per_s * max(now - self.refilled_at, 0.0))
        self.refilled_at = now
        return max(0, min(left, math.floor(self.tokens + 1e-9)))


@dataclass(frozen=True)
class Decision:
    """What the engine should do now.

    ``notify`` counts pending deployments of phases up to and including ``view.phase``;
    ``advance_to`` is the new current phase; ``transition`` a campaign state change with its
    reason; ``note`` says, for people watching, why nothing (more) happens.
    """

    notify: int = 0
    advance_to: int | None = None
    transition: tuple[CampaignState, str] | None = None
    note: str | None = None


def _get(c: Mapping[str, int], *states: DeviceState) -> int:
    return sum(c.get(s.value, 0) for s in states)


def _settled(c: Mapping[str, int]) -> bool:
    """No device of these counts is pending or in progress."""
    return all(DeviceState(s) in DEVICE_TERMINAL for s, n in c.items() if n)


def _reaches(part: int, whole: int, percent: float) -> bool:
    """``part`` is at least ``percent`` % of ``whole``, compared exactly (no float rounding)."""
    return Fraction(100 * part) >= Fraction(str(percent)) * whole


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "0.0%"


# --------------------------------------------------------------------------------------------
# The policy

ROLLOUT_KEYS = (
    "rate_per_minute",
    "ramp",
    "device_timeout",
    "retries",
    "start_at",
    "window",
    "on_error",
    "batch_max",
    *THRESHOLD_KEYS,
)


@dataclass(frozen=True)
class Policy:
    phases: tuple[Phase, ...] = (Phase(),)
    rate_per_minute: float | None = None
    ramp: Ramp | None = None
    device_timeout_s: float = DEFAULT_DEVICE_TIMEOUT_S
    retries: Retries = Retries()
    start_at: float | None = None
    window: Window | None = None
    on_error: OnError = "stop"
    dynamic: bool = False
    batch_max: int = DEFAULT_BATCH

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """Parse and check the stored form (also accepts the human forms of the TOML definition):
        PolicyError names the key of any value outside its range."""
        return cls._from_mapping(d, strict=True)

    @classmethod
    def from_stored(cls, d: Mapping[str, Any]) -> Policy:
        """Read a stored policy: a number outside its range (a row stored before the range
        existed) is clamped into it, so reading a row never fails where it once succeeded."""
        return cls._from_mapping(d, strict=False)

    @classmethod
    def _from_mapping(cls, d: Mapping[str, Any], *, strict: bool) -> Policy:
        d = dict(_table(d, "policy"))
        if "error_threshold_percent" in d:  # the first policy format: a bare number
            v = d.pop("error_threshold_percent")
            pct = _number(v, "error_threshold_percent", PERCENT_RANGE, strict)
            d.setdefault("error_threshold", f"{pct:g}%")
        phases = d.pop("phases", None)
        dynamic = d.pop("dynamic", False)
        return cls.parse(d, phases, dynamic, strict=strict)

    @classmethod
    def parse(
        cls,
        rollout: Mapping[str, Any],
        phases: Any,
        dynamic: Any = False,
        *,
        where: str = "",
        phases_key: str = "phases",
        phase_name: Callable[[int], str] = lambda i: f"phases[{i}]",
        dynamic_key: str = "dynamic",
        strict: bool = True,
    ) -> Policy:
        """Parse rollout keys (under ``where``) and phase tables; the key names spell error paths.

        ``strict``: a value outside its range is an error; otherwise it is clamped into the range.
        """
        r = rollout
        check_keys(r, ROLLOUT_KEYS if where else (*ROLLOUT_KEYS, phases_key, dynamic_key), where)

        def name(key: str) -> str:
            return _join(where, key)

        defaults = {
            "success_threshold": (r.get("success_threshold", "100%"), name("success_threshold")),
            "error_threshold": (r.get("error_threshold"), name("error_threshold")),
            "error_min_devices": (r.get("error_min_devices", 1), name("error_min_devices")),
        }
        if phases is None:
            phases = [{}]
        if not isinstance(phases, list) or not phases:
            raise PolicyError(f"{phases_key}: must be a non-empty list of phase tables")
        if strict and len(phases) > MAX_PHASES:
            raise PolicyError(f"{phases_key}: at most {MAX_PHASES} phases, not {len(phases):,}")
        parsed = tuple(
            _parse_phase(p, phase_name(i), defaults, i == len(phases) - 1, strict)
            for i, p in enumerate(phases)
        )
        rate = r.get("rate_per_minute")
        timeout = r.get("device_timeout")
        start_at = r.get("start_at")
        return cls(
            phases=parsed,
            rate_per_minute=(
                _number(rate, name("rate_per_minute"), RATE_RANGE, strict) if rate is not None else None
            ),
            ramp=_parse_ramp(r["ramp"], name("ramp"), strict) if "ramp" in r else None,
            device_timeout_s=(
                parse_duration(timeout, name("device_timeout"), TIMEOUT_RANGE, strict)
                if timeout is not None
                else DEFAULT_DEVICE_TIMEOUT_S
            ),
            retries=_parse_retries(r["retries"], name("retries"), strict) if "retries" in r else Retries(),
            start_at=parse_instant(start_at, name("start_at"), strict) if start_at is not None else None,
            window=_parse_window(r["window"], name("window")) if "window" in r else None,
            on_error=_choice(r.get("on_error", "stop"), name("on_error"), ("stop", "pause")),
            dynamic=_bool(dynamic, dynamic_key),
            batch_max=_int(r.get("batch_max", DEFAULT_BATCH), name("batch_max"), BATCH_RANGE, strict),
        )

    def to_dict(self) -> dict[str, Any]:
        """The stored (JSON) form; ``Policy.from_dict(p.to_dict()) == p``."""
        d: dict[str, Any] = {}
        if self.rate_per_minute is not None:
            d["rate_per_minute"] = self.rate_per_minute
        if self.ramp is not None:
            d["ramp"] = {
                "base": self.ramp.base,
                "factor": self.ramp.factor,
                "every_successes": self.ramp.every_successes,
            }
        d["device_timeout"] = self.device_timeout_s
        rt = self.retries
        d["retries"] = {
            "max_attempts": rt.max_attempts,
            "backoff": rt.backoff_s,
            "factor": rt.factor,
            "results": sorted(rt.results),
            "on_timeout": rt.on_timeout,
        }
        if rt.max_backoff_s is not None:
            d["retries"]["max_backoff"] = rt.max_backoff_s
        if self.start_at is not None:
            d["start_at"] = datetime.fromtimestamp(self.start_at, UTC).isoformat()
        if self.window is not None:
            w = self.window
            d["window"] = {"start": w.start.isoformat(), "end": w.end.isoformat(), "tz": w.tz, "mode": w.mode}
        d["on_error"] = self.on_error
        d["batch_max"] = self.batch_max
        d["dynamic"] = self.dynamic
        d["phases"] = [p.to_dict() for p in self.phases]
        return d

    # -- phases ----------------------------------------------------------------------------

    def phase_sizes(self, total: int) -> list[int]:
        """Devices per phase for a frozen subset of ``total``; they always add up to ``total``."""
        sizes: list[int] = []
        assigned = 0
        last = len(self.phases) - 1
        for i, ph in enumerate(self.phases):
            remaining = total - assigned
            if i == last:
                n = remaining
            elif ph.size is not None:
                n = min(ph.size.resolve(total), remaining)
            else:
                assert ph.until is not None
                n = max(0, min(ph.until.resolve(total), total) - assigned)
            sizes.append(n)
            assigned += n
        return sizes

    def phase_bounds(self, total: int) -> list[int]:
        """Cumulative ends: the device ranked ``r`` (0-based) joins the first phase with ``r < bound``."""
        out, acc = [], 0
        for n in self.phase_sizes(total):
            acc += n
            out.append(acc)
        return out

    @property
    def late_phase(self) -> int:
        """Phase that devices joining a dynamic campaign after its start are assigned to: the last."""
        return len(self.phases) - 1

    def label(self, index: int) -> str:
        name = self.phases[index].name if index < len(self.phases) else None
        return f"phase {index + 1}" + (f" ({name})" if name else "")

    # -- time ------------------------------------------------------------------------------

    def initial_state(self, now: float) -> CampaignState:
        """State a campaign enters on ``start``: scheduled until ``start_at``, else running."""
        if self.start_at is not None and now < self.start_at:
            return CampaignState.SCHEDULED
        return CampaignState.RUNNING

    @property
    def window_mode(self) -> Mode | None:
        return self.window.mode if self.window is not None else None

    def in_window(self, now: float) -> bool:
        """True when notices may go out (no window, or inside it)."""
        return self.window is None or self.window.contains(now)

    def window_span(self, now: float) -> tuple[int, int] | None:
        """Current or next window (POSIX seconds) for the notice's install-window field."""
        if self.window is None:
            return None
        opens, closes = self.window.span(now)
        return math.floor(opens), math.ceil(closes)

    # -- devices: timeouts and retries -----------------------------------------------------

    def is_transient(self, result: int) -> bool:
        return int(result) in self.retries.results

    def retry_delay(self, attempt: int) -> float | None:
        """Seconds before the next attempt after ``attempt`` attempts, or None: no more attempts."""
        return self.retries.delay(attempt)

    def retry_at(self, result: int | None, attempt: int, now: float) -> float | None:
        """When a device that failed with ``result`` (None: timed out) is tried again, or None."""
        retryable = self.retries.on_timeout if result is None else self.is_transient(result)
        if not retryable:
            return None
        delay = self.retry_delay(attempt)
        return None if delay is None else now + delay

    def timeout_cutoff(self, state: str, now: float) -> float | None:
        """Deployments in ``state`` whose last report is older than this time out; None: none do.

        In install-window mode a device that has downloaded waits for the window without timing
        out; its clock starts again when the window opens.
        """
        st = DeviceState(state)
        if st not in IN_PROGRESS:
            return None
        cutoff = now - bounded_duration(self.device_timeout_s)
        if self.window is not None and self.window.mode == "install" and st == DeviceState.DOWNLOADED:
            opens, closes = self.window.span(now)
            if not opens <= now < closes or cutoff < opens:
                return None
        return cutoff

    def is_timed_out(self, state: str, last_change: float, now: float) -> bool:
        cutoff = self.timeout_cutoff(state, now)
        return cutoff is not None and last_change <= cutoff

    # -- rate ------------------------------------------------------------------------------

    def effective_rate(self, successes: int) -> float | None:
        """Devices per minute allowed now: the ramp's rate, capped by ``rate_per_minute``."""
        rate = self.ramp.rate(successes) if self.ramp is not None else math.inf
        if self.rate_per_minute is not None:
            rate = min(rate, self.rate_per_minute)
        return None if math.isinf(rate) else rate

    # -- the decision ----------------------------------------------------------------------

    def decide(self, view: CampaignView | Mapping[str, int], state: PolicyState, now: float) -> Decision:
        """Decide what to do now. Mutates ``state`` (rate pacing, acknowledgements) only.

        A bare mapping of counts is still accepted (a running campaign seen as one phase).
        """
        if not isinstance(view, CampaignView):
            view = CampaignView(CampaignState.RUNNING, len(self.phases) - 1, {len(self.phases) - 1: view})
        now = state.observe(now)
        counts = self._fold(view)
        last = len(self.phases) - 1
        cur = min(max(view.phase, 0), last)

        if state.last_state == CampaignState.PAUSED and view.state == CampaignState.RUNNING:
            self._acknowledge(state, counts, cur)
        state.last_state = view.state

        if view.state == CampaignState.SCHEDULED:
            if self.start_at is None or now >= self.start_at:
                return self._to(state, CampaignState.RUNNING, "scheduled start reached", cur)
            at = datetime.fromtimestamp(self.start_at, UTC).isoformat()
            return Decision(note=f"scheduled to start at {at}")
        if view.state not in (CampaignState.RUNNING, CampaignState.PAUSED):
            return Decision()

        for p in range(cur + 1):
            reason = self._error_crossed(p, counts.get(p, Counter()), state)
            if reason is None:
                continue
            if view.state == CampaignState.PAUSED and self.on_error == "pause":
                return Decision(note=f"paused: {reason}")
            target = CampaignState.STOPPED if self.on_error == "stop" else CampaignState.PAUSED
            return self._to(state, target, reason, p, kind="error")

        settled = all(
            _get(c, DeviceState.PENDING) == 0
            and all(DeviceState(s) in DEVICE_TERMINAL for s, n in c.items() if n)
            for c in counts.values()
        )
        if cur == last and settled and not self.dynamic:
            return self._to(state, CampaignState.COMPLETED, self._summary(view.total, counts, cur), cur)
        if view.state == CampaignState.PAUSED:
            return Decision(note="paused")

        advance_to: int | None = None
        c = counts.get(cur, Counter())
        if cur < last and _get(c, DeviceState.PENDING) == 0:
            ph = self.phases[cur]
            size = sum(c.values())
            ok = _get(c, DeviceState.SUCCEEDED, *NOT_FOR_ME)
            if _reaches(ok, size, ph.success_threshold) or cur in state.success_override:
                if ph.advance == "approval":
                    reason = (
                        f"{self.label(cur)} done ({ok} of {size} devices succeeded); waiting for approval: "
                        f"resume to start {self.label(cur + 1)}"
                    )
                    return Decision(
                        advance_to=cur + 1,
                        transition=self._mark(state, CampaignState.PAUSED, reason, cur, "approval"),
                    )
                advance_to = cur + 1
            elif _settled(c):
                reason = (
                    f"success threshold of {self.label(cur)} not reached: {ok} of {size} devices succeeded "
                    f"({_pct(ok, size)} < {ph.success_threshold:g}%)"
                )
                target = CampaignState.STOPPED if self.on_error == "stop" else CampaignState.PAUSED
                return self._to(state, target, reason, cur, kind="success")

        pending = sum(_get(counts.get(p, Counter()), DeviceState.PENDING) for p in range(cur + 1))
        notify, note = self._budget(pending, counts, state, now)
        if cur == last and settled:
            note = "all devices done; waiting for devices that join (dynamic campaign)"
        return Decision(notify=notify, advance_to=advance_to, note=note)

    def finished(self, counts: Mapping[str, int]) -> tuple[CampaignState, str | None] | None:
        """Earlier single-phase API: the end state for flat ``counts``, or None while it goes on."""
        d = self.decide(counts, PolicyState(), 0.0)
        if d.transition is not None and d.transition[0] in (CampaignState.STOPPED, CampaignState.COMPLETED):
            return d.transition
        return None

    # -- helpers ---------------------------------------------------------------------------

    def _fold(self, view: CampaignView) -> dict[int, Counter[str]]:
        """Counts per phase, phases the policy does not know folded into its last one."""
        last = len(self.phases) - 1
        out: dict[int, Counter[str]] = {}
        for p, c in view.counts.items():
            out.setdefault(min(max(p, 0), last), Counter()).update({k: v for k, v in c.items() if v})
        return out

    def _error_crossed(self, p: int, c: Mapping[str, int], state: PolicyState) -> str | None:
        ph = self.phases[p]
        if ph.error_threshold is None:
            return None
        failed = _get(c, DeviceState.FAILED, DeviceState.TIMED_OUT)
        notified = sum(c.values()) - _get(c, DeviceState.PENDING)
        if failed < ph.error_min_devices or failed <= state.error_ack.get(p, -1):
            return None
        if not _reaches(failed, notified, ph.error_threshold):
            return None
        return (
            f"error threshold of {self.label(p)} crossed: {failed} of {notified} devices failed "
            f"({_pct(failed, notified)} >= {ph.error_threshold:g}%)"
        )

    def _budget(
        self, pending: int, counts: Mapping[int, Mapping[str, int]], state: PolicyState, now: float
    ) -> tuple[int, str | None]:
        if pending <= 0:
            return 0, None
        if self.window is not None and self.window.mode == "notify" and not self.window.contains(now):
            opens, _ = self.window.span(now)
            at = datetime.fromtimestamp(opens, self.window.zone).isoformat(timespec="minutes")
            return 0, f"outside the maintenance window {self.window.describe()}; opens {at}"
        budget = min(pending, self.batch_max)
        successes = sum(_get(c, DeviceState.SUCCEEDED) for c in counts.values())
        rate = self.effective_rate(successes)
        if rate is not None:
            allowed = state.allowance(rate, now)
            if allowed < budget:
                return allowed, f"rate limit: {rate:g} devices/minute"
        return budget, None

    def _summary(self, total: int, counts: Mapping[int, Mapping[str, int]], cur: int) -> str:
        all_c: Counter[str] = Counter()
        for c in counts.values():
            all_c.update(c)
        parts = [f"{all_c[s.value]} {s.value}" for s in DeviceState if all_c.get(s.value)]
        text = f"all {total} devices done: {', '.join(parts) or 'none'}"
        c = counts.get(cur, Counter())
        size, ok = sum(c.values()), _get(c, DeviceState.SUCCEEDED, *NOT_FOR_ME)
        thr = self.phases[cur].success_threshold
        if size and not _reaches(ok, size, thr):
            text += f"; below the success threshold of {self.label(cur)} ({_pct(ok, size)} < {thr:g}%)"
        return text

    @staticmethod
    def _mark(
        state: PolicyState, target: CampaignState, reason: str, phase: int, kind: str
    ) -> tuple[CampaignState, str]:
        state.last_state = target
        state.paused_for = (kind, phase) if target == CampaignState.PAUSED else None
        return target, reason

    def _to(
        self, state: PolicyState, target: CampaignState, reason: str, phase: int, kind: str = ""
    ) -> Decision:
        return Decision(transition=self._mark(state, target, reason, phase, kind))

    @staticmethod
    def _acknowledge(state: PolicyState, counts: Mapping[int, Mapping[str, int]], cur: int) -> None:
        """An operator resumed: failures seen so far are accepted; a shortfall that paused is waived."""
        for p in range(cur + 1):
            state.error_ack[p] = _get(counts.get(p, {}), DeviceState.FAILED, DeviceState.TIMED_OUT)
        if state.paused_for is not None and state.paused_for[0] == "success":
            state.success_override.add(state.paused_for[1])
        state.paused_for = None
