"""Campaign definitions: the TOML files in ``campaigns/`` (pure: text in, values out).

A definition has a ``[campaign]`` table (name, device filter, dynamic membership, optionally the
manifest), a ``[rollout]`` table (rate, ramp, timeout, retries, schedule, window, defaults for
thresholds) and ``[[phase]]`` tables. :func:`load_definition` checks everything at once and
returns the policy in its stored JSON form, so a typo is reported before a campaign exists,
naming the key as written in the file, and the range when a number is outside it.
``docs/rollout.md`` describes every key and its range.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

from fwcm.rollout.consent import ConsentSpec
from fwcm.rollout.policy import Policy
from fwcm.rollout.values import PolicyError, check_keys

MAX_NAME_CHARS = 200
"""As the API: a campaign name is 1-200 characters."""
CAMPAIGN_KEYS = ("name", "description", "filter", "dynamic", "manifest", "attestation")
TOP_KEYS = ("campaign", "rollout", "phase", "consent")


class DefinitionError(PolicyError):
    """A campaign definition is invalid; the message names the key as written in the file."""


@dataclass(frozen=True)
class CampaignDefinition:
    name: str
    filter: str
    policy: dict[str, Any]
    """The rollout policy in its stored form (``campaigns.policy``); ``Policy.from_dict`` reads it."""
    dynamic: bool = False
    description: str | None = None
    manifest: int | str | None = None
    """Manifest id or digest, when the file names one; the command line may give it instead."""
    attestation: bool = False
    """Devices attest before they are given an install token."""
    consent: dict[str, Any] | None = None
    """The checked ``[consent]`` table in its stored form, for consent campaigns."""

    def to_policy(self) -> Policy:
        return Policy.from_dict(self.policy)


def load_definition(text: str) -> CampaignDefinition:
    """Parse and check a campaign definition; raise DefinitionError naming the bad key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DefinitionError(f"not valid TOML: {exc}") from None
    return definition_from_dict(doc)


def definition_from_dict(doc: dict[str, Any]) -> CampaignDefinition:
    """The same checks for an already parsed document."""
    try:
        check_keys(doc, TOP_KEYS, "definition")
        campaign = doc.get("campaign")
        if not isinstance(campaign, dict):
            raise DefinitionError("campaign: missing; a definition starts with a [campaign] table")
        check_keys(campaign, CAMPAIGN_KEYS, "campaign")
        name = campaign.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DefinitionError("campaign.name: missing; give the campaign a name")
        if len(name) > MAX_NAME_CHARS:
            raise DefinitionError(f"campaign.name: at most {MAX_NAME_CHARS} characters, not {len(name):,}")
        filter_ = campaign.get("filter", "")
        if not isinstance(filter_, str):
            raise DefinitionError("campaign.filter: must be text, such as 'tag.region == \"eu\"'")
        description = campaign.get("description")
        if description is not None and not isinstance(description, str):
            raise DefinitionError("campaign.description: must be text")
        manifest = campaign.get("manifest")
        if manifest is not None and (isinstance(manifest, bool) or not isinstance(manifest, int | str)):
            raise DefinitionError("campaign.manifest: must be a manifest id or digest")
        attestation = campaign.get("attestation", False)
        if not isinstance(attestation, bool):
            raise DefinitionError("campaign.attestation: must be true or false")
        consent = None
        if "consent" in doc:
            consent = ConsentSpec.parse(doc["consent"], "consent").to_dict()
        rollout = doc.get("rollout", {})
        if not isinstance(rollout, dict):
            raise DefinitionError("rollout: must be a table ([rollout])")
        phases = doc.get("phase")
        if phases is not None and not isinstance(phases, list):
            raise DefinitionError("phase: must be an array of tables ([[phase]])")
        policy = Policy.parse(
            rollout,
            phases,
            campaign.get("dynamic", False),
            where="rollout",
            phases_key="phase",
            phase_name=lambda i: f"phase {i + 1}",
            dynamic_key="campaign.dynamic",
        )
    except DefinitionError:
        raise
    except PolicyError as exc:
        raise DefinitionError(str(exc)) from None
    return CampaignDefinition(
        name=name.strip(),
        filter=filter_,
        policy=policy.to_dict(),
        dynamic=policy.dynamic,
        description=description,
        manifest=manifest,
        attestation=attestation,
        consent=consent,
    )
