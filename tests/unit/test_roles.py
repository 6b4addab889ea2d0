"""The role rules: which role a request needs, judged from its method and route template alone."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fwcm.roles import Role, is_mutation, parse_duration, refusal, required_role


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("GET", "/api/v1/devices"),
        ("HEAD", "/api/v1/payloads/{sha256}/content"),
        ("GET", "/api/v1/campaigns/{campaign_id}/stats"),
        ("GET", "/api/v1/audit"),
        ("GET", "/api/v1/signers"),
        ("GET", "/api/v1/tenant"),
    ],
)
def test_reads_need_viewer(method: str, route: str) -> None:
    assert required_role(method, route) is Role.VIEWER


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("POST", "/api/v1/devices"),
        ("POST", "/api/v1/campaigns/{campaign_id}/start"),
        ("POST", "/api/v1/payloads"),
        ("PUT", "/api/v1/devices/{name}"),
        ("PATCH", "/api/v1/devices/{name}"),
        ("DELETE", "/api/v1/campaigns/{campaign_id}"),
        ("POST", "/api/v1/factory/devices"),
    ],
)
def test_changes_need_operator(method: str, route: str) -> None:
    assert required_role(method, route) is Role.OPERATOR


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("GET", "/api/v1/keys"),
        ("POST", "/api/v1/keys"),
        ("DELETE", "/api/v1/keys/{name}"),
        ("POST", "/api/v1/signers"),
        ("POST", "/api/v1/signers/{name}/revoke"),
        ("POST", "/api/v1/webhooks"),
        ("DELETE", "/api/v1/webhooks/{webhook_id}"),
    ],
)
def test_keys_and_trust_need_admin(method: str, route: str) -> None:
    assert required_role(method, route) is Role.ADMIN


def test_an_area_is_a_whole_path_segment() -> None:
    assert required_role("POST", "/api/v1/keystore") is Role.OPERATOR
    assert required_role("GET", "/api/v1/keystore") is Role.VIEWER


def test_each_role_allows_what_the_lower_roles_allow() -> None:
    route = "/api/v1/devices"
    assert refusal(Role.VIEWER, Role.VIEWER, "GET", route) is None
    assert refusal(Role.OPERATOR, Role.VIEWER, "GET", route) is None
    assert refusal(Role.ADMIN, Role.OPERATOR, "POST", route) is None
    assert refusal(Role.OPERATOR, Role.ADMIN, "POST", "/api/v1/keys") is not None


def test_a_refusal_names_the_role_needed_and_the_role_held() -> None:
    why = refusal(Role.VIEWER, Role.OPERATOR, "post", "/api/v1/devices")
    assert why == "POST /api/v1/devices needs the operator role; this key has the viewer role"


def test_mutations_are_every_method_but_reads() -> None:
    assert [m for m in ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE") if is_mutation(m)] == [
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
    ]


def test_roles_parse_by_name_only() -> None:
    assert Role.parse(" Operator ") is Role.OPERATOR
    with pytest.raises(ValueError, match="viewer, operator or admin"):
        Role.parse("root")
    with pytest.raises(ValueError):
        Role.parse("3")


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("90m", timedelta(minutes=90)),
        ("12h", timedelta(hours=12)),
        ("30d", timedelta(days=30)),
        ("8w", timedelta(weeks=8)),
    ],
)
def test_durations(text: str, delta: timedelta) -> None:
    assert parse_duration(text) == delta


@pytest.mark.parametrize("text", ["", "30", "0d", "-1d", "1y", "1.5d", "d", "9999999d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
