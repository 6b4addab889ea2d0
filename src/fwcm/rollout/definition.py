"""Campaign definitions: the TOML files in ``campaigns/`` (pure: text in, values out).

A definition has a ``[campaign]`` table (name, device filter, dynamic membership, optionally the
manifest), a ``[rollout]`` table (rate, ramp, timeout, retries, schedule, window, defaults for
thresholds) and ``[[phase]]`` tables. :func:`load_definition` checks everything at once and
returns the policy in its stored JSON form, so a typo is reported before a campaign exists,
naming the key as written in the file, and the range when a number is outside it.
``docs/rollout.md`` describes every key and its range.
"""

from __future__ import annotations

import copy
import re
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
KeyPath = tuple[str | int, ...]
"""Where a key sits in a definition: ``("rollout", "rate_per_minute")``, ``("phase", 0, "size")``."""


MAX_ERRORS = 50
"""A refused definition lists at most this many problems, then counts the rest."""
MAX_CHECKS = 1000
"""Problems looked for in one part of a definition at most (each costs a check of the part)."""


class DefinitionError(PolicyError):
    """A campaign definition is invalid; the message names the key as written in the file.

    From :func:`load_definition`, ``errors`` lists every problem found, each ``line N: problem``
    (``str()`` stays one line: the first problem, and how many more there are).
    """

    def __init__(self, message: str, errors: list[str] | None = None, more: int = 0) -> None:
        self.errors = errors if errors is not None else [message]
        self.more = more
        others = len(self.errors) - 1 + more
        suffix = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
        super().__init__(message + suffix)


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


def load_definition(text: str, max_errors: int = MAX_ERRORS) -> CampaignDefinition:
    """Parse and check a campaign definition; raise DefinitionError listing every problem found.

    The checks stop at their first problem, so the file is checked in parts (``[campaign]`` with
    ``[consent]``, ``[rollout]``, the ``[[phase]]`` tables), and within a part each problem's key
    is set aside (as if the file did not have it) and the part checked again; each problem is
    reported with the line of its key.  A problem that only follows from a key set aside (a phase
    without its bad ``size``) is not reported.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DefinitionError(f"not valid TOML: {exc}") from None
    lines = key_lines(text)
    problems: list[tuple[str, int | None]] = []
    for part in _parts(doc):
        problems += [p for p in _problems(part, lines) if p not in problems]
    if not problems:
        try:
            return definition_from_dict(doc)
        except DefinitionError:  # a rule across parts (dynamic membership and phases)
            problems = _problems(doc, lines)
    problems.sort(key=lambda p: p[1] or 0)
    shown = [f"line {line}: {msg}" if line else msg for msg, line in problems[:max_errors]]
    raise DefinitionError(problems[0][0], shown, max(0, len(problems) - max_errors))


def _parts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The definition as parts checked apart: everything but the rollout, then ``[rollout]`` and
    the phases each under a placeholder ``[campaign]`` (keeping ``dynamic``, which phases depend on)."""
    campaign = doc.get("campaign")
    dynamic = campaign.get("dynamic") if isinstance(campaign, dict) else None
    stand_in: dict[str, Any] = {"name": "-", **({"dynamic": dynamic} if isinstance(dynamic, bool) else {})}
    parts = [{k: v for k, v in doc.items() if k not in ("rollout", "phase")}]
    parts += [{"campaign": stand_in, key: doc[key]} for key in ("rollout", "phase") if key in doc]
    return parts


def _problems(doc: dict[str, Any], lines: dict[KeyPath, int]) -> list[tuple[str, int | None]]:
    """Every problem of ``doc`` with its line, setting each bad key aside in turn (on a copy)."""
    doc = copy.deepcopy(doc)
    found: list[tuple[str, int | None]] = []
    set_aside: list[KeyPath] = []
    while len(found) < MAX_CHECKS:
        try:
            definition_from_dict(doc)
            break
        except DefinitionError as exc:
            message = str(exc)
        path = error_path(message)
        if path is not None and any(p[: len(path)] == path for p in set_aside):
            break  # follows from a key set aside
        found.append((message, _line_of(lines, path)))
        if path is None or not _remove(doc, path):
            break
        set_aside.append(path)
    return found


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def key_lines(text: str) -> dict[KeyPath, int]:
    """The line (1-based) of each table header and key of a definition, by path (the first
    ``[[phase]]`` is index 0).  Enough of TOML for how definitions are written: one key per line,
    inline tables on their key's line."""
    out: dict[KeyPath, int] = {}
    arrays: dict[str, int] = {}
    table: KeyPath = ()
    for n, line in enumerate(text.splitlines(), 1):
        if m := _HEADER.match(line):
            table = tuple(m.group(2).split("."))
            if m.group(1) == "[[":
                arrays[m.group(2)] = arrays.get(m.group(2), -1) + 1
                table = (*table, arrays[m.group(2)])
            out.setdefault(table, n)
        elif m := _ASSIGN.match(line):
            out.setdefault((*table, m.group(1)), n)
    return out


def error_path(message: str) -> KeyPath | None:
    """The key a check's message names (``phase 2.size: ...`` is ``("phase", 1, "size")``), with
    the unknown key itself for ``unknown key 'x'``; None when it names none."""
    where, sep, rest = message.partition(": ")
    if not sep or " " in where.replace("phase ", "", 1):
        return None
    path: list[str | int] = []
    for part in where.split("."):
        if part.startswith("phase ") and part[6:].isdigit():
            path += ["phase", int(part[6:]) - 1]
        elif part != "definition":
            path.append(part)
    if m := re.match(r"unknown key '([^']+)'", rest):
        path.append(m.group(1))
    return tuple(path) or None


def _line_of(lines: dict[KeyPath, int], path: KeyPath | None) -> int | None:
    """The line of the key, or else of its nearest enclosing table; None when not found."""
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def _remove(doc: Any, path: KeyPath) -> bool:
    """Delete the value at ``path`` from the parsed document; False when there is none."""
    *parents, last = path
    for key in parents:
        try:
            doc = doc[key]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(doc, dict) and isinstance(last, str) and last in doc:
        del doc[last]
        return True
    return False


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
