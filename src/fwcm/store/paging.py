"""One page of a query's rows and how many rows it has in all: what every list of the API answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session


def page(s: Session, query: Select[Any], limit: int, offset: int) -> tuple[int, Sequence[Any]]:
    """``limit`` rows of ``query`` after the first ``offset``, and the total it would give unpaged.

    ``query`` must have a total order (its ``order_by``) so that pages neither overlap nor skip.
    """
    counted: Select[Any] = select(func.count()).select_from(query.order_by(None).subquery())
    total = s.scalar(counted) or 0
    return total, s.scalars(query.limit(limit).offset(offset)).all()
