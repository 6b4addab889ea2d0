"""The nested maps that notices and reports carry, each a value type with named fields.

A notice or report carries these maps under its extension keys (:mod:`fwcm.protocol.messages`).
Each type writes its map (``to_map``) and reads one back with every field bounded (``from_map``,
raising :class:`ProtocolError` ``shape``), so the small integer keys of a map are written down here
and nowhere else. ``what`` names the map in a refusal, e.g. "report key 13 (answer)".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fwcm.protocol.fields import (
    DETAIL_BYTES,
    MAX_OPTION_VALUES,
    MAX_OPTIONS,
    NOTICE_TEXT_BYTES,
    OPTION_BYTES,
    ProtocolError,
    as_uint,
    check_map,
    check_text,
)

ACCOUNTING_KINDS = ("interim", "final", "removed")

# Invitation: {? 1: requester, ? 2: campaign name, ? 3: {option: [values]}, ? 4: deadline, ? 5: initiator}
_REQUESTER, _CAMPAIGN_NAME, _OPTIONS, _DEADLINE, _INITIATOR = 1, 2, 3, 4, 5
# UsageLimits: {? 1: max uses, ? 2: expires after s, ? 3: accounting interval s}
_MAX_USES, _EXPIRES_AFTER, _ACCOUNTING_EVERY = 1, 2, 3
# Answer: {1: accepted, ? 2: {option: value}}
_ACCEPTED, _CHOICE = 1, 2
# Accounting: {1: kind, 2: uses, 3: seconds, ? 4: detail}
_KIND, _USES, _SECONDS, _DETAIL = 1, 2, 3, 4


def _present(pairs: tuple[tuple[int, Any], ...]) -> dict[int, Any]:
    """The map of the pairs whose value is given (None: the key is left out)."""
    return {k: v for k, v in pairs if v is not None}


@dataclass(frozen=True)
class Invitation:
    """Notice key 13 (invite notices): who asks the device's owner, for which campaign, which
    options they may choose from, and by when. A receiver takes what is there."""

    requester: str | None = None
    campaign_name: str | None = None
    options: Mapping[str, tuple[str, ...]] | None = None
    deadline: int | None = None
    """POSIX time after which an answer no longer counts."""
    initiator: str | None = None

    def to_map(self) -> dict[int, Any]:
        options = None if self.options is None else {k: list(v) for k, v in self.options.items()}
        return _present(
            (
                (_REQUESTER, self.requester),
                (_CAMPAIGN_NAME, self.campaign_name),
                (_OPTIONS, options),
                (_DEADLINE, self.deadline),
                (_INITIATOR, self.initiator),
            )
        )

    @classmethod
    def from_map(cls, v: Any, what: str = "invitation") -> Invitation:
        m = check_map(v, what, frozenset({_REQUESTER, _CAMPAIGN_NAME, _OPTIONS, _DEADLINE, _INITIATOR}))
        texts = {
            key: check_text(m[key], NOTICE_TEXT_BYTES, f"{what}: key {key}")
            for key in (_REQUESTER, _CAMPAIGN_NAME, _INITIATOR)
            if key in m
        }
        deadline = as_uint(m[_DEADLINE], f"{what}: deadline") if _DEADLINE in m else None
        options = m.get(_OPTIONS, {})
        if not isinstance(options, Mapping) or len(options) > MAX_OPTIONS:
            raise ProtocolError(
                "shape", f"{what}: key {_OPTIONS} must be a map of at most {MAX_OPTIONS} options"
            )
        offered: dict[str, tuple[str, ...]] = {}
        for name, values in options.items():
            check_text(name, OPTION_BYTES, f"{what}: option", 1)
            if not isinstance(values, list | tuple) or not 1 <= len(values) <= MAX_OPTION_VALUES:
                raise ProtocolError("shape", f"{what}: option {name!r} needs 1..{MAX_OPTION_VALUES} values")
            offered[name] = tuple(check_text(value, OPTION_BYTES, f"{what}: value", 1) for value in values)
        return cls(
            requester=texts.get(_REQUESTER),
            campaign_name=texts.get(_CAMPAIGN_NAME),
            options=offered if _OPTIONS in m else None,
            deadline=deadline,
            initiator=texts.get(_INITIATOR),
        )


@dataclass(frozen=True)
class UsageLimits:
    """Notice key 15 (update notices): limits of the installed software, which removes itself at
    the first one reached, and how often the device reports its use."""

    max_uses: int | None = None
    expires_after_s: int | None = None
    accounting_every_s: int | None = None

    def to_map(self) -> dict[int, Any]:
        return _present(
            (
                (_MAX_USES, self.max_uses),
                (_EXPIRES_AFTER, self.expires_after_s),
                (_ACCOUNTING_EVERY, self.accounting_every_s),
            )
        )

    @classmethod
    def from_map(cls, v: Any, what: str = "limits") -> UsageLimits:
        m = check_map(v, what, frozenset({_MAX_USES, _EXPIRES_AFTER, _ACCOUNTING_EVERY}))
        given = {key: as_uint(n, f"{what}: key {key}") for key, n in m.items()}
        return cls(given.get(_MAX_USES), given.get(_EXPIRES_AFTER), given.get(_ACCOUNTING_EVERY))


@dataclass(frozen=True)
class Answer:
    """Report key 13: the owner's answer to an invitation, and the option values they chose."""

    accepted: bool
    choice: Mapping[str, str] | None = None

    def to_map(self) -> dict[int, Any]:
        choice = None if self.choice is None else dict(self.choice)
        return _present(((_ACCEPTED, self.accepted), (_CHOICE, choice)))

    @classmethod
    def from_map(cls, v: Any, what: str = "answer") -> Answer:
        m = check_map(v, what, frozenset({_ACCEPTED, _CHOICE}), frozenset({_ACCEPTED}))
        if type(m[_ACCEPTED]) is not bool:
            raise ProtocolError("shape", f"{what}: key {_ACCEPTED} must be true or false")
        choice = _choice(m[_CHOICE], f"{what}: key {_CHOICE}") if _CHOICE in m else None
        return cls(m[_ACCEPTED], choice)


