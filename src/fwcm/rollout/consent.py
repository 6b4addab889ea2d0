"""Consent campaigns (pure): invitations, quorum rules, variants, group commit, time limits.

A consent campaign first *invites* its devices (the notice says what, who asks, the options on
offer and a deadline); each device accepts with its chosen options or declines. The quorum rule
says when the provider goes on: ``all`` devices answered; at least ``N`` (or ``N%``) accepted; or
``any``: at least one accepted once the deadline passed. A rule that cannot be met by the
deadline ends the campaign with ``quorum_not_met`` and nothing is installed.

Accepting devices then get the manifest that matches their choice (``variants``), install it as a
coordinated group when ``group`` is set (prepare everywhere, then commit, or abort everywhere),
send usage accounting, and remove the software again after ``max_uses`` or ``expires_after``.

Nothing here reads a clock or a database: the engine passes counts and times in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fwcm import filters
from fwcm.protocol import NAME_RE
from fwcm.rollout.values import (
    COUNT_RANGE,
    MAX_DEVICES,
    TIMEOUT_RANGE,
    Amount,
    PolicyError,
    Range,
    bounded_duration,
    check_keys,
    parse_amount,
    parse_duration,
    shown,
)

QuorumKind = Literal["all", "min", "any"]
Verdict = Literal["wait", "grant", "refuse"]
GroupVerdict = Literal["wait", "commit", "abort"]

CONSENT_KEYS = (
    "deadline",
    "quorum",
    "options",
    "variant_option",
    "variants",
    "group",
    "prepare_within",
    "accounting_every",
    "max_uses",
    "expires_after",
    "initiator",
    "peers",
    "requester",
)
DEFAULT_PREPARE_S = 600.0
MAX_OPTIONS = 8
MAX_VALUES = 16
MAX_VALUE_CHARS = 64
"""Longest option name, option value or variant key."""
MAX_VARIANTS = 64
MAX_PEERS = 1000
"""Devices a campaign may name as peers; their filter must also fit ``filters.MAX_FILTER_CHARS``."""
MAX_REQUESTER_CHARS = 200
USES_RANGE = Range(1, MAX_DEVICES)
MANIFEST_ID_RANGE = Range(1, 2**63 - 1)
_ANY_DURATION = Range(0, math.inf, duration=True)


@dataclass(frozen=True)
class Quorum:
    """When enough devices have answered: ``all``, ``min`` (``amount`` accepted) or ``any``."""

    kind: QuorumKind
    amount: Amount | None = None

    @classmethod
    def parse(cls, v: Any, path: str, strict: bool = True) -> Quorum:
        if v in ("all", "any"):
            return cls(v)
        if isinstance(v, int | str) and not isinstance(v, bool):
            return cls("min", parse_amount(v, path, strict, COUNT_RANGE))
        raise PolicyError(f'{path}: must be "all", "any", a count such as 3, or a percentage such as "50%"')

    def to_json(self) -> int | str:
        return self.amount.to_json() if self.kind == "min" and self.amount is not None else self.kind

    def describe(self, total: int) -> str:
        if self.kind == "all":
            return f"all {total} devices answer"
        if self.kind == "any":
            return "at least one device accepts by the deadline"
        assert self.amount is not None
        return f"at least {self.amount.resolve(total)} of {total} devices accept"


@dataclass(frozen=True)
class Tally:
    """Answers so far: ``total`` invited devices, of which ``accepted`` and ``declined`` answered."""

    total: int
    accepted: int
    declined: int

    @property
    def answered(self) -> int:
        return self.accepted + self.declined

    @property
    def silent(self) -> int:
        return self.total - self.answered


def quorum_verdict(q: Quorum, t: Tally, *, deadline_passed: bool) -> tuple[Verdict, str]:
    """Grant, refuse or wait, with the reason a status display shows."""
    if q.kind == "all":
        if t.silent == 0:
            if t.accepted == 0:
                return "refuse", f"quorum_not_met: all {t.total} devices declined"
            return "grant", f"all {t.total} devices answered: {t.accepted} accepted, {t.declined} declined"
        if deadline_passed:
            return "refuse", f"quorum_not_met: {t.silent} of {t.total} devices did not answer by the deadline"
        return "wait", f"waiting for answers: {t.answered} of {t.total}"
    if q.kind == "min":
        assert q.amount is not None
        need = max(1, q.amount.resolve(t.total))
        if t.accepted >= need:
            return "grant", f"{t.accepted} of {t.total} devices accepted (at least {need} needed)"
        if t.accepted + t.silent < need:
            return (
                "refuse",
                f"quorum_not_met: {t.declined} declined; {need} acceptances can no longer be reached",
            )
        if deadline_passed:
            return (
                "refuse",
                f"quorum_not_met: {t.accepted} of {t.total} accepted by the deadline, {need} needed",
            )
        return "wait", f"waiting for acceptances: {t.accepted} of {need} needed"
    if not deadline_passed:
        if t.silent == 0 and t.accepted == 0:
            return "refuse", f"quorum_not_met: all {t.total} devices declined"
        return "wait", f"collecting answers until the deadline: {t.accepted} accepted so far"
    if t.accepted >= 1:
        return "grant", f"deadline passed with {t.accepted} of {t.total} devices accepted"
    return "refuse", "quorum_not_met: no device accepted by the deadline"


@dataclass(frozen=True)
class Group:
    """Members of a coordinated install, by where they stand."""

    members: int
    """Devices that accepted (and so must all prepare)."""
    prepared: int
    """Downloaded and verified, waiting for commit."""
    failed: int
    """Failed, timed out or cancelled before preparing."""


def group_verdict(g: Group, *, deadline_passed: bool) -> tuple[GroupVerdict, str]:
    """Two-phase commit: commit once every member is prepared; abort on any failure or the deadline."""
    if g.failed:
        return "abort", f"group aborted: {g.failed} of {g.members} members failed to prepare"
    if g.members and g.prepared >= g.members:
        return "commit", f"all {g.members} members prepared"
    if deadline_passed:
        return "abort", f"group aborted: only {g.prepared} of {g.members} members prepared by the deadline"
    return "wait", f"preparing: {g.prepared} of {g.members} members ready"


@dataclass(frozen=True)
class ConsentSpec:
    """The ``[consent]`` table of a campaign, in checked form; ``to_dict`` is what is stored."""

    deadline_s: float
    quorum: Quorum = field(default_factory=lambda: Quorum("all"))
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    variant_option: str | None = None
    variants: dict[str, int] = field(default_factory=dict)
    """Manifest id per value of ``variant_option`` (or per device class id when it is ``class``)."""
    group: bool = False
    prepare_within_s: float = DEFAULT_PREPARE_S
    accounting_every_s: float | None = None
    max_uses: int | None = None
    expires_after_s: float | None = None
    initiator: str | None = None
    peers: tuple[str, ...] = ()
    requester: str | None = None

    @classmethod
    def parse(cls, v: Any, path: str = "consent", *, strict: bool = True) -> ConsentSpec:
        """Check a ``[consent]`` table; ``strict``: a number outside its range is an error (else
        it is clamped into the range, as when reading a stored campaign)."""
        if not isinstance(v, Mapping):
            raise PolicyError(f"{path}: must be a table")
        check_keys(v, CONSENT_KEYS, path)
        if "deadline" not in v:
            raise PolicyError(f'{path}.deadline: missing; how long devices have to answer, such as "10m"')
        options = _options(v.get("options", {}), f"{path}.options", strict)
        variant_option = v.get("variant_option")
        variants = _variants(v.get("variants", {}), f"{path}.variants", strict)
        if variants and variant_option is None:
            raise PolicyError(f'{path}.variant_option: missing; which option (or "class") picks the variant')
        if variant_option is not None:
            if not isinstance(variant_option, str):
                raise PolicyError(f"{path}.variant_option: must be text")
            if variant_option != "class" and variant_option not in options:
                raise PolicyError(f"{path}.variant_option: {variant_option!r} is not one of the options")
            if variant_option != "class":
                missing = [x for x in options[variant_option] if x not in variants]
                if missing:
                    raise PolicyError(f"{path}.variants: no manifest for {', '.join(missing)}")
        peers = v.get("peers", [])
        if not isinstance(peers, list) or not all(isinstance(p, str) and p for p in peers):
            raise PolicyError(f"{path}.peers: must be a list of device names")
        initiator = v.get("initiator")
        if initiator is not None and not isinstance(initiator, str):
            raise PolicyError(f"{path}.initiator: must be a device name")
        requester = v.get("requester")
        if requester is not None and not isinstance(requester, str):
            raise PolicyError(f"{path}.requester: must be text")
        if strict:
            _check_names(initiator, peers, path)
            if requester is not None and len(requester) > MAX_REQUESTER_CHARS:
                raise PolicyError(f"{path}.requester: at most {MAX_REQUESTER_CHARS} characters")
        group = v.get("group", False)
        if not isinstance(group, bool):
            raise PolicyError(f"{path}.group: must be true or false")
        return cls(
            deadline_s=_positive_duration(v["deadline"], f"{path}.deadline", strict),
            quorum=Quorum.parse(v.get("quorum", "all"), f"{path}.quorum", strict),
            options=options,
            variant_option=variant_option,
            variants=variants,
            group=group,
            prepare_within_s=_positive_duration(
                v.get("prepare_within", DEFAULT_PREPARE_S), f"{path}.prepare_within", strict
            ),
            accounting_every_s=_opt_duration(v.get("accounting_every"), f"{path}.accounting_every", strict),
            max_uses=_opt_count(v.get("max_uses"), f"{path}.max_uses", strict),
            expires_after_s=_opt_duration(v.get("expires_after"), f"{path}.expires_after", strict),
            initiator=initiator,
            peers=tuple(peers),
            requester=requester,
        )

    @classmethod
    def from_stored(cls, d: Mapping[str, Any]) -> ConsentSpec:
        """Read back what :meth:`to_dict` stored (durations are in seconds there); a number outside
        its range (stored before the range existed) is clamped into it rather than refused."""
        return cls.parse(d, strict=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"deadline": self.deadline_s, "quorum": self.quorum.to_json()}
        if self.options:
            d["options"] = {k: list(v) for k, v in self.options.items()}
        if self.variant_option is not None:
            d["variant_option"] = self.variant_option
            d["variants"] = dict(self.variants)
        if self.group:
            d["group"] = True
            d["prepare_within"] = self.prepare_within_s
        for key, value in (
            ("accounting_every", self.accounting_every_s),
            ("max_uses", self.max_uses),
            ("expires_after", self.expires_after_s),
            ("initiator", self.initiator),
            ("requester", self.requester),
        ):
            if value is not None:
                d[key] = value
        if self.peers:
            d["peers"] = list(self.peers)
        return d

    def manifest_for(self, choice: Mapping[str, Any], class_id: str, default: int) -> int | None:
        """The manifest an accepting device gets; None when its choice matches no variant."""
        if self.variant_option is None:
            return default
        key = class_id if self.variant_option == "class" else choice.get(self.variant_option)
        if not isinstance(key, str):
            return None
        return self.variants.get(key)

    def check_choice(self, choice: Mapping[str, Any]) -> str | None:
        """Why a device's chosen options are not acceptable (None: they are)."""
        for k, value in choice.items():
            if k not in self.options:
                return f"unknown option {k!r}"
            if value not in self.options[k]:
                return f"{value!r} is not offered for {k!r}"
        return None

    def peer_filter(self) -> str | None:
        """The device filter naming the peers (and the initiator), when the campaign names them."""
        names = list(dict.fromkeys(([self.initiator] if self.initiator else []) + list(self.peers)))
        if not names:
            return None
        return _names_filter(names)


