"""The rollout policy (pure): a campaign's phases, rate, ramp, retries, timeout, schedule and window,
read from a definition or a stored row, and the rules that follow from them (when to retry, when a
silent device times out, how fast to notify). :mod:`fwcm.rollout.planner` turns it into decisions.

The policy's dictionary form (:meth:`Policy.from_dict` / :meth:`Policy.to_dict`) is what
``campaigns.policy`` stores; ``docs/rollout.md`` describes every key and the range of every
number. :meth:`Policy.from_dict` refuses a value outside its range, naming the key and the range;
:meth:`Policy.from_stored` reads a stored row and clamps such a value into its range instead, so
a campaign stored before a range existed still runs and never makes the time arithmetic raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fwcm import filters
from fwcm.rollout.states import IN_PROGRESS, CampaignState, DeviceState
from fwcm.rollout.values import (
    BATCH_RANGE,
    COUNT_RANGE,
    MAX_NAME_CHARS,
    MAX_PHASES,
    PERCENT_RANGE,
    RATE_RANGE,
    TIMEOUT_RANGE,
    Amount,
    PolicyError,
    Ramp,
    Range,
    Retries,
    Window,
    bounded_duration,
    check_keys,
    join_key,
    parse_amount,
    parse_duration,
    parse_instant,
    parse_percent,
    read_bool,
    read_choice,
    read_int,
    read_number,
    read_ramp,
    read_retries,
    read_table,
    read_window,
)

DEFAULT_BATCH = 1000
"""Most devices notified in one decision: keeps one engine transaction small, not a rate cap."""
DEFAULT_DEVICE_TIMEOUT_S = 3600.0
RATE_WINDOW_S = 60.0
PACE_BURST_S = 2.0
"""A rate limit is also paced: at most this many seconds' worth of notices leave at once."""

Mode = Literal["notify", "install"]
OnError = Literal["stop", "pause"]
Advance = Literal["auto", "approval"]
Order = Literal["shuffle", "registration"]
"""How devices fill the count and share phases: a seeded shuffle (default) or registration order."""
ORDERS: tuple[Order, ...] = ("shuffle", "registration")
SEED_RANGE = Range(0, 2**63 - 1)


# --------------------------------------------------------------------------------------------
# Phases


@dataclass(frozen=True)
class Phase:
    """One wave of the rollout.

    ``size`` is this phase's own share of the subset, ``until`` a cumulative target ("extend the
    rollout until 25 % of the subset"), ``filter`` a rollout group: every device of the subset that
    matches it (and no earlier filter phase). Exactly one is given, except on the last phase, which
    always takes every device not in an earlier phase.
    """

    size: Amount | None = None
    filter: str | None = None
    """Canonical filter text of a rollout group."""
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
        if self.filter is not None:
            d["filter"] = self.filter
        d["success_threshold"] = f"{self.success_threshold:g}%"
        if self.error_threshold is not None:
            d["error_threshold"] = f"{self.error_threshold:g}%"
        d["error_min_devices"] = self.error_min_devices
        d["advance"] = self.advance
        return d


PHASE_KEYS = (
    "name",
    "size",
    "until",
    "filter",
    "success_threshold",
    "error_threshold",
    "error_min_devices",
    "advance",
)
THRESHOLD_KEYS = ("success_threshold", "error_threshold", "error_min_devices")


def _parse_phase(v: Any, path: str, defaults: Mapping[str, Any], last: bool, strict: bool) -> Phase:
    d = read_table(v, path)
    check_keys(d, PHASE_KEYS, path)
    name = d.get("name")
    if name is not None and not isinstance(name, str):
        raise PolicyError(f"{join_key(path, 'name')}: must be text")
    if strict and name is not None and len(name) > MAX_NAME_CHARS:
        raise PolicyError(f"{join_key(path, 'name')}: at most {MAX_NAME_CHARS} characters, not {len(name):,}")
    size = parse_amount(d["size"], join_key(path, "size"), strict) if "size" in d else None
    until = parse_amount(d["until"], join_key(path, "until"), strict) if "until" in d else None
    group = _parse_group(d["filter"], join_key(path, "filter")) if "filter" in d else None
    if sum(x is not None for x in (size, until, group)) > 1:
        raise PolicyError(
            f"{path}: give size (this phase's share), until (a cumulative target) or filter "
            "(a rollout group), only one of them"
        )
    if last:
        if size is not None or group is not None or (until is not None and until != Amount(percent=100.0)):
            raise PolicyError(
                f'{path}: the last phase takes every remaining device; omit its size or write until = "100%"'
            )
    elif size is None and until is None and group is None:
        raise PolicyError(
            f'{path}: needs size (e.g. size = "5%" or 10), until (e.g. until = "25%") or filter '
            "(e.g. filter = 'tag.ring == \"canary\"')"
        )

    def pick(key: str) -> tuple[Any, str]:
        if key in d:
            return d[key], join_key(path, key)
        return defaults[key]

    success_v, success_p = pick("success_threshold")
    error_v, error_p = pick("error_threshold")
    min_v, min_p = pick("error_min_devices")
    return Phase(
        size=size,
        until=until,
        filter=group,
        success_threshold=parse_percent(success_v, success_p),
        error_threshold=parse_percent(error_v, error_p) if error_v is not None else None,
        error_min_devices=read_int(min_v, min_p, COUNT_RANGE, strict),
        advance=read_choice(d.get("advance", "auto"), join_key(path, "advance"), ("auto", "approval")),
        name=name,
    )


