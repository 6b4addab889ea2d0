"""Campaign definition files: the shipped examples load; every mistake names its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fwcm.rollout.definition import DefinitionError, load_definition
from fwcm.rollout.policy import Policy
from fwcm.rollout.values import PolicyError

CAMPAIGNS = Path(__file__).resolve().parents[2] / "campaigns"

FULL = """
[campaign]
name = "eu night"
filter = 'tag.region == "eu"'
dynamic = true
manifest = 7

[rollout]
rate_per_minute = 600
ramp = { base = 60, factor = 2.0, every_successes = 50 }
device_timeout = "10m"
retries = { max_attempts = 3, backoff = "30s", factor = 2.0 }
start_at = 2026-12-01T02:00:00Z
window = { start = 01:00:00, end = "05:00", tz = "Europe/Berlin", mode = "install" }
on_error = "pause"
error_threshold = "10%"

[[phase]]
size = "5%"
success_threshold = "95%"
error_min_devices = 2
advance = "approval"

[[phase]]
"""


def test_shipped_definitions_load() -> None:
    files = sorted(CAMPAIGNS.glob("*.toml"))
    assert {f.name for f in files} >= {"canary.toml", "staged.toml"}
    for f in files:
        d = load_definition(f.read_text())
        assert Policy.from_dict(json.loads(json.dumps(d.policy))) == d.to_policy()
    staged = load_definition((CAMPAIGNS / "staged.toml").read_text()).to_policy()
    assert staged.phase_sizes(300) == [15, 60, 75, 150]  # 5 % -> 25 % -> 50 % -> 100 %
    assert staged.phases[0].error_threshold == 5 and staged.phases[1].error_threshold == 10
    canary = load_definition((CAMPAIGNS / "canary.toml").read_text()).to_policy()
    assert canary.phase_sizes(300) == [10, 290]


def test_every_key_is_read() -> None:
    d = load_definition(FULL)
    assert (d.name, d.filter, d.dynamic, d.manifest) == ("eu night", 'tag.region == "eu"', True, 7)
    p = d.to_policy()
    assert p.rate_per_minute == 600 and p.ramp is not None and p.ramp.every_successes == 50
    assert p.device_timeout_s == 600 and p.retries.max_attempts == 3 and p.retries.backoff_s == 30
    assert p.start_at is not None and p.window is not None and p.window.mode == "install"
    assert p.window.tz == "Europe/Berlin" and p.window.start.hour == 1
    assert p.on_error == "pause" and p.dynamic
    first, last = p.phases
    assert first.advance == "approval" and first.success_threshold == 95 and first.error_min_devices == 2
    assert first.error_threshold == 10 and last.error_threshold == 10  # the [rollout] default
    assert last.success_threshold == 100


MINIMAL = '[campaign]\nname = "x"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[campaign\nname = 1", "not valid TOML"),
        ("[rollout]\nrate_per_minute = 5\n", "campaign: missing"),
        ('[campaign]\nfilter = ""\n', "campaign.name: missing"),
        ('[campaign]\nname = "x"\nfiltr = ""\n', "campaign: unknown key 'filtr'"),
        (MINIMAL + "[rollouts]\n", "definition: unknown key 'rollouts'"),
        (MINIMAL + "[rollout]\nrate_per_mnute = 5\n", "rollout: unknown key 'rate_per_mnute'"),
        (MINIMAL + "[rollout]\nrate_per_minute = 'fast'\n", "rollout.rate_per_minute: must be a number"),
        (
            MINIMAL + '[rollout]\ndevice_timeout = "10 minutes"\n',
            "rollout.device_timeout: must be a duration",
        ),
        (MINIMAL + "[rollout]\nramp = { base = 60, factor = 2 }\n", "rollout.ramp.every_successes: missing"),
        (
            MINIMAL + "[rollout]\nramp = { base = 60, factor = 0.5, every_successes = 1 }\n",
            "rollout.ramp.factor",
        ),
        (MINIMAL + '[rollout]\nretries = { backof = "1s" }\n', "rollout.retries: unknown key 'backof'"),
        (MINIMAL + '[rollout]\nstart_at = "2026-12-01T02:00:00"\n', "rollout.start_at: needs a UTC offset"),
        (MINIMAL + "[rollout]\nstart_at = 2026-12-01T02:00:00\n", "rollout.start_at: needs a UTC offset"),
        (MINIMAL + '[rollout]\nstart_at = "tomorrow"\n', "rollout.start_at: must be a date-time"),
        (
            MINIMAL + '[rollout]\nwindow = { start = "01:00", end = "05:00", tz = "Mars/Olympus" }\n',
            "rollout.window.tz: unknown time zone 'Mars/Olympus'",
        ),
        (
            MINIMAL + '[rollout]\nwindow = { start = "01:00", end = "01:00" }\n',
            "rollout.window: start and end",
        ),
        (
            MINIMAL + '[rollout]\nwindow = { start = "01:00", end = "5pm" }\n',
            "rollout.window.end: must be a time",
        ),
        (
            MINIMAL + '[rollout]\nwindow = { start = "1:00", end = "2:00", mode = "later" }\n',
            "rollout.window.mode: must be one of 'notify', 'install'",
        ),
        (MINIMAL + '[rollout]\non_error = "ignore"\n', "rollout.on_error: must be one of 'stop', 'pause'"),
        (
            MINIMAL + "[rollout]\nsuccess_threshold = 95\n",
            'rollout.success_threshold: must be a percentage such as "95%"',
        ),
        (MINIMAL + '[rollout]\nerror_threshold = "120%"\n', "rollout.error_threshold: must be at most 100%"),
        (MINIMAL + "[campaign.x]\n", "campaign: unknown key 'x'"),
        ('[campaign]\nname = "x"\ndynamic = "yes"\n', "campaign.dynamic: must be true or false"),
        (MINIMAL + "[[phase]]\n[[phase]]\n", "phase 1: needs size"),
        (MINIMAL + '[[phase]]\nsize = "5%"\nuntil = "10%"\n[[phase]]\n', "phase 1: give size"),
        (
            MINIMAL + '[[phase]]\nsize = "five"\n[[phase]]\n',
            'phase 1.size: must be a percentage such as "95%"',
        ),
        (MINIMAL + "[[phase]]\nsize = -1\n[[phase]]\n", "phase 1.size: must be at least 0"),
        (
            MINIMAL + "[[phase]]\nsize = 5\n[[phase]]\nsize = 5\n",
            "phase 2: the last phase takes every remaining",
        ),
        (MINIMAL + '[[phase]]\nsize = 5\nsuccess_treshold = "90%"\n[[phase]]\n', "phase 1: unknown key"),
        (MINIMAL + '[[phase]]\nsize = 5\nadvance = "manual"\n[[phase]]\n', "phase 1.advance: must be one of"),
        (MINIMAL + "[[phase]]\nsize = 5\nerror_min_devices = 0\n[[phase]]\n", "phase 1.error_min_devices"),
        ("phase = 3\n" + MINIMAL, "phase: must be an array of tables"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(DefinitionError) as exc:
        load_definition(text)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)  # one clear line
    assert isinstance(exc.value, PolicyError)


def test_last_phase_may_say_until_100_percent() -> None:
    d = load_definition(MINIMAL + '[[phase]]\nuntil = "10%"\n[[phase]]\nuntil = "100%"\n')
    assert d.to_policy().phase_sizes(50) == [5, 45]


def test_no_phases_is_one_phase_of_every_device() -> None:
    p = load_definition(MINIMAL).to_policy()
    assert p == Policy() and p.phase_sizes(42) == [42]


def test_documented_example_loads() -> None:
    """The annotated file in docs/rollout.md is a valid definition."""
    doc = (CAMPAIGNS.parent / "docs" / "rollout.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    p = load_definition(block).to_policy()
    assert p.phase_sizes(100) == [5, 95] and p.retries.max_backoff_s == 600


EVERY_MISTAKE = """\
[campaign]
name = "x"
colour = "red"
filter = 5