def _positive_duration(v: Any, path: str, strict: bool) -> float:
    d = parse_duration(v, path, _ANY_DURATION, strict)
    if d <= 0:
        raise PolicyError(f"{path}: must be longer than zero ({TIMEOUT_RANGE}), not {shown(v)}")
    return TIMEOUT_RANGE.fit(d, v, path, strict)


def _opt_duration(v: Any, path: str, strict: bool) -> float | None:
    return None if v is None else _positive_duration(v, path, strict)


def _opt_count(v: Any, path: str, strict: bool) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise PolicyError(f"{path}: must be a whole number of at least 1")
    return int(USES_RANGE.fit(v, v, path, strict))


def _text_key(k: Any, path: str) -> str:
    if not isinstance(k, str) or not k or len(k) > MAX_VALUE_CHARS:
        raise PolicyError(f"{path}: {shown(k)} must be text of 1-{MAX_VALUE_CHARS} characters")
    return k


def _options(v: Any, path: str, strict: bool) -> dict[str, tuple[str, ...]]:
    if not isinstance(v, Mapping):
        raise PolicyError(f"{path}: must be a table of option → list of values")
    if len(v) > MAX_OPTIONS:
        raise PolicyError(f"{path}: at most {MAX_OPTIONS} options")
    out: dict[str, tuple[str, ...]] = {}
    for k, values in v.items():
        if strict:
            _text_key(k, path)
        if not isinstance(values, list) or not values or len(values) > MAX_VALUES:
            raise PolicyError(f"{path}.{k}: must be a list of 1-{MAX_VALUES} values")
        if not all(isinstance(x, str) and x for x in values):
            raise PolicyError(f"{path}.{k}: values must be text")
        if strict:
            for x in values:
                _text_key(x, f"{path}.{k}")
        out[str(k)] = tuple(values)
    return out