def _choice(v: Any, what: str) -> dict[str, str]:
    """``{option: value}``: at most MAX_OPTIONS names and values of 1..OPTION_BYTES."""
    if not isinstance(v, Mapping) or len(v) > MAX_OPTIONS:
        raise ProtocolError("shape", f"{what} must be a map of at most {MAX_OPTIONS} options")
    return {
        check_text(name, OPTION_BYTES, f"{what} option", 1): check_text(
            value, OPTION_BYTES, f"{what} value", 1
        )
        for name, value in v.items()
    }


@dataclass(frozen=True)
class Accounting:
    """Report key 14: usage of installed software so far; ``kind`` says whether use goes on
    (``interim``), ended (``final``) or the software removed itself (``removed``)."""

    kind: str
    uses: int
    seconds: int
    detail: str | None = None

    def to_map(self) -> dict[int, Any]:
        return _present(
            ((_KIND, self.kind), (_USES, self.uses), (_SECONDS, self.seconds), (_DETAIL, self.detail))
        )

    @classmethod
    def from_map(cls, v: Any, what: str = "accounting") -> Accounting:
        m = check_map(
            v, what, frozenset({_KIND, _USES, _SECONDS, _DETAIL}), frozenset({_KIND, _USES, _SECONDS})
        )
        kind = m[_KIND]
        if kind not in ACCOUNTING_KINDS or type(kind) is not str:
            raise ProtocolError("shape", f"{what}: key {_KIND} must be one of {', '.join(ACCOUNTING_KINDS)}")
        uses = as_uint(m[_USES], f"{what}: uses")
        seconds = as_uint(m[_SECONDS], f"{what}: seconds")
        detail = check_text(m[_DETAIL], DETAIL_BYTES, f"{what}: detail") if _DETAIL in m else None
        return cls(kind, uses, seconds, detail)
