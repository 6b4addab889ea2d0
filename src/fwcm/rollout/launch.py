"""Creating and starting a campaign (pure): the checked draft it is stored from, the plan of its start.

``draft`` checks what a requester sends (name, device filter, rollout policy, consent table) and
returns each in the form the store keeps, so a typo is refused before a campaign exists and never
reaches start.  ``start_plan`` reads the stored policy back when the campaign starts: how the frozen
devices split into phases, and whether it runs at once or waits for its ``start_at``.
``phase_names`` labels those phases for the campaign's status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fwcm import filters
from fwcm.errors import Invalid
from fwcm.rollout.consent import ConsentSpec
from fwcm.rollout.definition import MAX_NAME_CHARS
from fwcm.rollout.groups import Member, assign, seed_of
from fwcm.rollout.pace import Estimate, Progress, estimate
from fwcm.rollout.policy import Policy
from fwcm.rollout.values import PolicyError


@dataclass(frozen=True)
class CampaignDraft:
    """A new campaign, checked, in its stored form."""

    name: str
    filter: str
    """The canonical filter text (what start parses)."""
    policy: dict[str, Any]
    """The rollout policy as ``campaigns.policy`` stores it."""
    attestation: bool = False
    consent: dict[str, Any] | None = None
    """The consent table as ``campaigns.consent`` stores it, for consent campaigns."""
    variants: dict[str, int] = field(default_factory=dict)
    """Consent variants: manifest id per option value; each must be a manifest of the tenant."""


@dataclass(frozen=True)
class StartPlan:
    """What a start writes: the phase of each frozen device and the campaign's state."""

    bounds: tuple[int, ...]
    """Cumulative phase ends without rollout groups: the device ranked ``r`` (0-based, in the
    policy's order) joins the first phase with ``r < bound``."""
    state: str
    """``running``, or ``scheduled`` until the policy's ``start_at``."""
    dynamic: bool = False
    """Devices that match later join: an empty start is no mistake."""
    policy: Policy = field(default_factory=Policy, compare=False, repr=False)

    @property
    def groups(self) -> dict[int, str]:
        """Canonical filter of each rollout group (filter phase), by phase index."""
        return self.policy.groups

    def assign(self, members: Sequence[Member], campaign_id: int) -> dict[int, int]:
        """Phase of each member (by device id); ``fwcm.rollout.groups`` holds the rules."""
        return assign(self.policy, members, seed_of(self.policy, campaign_id))

    def describe_order(self, campaign_id: int) -> str:
        """How the count and share phases were filled, for the start event."""
        if self.policy.order == "registration":
            return "in registration order"
        return f"in a shuffle seeded {seed_of(self.policy, campaign_id)}"


StartPlanner = Callable[[Mapping[str, Any] | None, int, float], StartPlan]
"""``start_plan``'s signature: (stored policy, number of matching devices, now) → plan."""
PhaseNamer = Callable[[Mapping[str, Any] | None], list[str]]
"""``phase_names``'s signature: stored policy → a label per phase."""
Pacer = Callable[[Mapping[str, Any] | None, Progress, float], Estimate]
"""``pace``'s signature: (stored policy, progress, now) → pace and ETA."""


def clone_name(name: Any, original: str) -> str:
    """The name of a campaign's clone: the one given, checked, or the original's with " (copy)"."""
    if name is None:
        return (original[: MAX_NAME_CHARS - 7] + " (copy)").strip()
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        raise Invalid(f"campaign name must be 1-{MAX_NAME_CHARS} characters")
    return name.strip()


def draft(
    name: Any,
    filter_text: str | None = None,
    policy: Any = None,
    *,
    attestation: bool = False,
    consent: dict[str, Any] | None = None,
    requester: str | None = None,
) -> CampaignDraft:
    """Check a new campaign; raise Invalid (or FilterError) naming the first problem.

    A consent campaign may name its peer devices (and an initiator) instead of a filter;
    ``requester`` (the tenant's name) is what its invitations say when the table names nobody.
    """
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        raise Invalid(f"campaign name must be 1-{MAX_NAME_CHARS} characters")
    spec = consent_spec(consent, requester) if consent is not None else None
    if spec is not None and spec.peer_filter() is not None:
        if filter_text:
            raise Invalid("a consent campaign takes either a device filter or peers, not both")
        filter_text = spec.peer_filter()
    return CampaignDraft(
        name=name.strip(),
        filter=storable_filter(filter_text),
        policy=stored_policy(policy),
        attestation=attestation,
        consent=spec.to_dict() if spec is not None else None,
        variants=dict(spec.variants) if spec is not None else {},
    )