def _variants(v: Any, path: str, strict: bool) -> dict[str, int]:
    if not isinstance(v, Mapping):
        raise PolicyError(f"{path}: must be a table of option value → manifest id")
    if strict and len(v) > MAX_VARIANTS:
        raise PolicyError(f"{path}: at most {MAX_VARIANTS} variants, not {len(v):,}")
    out: dict[str, int] = {}
    for k, mid in v.items():
        if strict:
            _text_key(k, path)
        if isinstance(mid, bool) or not isinstance(mid, int) or mid not in MANIFEST_ID_RANGE:
            raise PolicyError(f"{path}.{k}: must be a manifest id ({MANIFEST_ID_RANGE}), not {shown(mid)}")
        out[str(k)] = mid
    return out


def _check_names(initiator: str | None, peers: list[str], path: str) -> None:
    """Peers and initiator are device names, few enough that the filter naming them can be stored."""
    if len(peers) > MAX_PEERS:
        raise PolicyError(f"{path}.peers: at most {MAX_PEERS:,} devices, not {len(peers):,}")
    for key, names in (("initiator", [initiator] if initiator is not None else []), ("peers", peers)):
        for n in names:
            if not NAME_RE.match(n):
                raise PolicyError(
                    f"{path}.{key}: {shown(n)} is not a device name (1-64 of A-Z a-z 0-9 . _ -)"
                )
    names = list(dict.fromkeys(([initiator] if initiator else []) + peers))
    if names:
        length = len(_names_filter(names))
        if length > filters.MAX_FILTER_CHARS:
            raise PolicyError(
                f"{path}.peers: the {len(names):,} device names make a filter of {length:,} characters; "
                f"a campaign filter holds at most {filters.MAX_FILTER_CHARS:,} (name fewer devices)"
            )


def _names_filter(names: list[str]) -> str:
    return "name in [" + ", ".join(f'"{n}"' for n in names) + "]"


def deadline_at(started: float, spec: ConsentSpec) -> float:
    return started + bounded_duration(spec.deadline_s)


def uses_left(spec: ConsentSpec, uses: int) -> float:
    """Uses left before a time-limited install is removed (infinite without a limit)."""
    return math.inf if spec.max_uses is None else max(spec.max_uses - uses, 0)
