"""Semantic version precedence as a text key, so a database orders versions with a plain ``<``.

``version >= "1.0.10"`` in a device filter must not match 1.0.4 (as text comparison would).  The
store keeps ``version_key(version)`` beside each device's version and compares keys; SQLite and
PostgreSQL (with the ``C`` collation) both compare text byte by byte, which is what the key is
built for.

Accepted (Semantic Versioning 2.0.0, slightly relaxed): an optional ``v``, one to three numeric
components (missing ones are 0: ``1.2`` is ``1.2.0``), an optional pre-release
(``-rc.1``, ``-alpha``) and optional build metadata (``+build.5``, ignored for precedence).
Precedence follows semver §11: numbers compare numerically, a pre-release comes before its
release, pre-release identifiers compare numerically when numeric, in ASCII order otherwise,
numeric before alphanumeric, and a longer list after its prefix.
"""

from __future__ import annotations

import re

_VERSION = re.compile(
    r"^[vV]?(?P<core>0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:\.(0|[1-9]\d*))?"
    r"(?:-(?P<pre>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
MAX_VERSION_CHARS = 64
"""The longest version a device may report (the ``version`` column)."""
KEY_CHARS = 200
"""The longest key of a version of at most ``MAX_VERSION_CHARS`` characters."""

# Key alphabet: digits, identifier characters, and below them all the two marks that end a
# pre-release identifier: END (no more identifiers) sorts before SEP (another follows).
_END, _SEP = "!", "#"
_RELEASE, _PRE = "~", "-"  # after the numbers: a release sorts after every pre-release


def _number(digits: str) -> str:
    """A number as its length (two digits) then its digits: longer is larger, equal length by digit."""
    return f"{len(digits):02d}{digits}"


def _identifier(ident: str) -> str:
    """Numeric identifiers (``0``) sort before alphanumeric ones (``1``)."""
    return "0" + _number(ident) if ident.isdigit() else "1" + ident


def version_key(version: str | None) -> str | None:
    """The sort key of a semantic version, or None when ``version`` is not one."""
    if version is None or len(version) > MAX_VERSION_CHARS:
        return None
    m = _VERSION.match(version.strip())
    if m is None:
        return None
    numbers = [str(int(g)) if g is not None else "0" for g in m.groups()[:3]]
    key = "".join(_number(n) for n in numbers)
    pre = m.group("pre")
    if pre is None:
        return key + _RELEASE
    return key + _PRE + _SEP.join(_identifier(i) for i in pre.split(".")) + _END


def is_version(text: str) -> bool:
    return version_key(text) is not None
