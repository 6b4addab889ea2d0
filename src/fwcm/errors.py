"""Errors of refused input and missing or clashing objects, raised by the pure checks and the store.

Each type is one answer of the API (``fwcm.api`` maps them): ``NotFound`` 404, ``Conflict`` 409,
``TooLarge`` 413, ``Invalid`` and ``ImportErrors`` 422.  They live apart from the store so that
validation code can raise them without importing anything that does I/O.
"""

from __future__ import annotations


class NotFound(LookupError):
    """The object does not exist for this tenant (it may exist for another: same answer)."""


class Conflict(ValueError):
    """The request clashes with current state: a duplicate name, a campaign in the wrong state."""


class Invalid(ValueError):
    """Input that is well-formed but not acceptable: names the field and the problem."""


class TooLarge(Invalid):
    """An upload over its configured limit (HTTP 413)."""


class ImportErrors(Invalid):
    """A CSV import refused as a whole; ``errors`` lists ``line N: problem`` entries."""

    def __init__(self, errors: list[str], more: int = 0) -> None:
        self.errors = errors
        self.more = more
        summary = "; ".join(errors[:3])
        extra = len(errors) - 3 + more
        if extra > 0:
            summary += f"; and {extra} more"
        super().__init__(f"CSV import refused, nothing imported: {summary}")
