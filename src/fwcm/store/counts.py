"""A campaign's deployments counted per (phase, state), and its ends per minute, as the triggers
of migration 0015 keep them: a read is a few rows whatever the campaign's size.

On SQLite the triggers update the totals themselves (one writer at a time).  On PostgreSQL they
append signed rows to ``campaign_count_deltas`` instead, so concurrent writers never wait on (or
deadlock over) the same counter rows; a read adds the campaign's pending deltas to its totals in
one statement (one snapshot), and ``fold`` moves the deltas into the totals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, select, text, union_all
from sqlalchemy.orm import Session

from fwcm.rollout.states import AGAINST_ERRORS, NOT_FOR_ME, DeviceState
from fwcm.store.models import CampaignCompletion, CampaignCount
from fwcm.store.models import campaign_count_deltas as deltas

CHARTED = frozenset(st.value for st in AGAINST_ERRORS | NOT_FOR_ME | {DeviceState.SUCCEEDED})
"""Ends counted per minute (the migration's trigger lists them too)."""


def phase_counts(s: Session, campaign_id: int) -> list[tuple[int, str, int]]:
    """``(phase, state, count)`` of the campaign's deployments, by phase and state, none zero."""
    d = deltas.c
    parts = union_all(
        select(CampaignCount.phase, CampaignCount.state, CampaignCount.n).where(
            CampaignCount.campaign_id == campaign_id
        ),
        select(d.phase, d.state, d.n).where(d.campaign_id == campaign_id, d.state.is_not(None)),
        select(d.left_phase, d.left_state, -d.n).where(
            d.campaign_id == campaign_id, d.left_state.is_not(None)
        ),
    ).subquery()
    n = func.sum(parts.c.n)
    rows = s.execute(
        select(parts.c.phase, parts.c.state, n.label("n"))
        .group_by(parts.c.phase, parts.c.state)
        .having(n != 0)
        .order_by(parts.c.phase, parts.c.state)
    )
    return [(int(r.phase), str(r.state), int(r.n)) for r in rows]


def completions(
    s: Session, campaign_id: int, states: Iterable[str], since: datetime, bucket_s: int
) -> list[tuple[float, str, int]]:
    """``(bucket start, state, count)``: the campaign's deployments whose last change, into one of
    ``states`` (charted ends only), was in the minute of ``since`` or later, per ``bucket_s``
    (whole minutes)."""
    wanted = sorted(states)
    if not set(wanted) <= CHARTED or bucket_s % 60:
        raise ValueError(f"completions are counted per minute for {sorted(CHARTED)}")
    first = math.floor(since.timestamp() / 60)
    d = deltas.c
    parts = union_all(
        select(CampaignCompletion.minute, CampaignCompletion.state, CampaignCompletion.n).where(
            CampaignCompletion.campaign_id == campaign_id,
            CampaignCompletion.minute >= first,
            CampaignCompletion.state.in_(wanted),
        ),
        select(d.minute, d.state, d.n).where(
            d.campaign_id == campaign_id, d.minute >= first, d.state.in_(wanted)
        ),
        select(d.left_minute, d.left_state, -d.n).where(
            d.campaign_id == campaign_id, d.left_minute >= first, d.left_state.in_(wanted)
        ),
    ).subquery()
    slot = (parts.c.minute // (bucket_s // 60)).label("slot")
    n = func.sum(parts.c.n)
    rows = s.execute(select(slot, parts.c.state, n.label("n")).group_by(slot, parts.c.state).having(n != 0))
    return [(float(r.slot) * bucket_s, str(r.state), int(r.n)) for r in rows]


_FOLD = text(
    """
    WITH moved AS (
      DELETE FROM campaign_count_deltas RETURNING *
    ), sides AS (
      SELECT campaign_id, phase, state, minute, n FROM moved WHERE state IS NOT NULL
      UNION ALL
      SELECT campaign_id, left_phase, left_state, left_minute, -n FROM moved WHERE left_state IS NOT NULL
    ), kept AS (
      SELECT sides.* FROM sides JOIN campaigns ON campaigns.id = sides.campaign_id
    ), counted AS (
      INSERT INTO campaign_counts (campaign_id, phase, state, n)
      SELECT campaign_id, phase, state, sum(n) FROM kept
      GROUP BY campaign_id, phase, state ORDER BY campaign_id, phase, state
      ON CONFLICT (campaign_id, phase, state) DO UPDATE SET n = campaign_counts.n + excluded.n
    ), timed AS (
      INSERT INTO campaign_completions (campaign_id, minute, state, n)
      SELECT campaign_id, minute, state, sum(n) FROM kept WHERE minute IS NOT NULL
      GROUP BY campaign_id, minute, state ORDER BY campaign_id, minute, state
      ON CONFLICT (campaign_id, minute, state) DO UPDATE SET n = campaign_completions.n + excluded.n
    )
    SELECT count(*) FROM moved
    """
)


def fold(s: Session) -> int:
    """PostgreSQL: move the committed deltas into the totals (those of deleted campaigns are
    dropped) in one statement; returns how many there were.  Concurrent folds do not count a
    delta twice (the second waits for the first's deleted rows, then skips them) and take the
    total rows in one order.  SQLite keeps no deltas."""
    if s.get_bind().dialect.name != "postgresql":
        return 0
    return int(s.scalar(_FOLD) or 0)
