"""campaign counts on SQLite: one update trigger instead of two

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 10:00:00

SQLite ran two triggers for every deployment update: one kept the counts per (phase, state), the
other the completions per minute.  With both in place, the completions trigger's upsert cost
about 100 µs a row whenever a deployment entered a charted end (a success report: 2,000 of them
took 0.22 s against 0.02 s), and each trigger paid its own start per row.  One trigger now does
both, each statement guarded by what it needs, so the counts are the same (the property test in
``tests/integration/test_campaign_counts.py`` compares them with a fresh count).  PostgreSQL keeps
its single delta trigger (0015).
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0018'
down_revision: Union[str, Sequence[str], None] = '0017'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# as of revision 0015: the ends drawn on the console's completions chart, and a row's minute
CHART = "('succeeded', 'skipped', 'declined', 'no_answer', 'failed', 'timed_out', 'reverted')"
OLD_MINUTE = "CAST(strftime('%s', OLD.updated_at) AS INTEGER) / 60"
NEW_MINUTE = "CAST(strftime('%s', NEW.updated_at) AS INTEGER) / 60"
MOVED = "(OLD.state IS NOT NEW.state OR OLD.phase IS NOT NEW.phase)"
"""The deployment left one (phase, state) count for another."""
RESTAMPED = "(OLD.state IS NOT NEW.state OR OLD.updated_at IS NOT NEW.updated_at)"
"""A charted end may have moved to another minute (or state)."""

ONE_TRIGGER = f"""
CREATE TRIGGER deployments_counts_update AFTER UPDATE OF state, phase, updated_at ON deployments
WHEN {MOVED} OR ((OLD.state IN {CHART} OR NEW.state IN {CHART}) AND {RESTAMPED}) BEGIN
  UPDATE campaign_counts SET n = n - 1
    WHERE {MOVED} AND campaign_id = OLD.campaign_id AND phase = OLD.phase AND state = OLD.state;
  INSERT INTO campaign_counts (campaign_id, phase, state, n)
    SELECT NEW.campaign_id, NEW.phase, NEW.state, 1 WHERE {MOVED}
    ON CONFLICT (campaign_id, phase, state) DO UPDATE SET n = n + 1;
  UPDATE campaign_completions SET n = n - 1
    WHERE OLD.state IN {CHART} AND OLD.updated_at IS NOT NULL AND {RESTAMPED}
      AND campaign_id = OLD.campaign_id AND minute = {OLD_MINUTE} AND state = OLD.state;
  INSERT INTO campaign_completions (campaign_id, minute, state, n)
    SELECT NEW.campaign_id, {NEW_MINUTE}, NEW.state, 1
    WHERE NEW.state IN {CHART} AND NEW.updated_at IS NOT NULL AND {RESTAMPED}
    ON CONFLICT (campaign_id, minute, state) DO UPDATE SET n = n + 1;
END
"""

TWO_TRIGGERS = [
    f"""
    CREATE TRIGGER deployments_count_update AFTER UPDATE OF state, phase ON deployments
    WHEN {MOVED} BEGIN
      UPDATE campaign_counts SET n = n - 1
        WHERE campaign_id = OLD.campaign_id AND phase = OLD.phase AND state = OLD.state;
      INSERT INTO campaign_counts (campaign_id, phase, state, n)
        VALUES (NEW.campaign_id, NEW.phase, NEW.state, 1)
        ON CONFLICT (campaign_id, phase, state) DO UPDATE SET n = n + 1;
    END
    """,
    f"""
    CREATE TRIGGER deployments_completion_update AFTER UPDATE OF state, updated_at ON deployments
    WHEN (OLD.state IN {CHART} OR NEW.state IN {CHART}) AND {RESTAMPED} BEGIN
      UPDATE campaign_completions SET n = n - 1
        WHERE OLD.state IN {CHART} AND OLD.updated_at IS NOT NULL AND campaign_id = OLD.campaign_id
          AND minute = {OLD_MINUTE} AND state = OLD.state;
      INSERT INTO campaign_completions (campaign_id, minute, state, n)
        SELECT NEW.campaign_id, {NEW_MINUTE}, NEW.state, 1
        WHERE NEW.state IN {CHART} AND NEW.updated_at IS NOT NULL
        ON CONFLICT (campaign_id, minute, state) DO UPDATE SET n = n + 1;
    END
    """,
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute("DROP TRIGGER deployments_count_update")
    op.execute("DROP TRIGGER deployments_completion_update")
    op.execute(ONE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute("DROP TRIGGER deployments_counts_update")
    for ddl in TWO_TRIGGERS:
        op.execute(ddl)