def _parse_group(v: Any, path: str) -> str:
    """A rollout group's filter in its canonical form (what the start evaluates)."""
    if not isinstance(v, str):
        raise PolicyError(f"{path}: must be a device filter such as 'tag.ring == \"canary\"'")
    try:
        canonical = filters.validate(v)
    except filters.FilterError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    if len(canonical) > filters.MAX_FILTER_CHARS:
        raise PolicyError(f"{path}: at most {filters.MAX_FILTER_CHARS:,} characters in its canonical form")
    return canonical


DEFAULT_DELTA_SHARE = 60.0
"""``delta = true``: a patch is worth sending up to 60 % of the image's size."""


def read_delta(v: Any, path: str) -> float | None:
    """``delta``: false (full images), true (patches up to the default share) or a share ("40%")."""
    if isinstance(v, bool):
        return DEFAULT_DELTA_SHARE if v else None
    share = parse_percent(v, path)
    if share <= 0:
        raise PolicyError(f'{path}: must be above 0%, or false for full images only, not "{v}"')
    return share


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
    "order",
    "seed",
    "delta",
    *THRESHOLD_KEYS,
)


@dataclass(frozen=True)
class Policy:
    phases: tuple[Phase, ...] = (Phase(),)
    rate_per_minute: float | None = None
    ramp: Ramp | None = None
    device_timeout_s: float = DEFAULT_DEVICE_TIMEOUT_S
    retries: Retries = field(default_factory=Retries)
    start_at: float | None = None
    window: Window | None = None
    on_error: OnError = "stop"
    dynamic: bool = False
    batch_max: int = DEFAULT_BATCH
    order: Order = "shuffle"
    seed: int | None = None
    """Seed of the shuffle; None: the campaign's id (``fwcm.rollout.groups``)."""
    delta_max_share: float | None = None
    """Server-made delta updates (``fwcm.deltas``): a patch is sent instead of the image when it
    is at most this percentage of the image's size; None: full images only."""

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
        d = dict(read_table(d, "policy"))
        if "error_threshold_percent" in d:  # the first policy format: a bare number
            v = d.pop("error_threshold_percent")
            pct = read_number(v, "error_threshold_percent", PERCENT_RANGE, strict)
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
            return join_key(where, key)

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
                read_number(rate, name("rate_per_minute"), RATE_RANGE, strict) if rate is not None else None
            ),
            ramp=read_ramp(r["ramp"], name("ramp"), strict) if "ramp" in r else None,
            device_timeout_s=(
                parse_duration(timeout, name("device_timeout"), TIMEOUT_RANGE, strict)
                if timeout is not None
                else DEFAULT_DEVICE_TIMEOUT_S
            ),
            retries=read_retries(r["retries"], name("retries"), strict) if "retries" in r else Retries(),
            start_at=parse_instant(start_at, name("start_at"), strict) if start_at is not None else None,
            window=read_window(r["window"], name("window")) if "window" in r else None,
            on_error=read_choice(r.get("on_error", "stop"), name("on_error"), ("stop", "pause")),
            dynamic=read_bool(dynamic, dynamic_key),
            batch_max=read_int(r.get("batch_max", DEFAULT_BATCH), name("batch_max"), BATCH_RANGE, strict),
            order=read_choice(r.get("order", "shuffle"), name("order"), ORDERS),
            seed=read_int(r["seed"], name("seed"), SEED_RANGE, strict) if r.get("seed") is not None else None,
            delta_max_share=read_delta(r.get("delta", False), name("delta")),
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
        d["order"] = self.order
        if self.seed is not None:
            d["seed"] = self.seed
        if self.delta_max_share is not None:
            d["delta"] = f"{self.delta_max_share:g}%"
        d["dynamic"] = self.dynamic
        d["phases"] = [p.to_dict() for p in self.phases]
        return d

    # -- phases ----------------------------------------------------------------------------

    def phase_sizes(self, total: int, grouped: Mapping[int, int] | None = None) -> list[int]:
        """Devices per phase for a frozen subset of ``total``; they always add up to ``total``.

        ``grouped``: devices each filter phase (rollout group) took; the count and share phases
        share out the rest. Shares are of the whole subset, and ``until`` counts every device of
        the phases before it, groups included.
        """
        grouped = grouped or {}
        pool = total - sum(grouped.get(i, 0) for i, ph in enumerate(self.phases) if ph.filter is not None)
        sizes: list[int] = []
        assigned = used = 0
        last = len(self.phases) - 1
        for i, ph in enumerate(self.phases):
            remaining = pool - used
            if ph.filter is not None:
                n = grouped.get(i, 0)
                assigned += n
                sizes.append(n)
                continue
            if i == last:
                n = remaining
            elif ph.size is not None:
                n = min(ph.size.resolve(total), remaining)
            else:
                assert ph.until is not None
                n = min(max(0, min(ph.until.resolve(total), total) - assigned), remaining)
            sizes.append(n)
            assigned += n
            used += n
        return sizes

    def phase_bounds(self, total: int) -> list[int]:
        """Cumulative ends: the device ranked ``r`` (0-based) joins the first phase with ``r < bound``
        (without rollout groups)."""
        out, acc = [], 0
        for n in self.phase_sizes(total):
            acc += n
            out.append(acc)
        return out

    @property
    def late_phase(self) -> int:
        """Phase that devices joining a dynamic campaign after its start are assigned to: the last."""
        return len(self.phases) - 1

    @property
    def groups(self) -> dict[int, str]:
        """The filter of each rollout group, by phase index."""
        return {i: ph.filter for i, ph in enumerate(self.phases) if ph.filter is not None}

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
