"""Creating and starting a campaign (pure): the checked draft and the plan of a start."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fwcm import filters
from fwcm.errors import Invalid
from fwcm.rollout import launch
from fwcm.rollout.policy import Policy


def test_invalid_policy_is_refused_at_creation() -> None:
    with pytest.raises(Invalid, match="unknown key 'rate'"):
        launch.draft("x", "", {"rate": 10})


def test_a_draft_holds_the_stored_forms() -> None:
    d = launch.draft("  eu  ", "tag.region == 'eu'", {"rate_per_minute": 10}, attestation=True)
    assert d.name == "eu" and d.filter == 'tag.region == "eu"' and d.attestation
    assert d.policy == Policy.from_dict({"rate_per_minute": 10}).to_dict()
    assert d.consent is None and d.variants == {}
    assert launch.draft("none", "", None).policy == {}


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, 7])
def test_a_campaign_name_is_1_to_200_characters(name: object) -> None:
    with pytest.raises(Invalid, match="campaign name must be 1-200 characters"):
        launch.draft(name)


def test_bad_filters_and_policies_are_refused() -> None:
    with pytest.raises(filters.FilterError, match="unknown field 'colour'"):
        launch.draft("x", "colour == 'red'")
    with pytest.raises(Invalid, match="policy must be an object"):
        launch.draft("x", "", ["rate"])
    with pytest.raises(Invalid, match="invalid rollout policy: rate_per_minute"):
        launch.draft("x", "", {"rate_per_minute": -1})


def test_a_consent_draft_takes_peers_or_a_filter_and_names_the_requester() -> None:
    consent = {
        "deadline": "1h",
        "peers": ["s1", "s2"],
        "options": {"v": ["a", "b"]},
        "variant_option": "v",
        "variants": {"a": 3, "b": 4},
    }
    d = launch.draft("c", "", None, consent=consent, requester="Acme Corp")
    assert d.filter == 'name in ["s1", "s2"]'
    assert d.consent is not None and d.consent["requester"] == "Acme Corp"
    assert d.variants == {"a": 3, "b": 4}
    named = launch.draft("c", "", None, consent={**consent, "requester": "Ops"}, requester="Acme Corp")
    assert named.consent is not None and named.consent["requester"] == "Ops"
    with pytest.raises(Invalid, match="either a device filter or peers, not both"):
        launch.draft("c", "tag.region == 'eu'", None, consent=consent)
    with pytest.raises(Invalid, match="consent"):
        launch.draft("c", "", None, consent={"deadline": "1m", "quorum": "most"})


def test_a_start_splits_devices_into_phases_and_waits_for_start_at() -> None:
    stored = launch.stored_policy({"phases": [{"until": "10%"}, {"until": "50%"}, {"until": "100%"}]})
    plan = launch.start_plan(stored, 20, now=0.0)
    assert plan == launch.StartPlan(bounds=(2, 10, 20), state="running")
    later = datetime(2100, 1, 1, tzinfo=UTC).isoformat()
    scheduled = launch.start_plan(launch.stored_policy({"start_at": later}), 5, now=0.0)
    assert scheduled == launch.StartPlan(bounds=(5,), state="scheduled")
    assert launch.start_plan({}, 3, now=0.0) == launch.StartPlan(bounds=(3,), state="running")


def test_phase_names_label_the_stored_phases() -> None:
    stored = launch.stored_policy({"phases": [{"until": "10%", "name": "canary"}, {}]})
    assert launch.phase_names(stored) == ["phase 1 (canary)", "phase 2"]
    assert launch.phase_names({"phases": "garbage"}) == []
