"""Every number of a campaign policy has a range: refused outside it when a campaign is defined
(naming the key and the range), clamped into it when a stored row is read, and the time
arithmetic on it never leaves what datetimes hold."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwcm.rollout.consent import ConsentSpec, deadline_at
from fwcm.rollout.definition import DefinitionError, load_definition
from fwcm.rollout.policy import Policy
from fwcm.rollout.values import MAX_DURATION_S, PolicyError

DAY = 86400.0
NOW = 1_780_000_000.0  # 2026

# (stored/API policy, key as named in the error, range as stated in the error)
OUT_OF_RANGE: list[tuple[dict[str, Any], str, str]] = [
    ({"retries": {"backoff": "100000000d"}}, "retries.backoff", "at least 0s and at most 365d"),
    ({"retries": {"factor": 1e308}}, "retries.factor", "at least 1 and at most 100"),
    ({"device_timeout": "100000000d"}, "device_timeout", "at least 1s and at most 365d"),
    ({"device_timeout": 0}, "device_timeout", "at least 1s and at most 365d"),
    ({"rate_per_minute": 1e308}, "rate_per_minute", "at least 1 and at most 1,000,000"),
    ({"batch_max": 10**28}, "batch_max", "at least 1 and at most 100,000"),
    ({"phases": [{"size": 1}] * 20_000 + [{}]}, "phases", "at most 100 phases"),
    ({"retries": {"max_backoff": "366d"}}, "retries.max_backoff", "at most 365d"),
    ({"retries": {"max_attempts": 101}}, "retries.max_attempts", "at least 1 and at most 100"),
    ({"retries": {"results": [3, 256]}}, "retries.results", "at least 1 and at most 255"),
    ({"retries": {"results": list(range(1, 66))}}, "retries.results", "at most 64 result codes"),
    ({"ramp": {"base": 2e6, "factor": 2, "every_successes": 1}}, "ramp.base", "at most 1,000,000"),
    ({"ramp": {"base": 1, "factor": 101, "every_successes": 1}}, "ramp.factor", "at most 100"),
    (
        {"ramp": {"base": 1, "factor": 2, "every_successes": 10**10}},
        "ramp.every_successes",
        "at most 1,000,000,000",
    ),
    ({"error_min_devices": 10**10}, "error_min_devices", "at least 1 and at most 1,000,000,000"),
    ({"phases": [{"size": 10**10}, {}]}, "phases[0].size", "at least 0 and at most 1,000,000,000"),
    ({"phases": [{"name": "x" * 101, "size": 1}, {}]}, "phases[0].name", "at most 100 characters"),
    ({"start_at": "9999-12-31T23:00:00-05:00"}, "start_at", "at most 9999-12-31T00:00:00Z"),
    ({"start_at": "0001-01-01T00:00:00+05:00"}, "start_at", "at least 1970-01-01T00:00:00Z"),
    ({"rate_per_minute": 10**400}, "rate_per_minute", "at most 1,000,000, not about 1e400"),
    ({"device_timeout": "9" * 65 + "s"}, "device_timeout", "must be a duration"),
]


@pytest.mark.parametrize(("policy", "key", "range_"), OUT_OF_RANGE)
def test_out_of_range_policy_values_are_refused_naming_key_and_range(
    policy: dict[str, Any], key: str, range_: str
) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(policy)
    assert str(exc.value).startswith(f"{key}: ")
    assert range_ in str(exc.value)


def test_the_bounds_themselves_are_accepted() -> None:
    p = Policy.from_dict(
        {
            "rate_per_minute": 1_000_000,
            "ramp": {"base": 1_000_000, "factor": 100, "every_successes": 1_000_000_000},
            "device_timeout": "365d",
            "retries": {"max_attempts": 100, "backoff": 0, "factor": 100, "max_backoff": "365d"},
            "batch_max": 100_000,
            "error_min_devices": 1_000_000_000,
            "phases": [{"size": 1}] * 99 + [{}],
            "start_at": "9999-12-31T00:00:00Z",
        }
    )
    assert len(p.phases) == 100 and p.device_timeout_s == 365 * DAY and p.batch_max == 100_000
    assert Policy.from_dict(p.to_dict()) == p


# The same values in a campaign file: the key as written in TOML, and the same range.
TOML_OUT_OF_RANGE = [
    ('[rollout]\nretries = { backoff = "100000000d" }\n', "rollout.retries.backoff", "at most 365d"),
    ("[rollout]\nretries = { factor = 1e308 }\n", "rollout.retries.factor", "at most 100"),
    ('[rollout]\ndevice_timeout = "100000000d"\n', "rollout.device_timeout", "at most 365d"),
    ("[rollout]\ndevice_timeout = 0\n", "rollout.device_timeout", "at least 1s"),
    ("[rollout]\nrate_per_minute = 1e308\n", "rollout.rate_per_minute", "at most 1,000,000"),
    ("[rollout]\nbatch_max = 5000000\n", "rollout.batch_max", "at least 1 and at most 100,000"),
    ("[[phase]]\nsize = 1\nerror_min_devices = 0\n[[phase]]\n", "phase 1.error_min_devices", "at least 1"),
    ("[[phase]]\nsize = 1\n" * 101 + "[[phase]]\n", "phase", "at most 100 phases, not 102"),
    ('[consent]\ndeadline = "400d"\n', "consent.deadline", "at most 365d"),
    ('[consent]\ndeadline = "1h"\nmax_uses = 10000000000\n', "consent.max_uses", "at most 1,000,000,000"),
    ('[consent]\ndeadline = "1h"\naccounting_every = "0.5s"\n', "consent.accounting_every", "at least 1s"),
    ('[consent]\ndeadline = "1h"\nquorum = 0\n', "consent.quorum", "at least 1"),
]


@pytest.mark.parametrize(("table", "key", "range_"), TOML_OUT_OF_RANGE)
def test_campaign_files_refuse_out_of_range_values(table: str, key: str, range_: str) -> None:
    with pytest.raises(DefinitionError) as exc:
        load_definition('[campaign]\nname = "x"\n' + table)
    assert str(exc.value).startswith(f"{key}: ") and range_ in str(exc.value)


def test_consent_peers_must_fit_the_campaign_filter() -> None:
    few = ConsentSpec.parse({"deadline": "1h", "initiator": "gw", "peers": [f"p{i}" for i in range(100)]})
    assert few.peer_filter() is not None and len(few.peer_filter() or "") <= 4096
    with pytest.raises(PolicyError) as exc:
        ConsentSpec.parse({"deadline": "1h", "peers": [f"sensor-{i:04d}" for i in range(5000)]})
    assert str(exc.value) == "consent.peers: at most 1,000 devices, not 5,000"
    with pytest.raises(PolicyError) as exc:  # few enough names, but too long together
        ConsentSpec.parse({"deadline": "1h", "peers": [f"{'n' * 60}{i:04d}" for i in range(100)]})
    assert str(exc.value).startswith("consent.peers: the 100 device names make a filter of 6,808 characters")
    with pytest.raises(PolicyError) as exc:
        ConsentSpec.parse({"deadline": "1h", "peers": ['a"] or name != "']})
    assert "is not a device name" in str(exc.value)


# -- stored rows: read, clamped, and the arithmetic stays within datetimes ------------------------

STORED_BAD = {
    "retries": {"max_attempts": 5, "backoff": "100000000d", "factor": 1e308, "max_backoff": 1e300},
    "device_timeout": "100000000d",
    "rate_per_minute": 1e308,
    "batch_max": 10**28,
    "start_at": "0001-01-01T00:00:00+05:00",
}


def test_a_stored_policy_outside_the_ranges_is_read_clamped() -> None:
    p = Policy.from_stored(STORED_BAD)
    assert p.retries.backoff_s == MAX_DURATION_S and p.retries.factor == 100
    assert p.device_timeout_s == MAX_DURATION_S and p.rate_per_minute == 1_000_000
    assert p.batch_max == 100_000 and p.start_at == 0
    with pytest.raises(PolicyError):
        Policy.from_dict(STORED_BAD)  # the same row is refused when a campaign is created


def test_time_arithmetic_of_a_clamped_policy_gives_datetimes() -> None:
    p = Policy.from_stored(STORED_BAD)
    for attempt in (1, 2, 4):
        at = p.retry_at(4, attempt, NOW)  # 4: connection lost, transient
        assert at is not None and at <= NOW + MAX_DURATION_S
        datetime.fromtimestamp(at, UTC)
    cutoff = p.timeout_cutoff("downloading", NOW)
    assert cutoff == NOW - MAX_DURATION_S
    datetime.fromtimestamp(cutoff, UTC)


def test_a_stored_consent_outside_the_ranges_is_read_clamped() -> None:
    stored = {"deadline": 1e300, "quorum": 0, "max_uses": 10**30, "expires_after": 10**30}
    spec = ConsentSpec.from_stored(stored)
    assert spec.deadline_s == MAX_DURATION_S and spec.max_uses == 1_000_000_000
    assert spec.expires_after_s == MAX_DURATION_S
    assert spec.quorum.amount is not None and spec.quorum.amount.count == 1
    datetime.fromtimestamp(deadline_at(NOW, spec), UTC)
    with pytest.raises(PolicyError):
        ConsentSpec.parse(stored)


huge = st.one_of(
    st.floats(min_value=0, max_value=1e308, allow_nan=False), st.integers(min_value=0, max_value=10**40)
)


@settings(max_examples=300, deadline=None)
@given(
    backoff=huge,
    factor=st.floats(min_value=1, max_value=1e308, allow_nan=False),
    max_backoff=st.one_of(st.none(), huge),
    timeout=huge,
    attempts=st.integers(1, 10**6),
    attempt=st.integers(0, 10**6),
)
def test_no_stored_policy_makes_retry_or_timeout_times_leave_datetimes(
    backoff: float, factor: float, max_backoff: float | None, timeout: float, attempts: int, attempt: int
) -> None:
    """Whatever a row holds, ingest and engine turn these times into datetimes without raising."""
    retries: dict[str, Any] = {"max_attempts": attempts, "backoff": backoff, "factor": factor}
    if max_backoff is not None:
        retries["max_backoff"] = max_backoff
    p = Policy.from_stored({"retries": retries, "device_timeout": timeout})
    at = p.retry_at(None, attempt, NOW)
    if at is not None:
        assert NOW <= at <= NOW + MAX_DURATION_S
        datetime.fromtimestamp(at, UTC)
    for state in ("notified", "downloading", "downloaded", "installing"):
        cutoff = p.timeout_cutoff(state, NOW)
        assert cutoff is not None and NOW - MAX_DURATION_S <= cutoff <= NOW
        datetime.fromtimestamp(cutoff, UTC)