[rollout]
rate_per_minute = -5
retries = { max_attempts = "a", backoff = "1m" }

[[phase]]
size = "x"
succes_threshold = "90%"

[[phase]]
"""


def test_every_problem_is_reported_at_once_with_its_line() -> None:
    with pytest.raises(DefinitionError) as exc:
        load_definition(EVERY_MISTAKE)
    assert [e.split(": ", 2)[:2] for e in exc.value.errors] == [
        ["line 3", "campaign"],
        ["line 4", "campaign.filter"],
        ["line 7", "rollout.rate_per_minute"],
        ["line 8", "rollout.retries.max_attempts"],
        ["line 11", "phase 1.size"],
        ["line 12", "phase 1"],
    ]
    assert "unknown key 'colour'" in exc.value.errors[0]
    assert "unknown key 'succes_threshold'" in exc.value.errors[5]
    assert str(exc.value).endswith("(and 5 more problems)") and "\n" not in str(exc.value)


def test_a_problem_that_follows_from_another_is_not_reported() -> None:
    # without its bad size the first phase also lacks a size: that is the same mistake
    with pytest.raises(DefinitionError) as exc:
        load_definition(MINIMAL + '[[phase]]\nsize = "x"\n[[phase]]\n')
    assert exc.value.errors == ["line 4: phase 1.size: must be a percentage such as \"95%\", not 'x'"]


def test_the_listed_problems_are_bounded() -> None:
    text = MINIMAL + "".join(f"bogus{i} = 1\n" for i in range(80))
    with pytest.raises(DefinitionError) as exc:
        load_definition(text, max_errors=10)
    assert len(exc.value.errors) == 10 and exc.value.more == 70
    assert exc.value.errors[0].startswith("line 3: campaign: unknown key 'bogus0'")