def storable_filter(text: str | None) -> str:
    """The canonical filter a campaign stores, checked in that form: start parses what is stored,
    and the canonical spelling may be longer than what was sent (spaces, quotes, escapes)."""
    canonical = filters.validate(text)
    if len(canonical) > filters.MAX_FILTER_CHARS:
        raise Invalid(
            f"filter: its canonical form is {len(canonical):,} characters; a campaign stores at most "
            f"{filters.MAX_FILTER_CHARS:,}"
        )
    filters.parse(canonical)
    return canonical


def stored_policy(policy: Any) -> dict[str, Any]:
    """A rollout policy checked strictly (every number in its range) and in its stored form."""
    if policy is None:
        return {}
    if not isinstance(policy, dict):
        raise Invalid("policy must be an object")
    try:
        return Policy.from_dict(policy).to_dict()
    except PolicyError as exc:
        raise Invalid(f"invalid rollout policy: {exc}") from None


def consent_spec(consent: Any, requester: str | None = None) -> ConsentSpec:
    """A checked ``[consent]`` table; ``requester`` fills in who asks when it names nobody."""
    try:
        spec = ConsentSpec.parse(consent)
    except PolicyError as exc:
        raise Invalid(str(exc)) from None
    if spec.requester is None:
        spec = replace(spec, requester=requester)
    return spec


def start_plan(stored: Mapping[str, Any] | None, matching: int, now: float) -> StartPlan:
    """The plan of a start over ``matching`` devices at ``now`` (seconds since the epoch)."""
    try:
        policy = Policy.from_stored(stored or {})
    except PolicyError as exc:
        raise Invalid(f"invalid rollout policy: {exc}") from None
    return StartPlan(
        bounds=tuple(policy.phase_bounds(matching)),
        state=policy.initial_state(now).value,
        dynamic=policy.dynamic,
        policy=policy,
    )


def empty_refusal(filter_text: str, matching: int, plan: StartPlan, allow_empty: bool) -> str | None:
    """Why a start over no device is refused (None: it may start). An empty subset is most often
    a filter typo; a dynamic campaign, or a start that says ``allow_empty``, may start empty."""
    if matching or plan.dynamic or allow_empty:
        return None
    shown = filter_text or "(empty: every device)"
    return (
        f"the filter {shown} matches no device of the tenant; fix the filter, or start with "
        "allow_empty (fwcm campaign start --allow-empty)"
    )


def unknown_tag_warnings(named: set[str], existing: set[str], more: bool = False) -> list[str]:
    """A warning per tag key the filter names that no device of the tenant has, listing the keys
    that exist (``more``: the list is cut short)."""
    keys = ", ".join(sorted(existing)) + (", …" if more else "") if existing else "none"
    return [
        f"filter names tag.{key}, a tag no device of the tenant has (tag keys in use: {keys})"
        for key in sorted(named - existing)
    ]


def phase_names(stored: Mapping[str, Any] | None) -> list[str]:
    """Phase labels of a stored policy; none when the row cannot be read (the status still shows
    the engine's note saying why)."""
    try:
        policy = Policy.from_stored(stored or {})
    except PolicyError:
        return []
    return [policy.label(i) for i in range(len(policy.phases))]


def pace(stored: Mapping[str, Any] | None, progress: Progress, now: float) -> Estimate:
    """Pace and ETA of a campaign (``fwcm.rollout.pace``); none when its policy cannot be read."""
    try:
        policy = Policy.from_stored(stored or {})
    except PolicyError:
        return Estimate(why="its rollout policy cannot be read")
    return estimate(policy, progress, now)
