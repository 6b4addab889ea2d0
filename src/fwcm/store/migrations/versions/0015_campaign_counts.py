"""campaign counts: deployments per (phase, state) and completions per minute, kept by triggers

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04 10:00:00

A campaign's progress (its counts per phase and state, its completions per minute) was a GROUP BY
over all its deployments, read by every engine step, stats request and console render: a pass
over 100,000 rows for a campaign of 100,000 devices.  Triggers on ``deployments`` now keep the
aggregates whatever statement changes a deployment, so a read is a few rows.

SQLite (one writer at a time) updates ``campaign_counts`` and ``campaign_completions`` directly.
On PostgreSQL concurrent transactions (ingest on several replicas, the engine) would take the
same counter rows in different orders and deadlock, so the triggers only append rows to
``campaign_count_deltas`` (``n`` deployments left one (phase, state, minute) and entered
another; no key, one index: the cheapest insert); readers add them to the totals and the engine
folds them in (``fwcm.store.counts``).  Bulk inserts and deletes (a campaign's start, a device's removal) are
counted once per statement from its transition table, updates per row that changed state, phase
or the minute of a completion.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0015'
down_revision: Union[str, Sequence[str], None] = '0014'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# the ends drawn on the console's completions chart (console.charts.FAILED | GOOD), as of this revision
CHART = "('succeeded', 'skipped', 'declined', 'no_answer', 'failed', 'timed_out', 'reverted')"
SQLITE_MINUTE = "CAST(strftime('%s', {row}.updated_at) AS INTEGER) / 60"

SQLITE_TRIGGERS = [
    f"""
    CREATE TRIGGER deployments_count_insert AFTER INSERT ON deployments BEGIN
      INSERT INTO campaign_counts (campaign_id, phase, state, n)
        VALUES (NEW.campaign_id, NEW.phase, NEW.state, 1)
        ON CONFLICT (campaign_id, phase, state) DO UPDATE SET n = n + 1;
      INSERT INTO campaign_completions (campaign_id, minute, state, n)
        SELECT NEW.campaign_id, {SQLITE_MINUTE.format(row='NEW')}, NEW.state, 1
        WHERE NEW.state IN {CHART} AND NEW.updated_at IS NOT NULL
        ON CONFLICT (campaign_id, minute, state) DO UPDATE SET n = n + 1;
    END
    """,
    f"""
    CREATE TRIGGER deployments_count_delete AFTER DELETE ON deployments BEGIN
      UPDATE campaign_counts SET n = n - 1
        WHERE campaign_id = OLD.campaign_id AND phase = OLD.phase AND state = OLD.state;
      UPDATE campaign_completions SET n = n - 1
        WHERE OLD.state IN {CHART} AND OLD.updated_at IS NOT NULL AND campaign_id = OLD.campaign_id
          AND minute = {SQLITE_MINUTE.format(row='OLD')} AND state = OLD.state;
    END
    """,
    """
    CREATE TRIGGER deployments_count_update AFTER UPDATE OF state, phase ON deployments
    WHEN OLD.state IS NOT NEW.state OR OLD.phase IS NOT NEW.phase BEGIN
      UPDATE campaign_counts SET n = n - 1
        WHERE campaign_id = OLD.campaign_id AND phase = OLD.phase AND state = OLD.state;
      INSERT INTO campaign_counts (campaign_id, phase, state, n)
        VALUES (NEW.campaign_id, NEW.phase, NEW.state, 1)
        ON CONFLICT (campaign_id, phase, state) DO UPDATE SET n = n + 1;
    END
    """,
    f"""
    CREATE TRIGGER deployments_completion_update AFTER UPDATE OF state, updated_at ON deployments
    WHEN (OLD.state IN {CHART} OR NEW.state IN {CHART})
      AND (OLD.state IS NOT NEW.state OR OLD.updated_at IS NOT NEW.updated_at) BEGIN
      UPDATE campaign_completions SET n = n - 1
        WHERE OLD.state IN {CHART} AND OLD.updated_at IS NOT NULL AND campaign_id = OLD.campaign_id
          AND minute = {SQLITE_MINUTE.format(row='OLD')} AND state = OLD.state;
      INSERT INTO campaign_completions (campaign_id, minute, state, n)
        SELECT NEW.campaign_id, {SQLITE_MINUTE.format(row='NEW')}, NEW.state, 1
        WHERE NEW.state IN {CHART} AND NEW.updated_at IS NOT NULL
        ON CONFLICT (campaign_id, minute, state) DO UPDATE SET n = n + 1;
    END
    """,
]

PG_MINUTE = f"CASE WHEN {{row}}.state IN {CHART} THEN floor(extract(epoch FROM {{row}}.updated_at) / 60) END"
"""Written out in each statement: a SQL function would not be inlined (extract is only stable)
and would cost tens of microseconds a call."""

PG_TRIGGERS = [
    f"""
    CREATE FUNCTION fwcm_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO campaign_count_deltas
        (campaign_id, n, left_phase, left_state, left_minute, phase, state, minute) VALUES
        (NEW.campaign_id, 1, OLD.phase, OLD.state, {PG_MINUTE.format(row='OLD')},
         NEW.phase, NEW.state, {PG_MINUTE.format(row='NEW')});
      RETURN NULL;
    END $$
    """,
    f"""
    CREATE FUNCTION fwcm_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO campaign_count_deltas (campaign_id, n, phase, state, minute)
        SELECT campaign_id, count(*), phase, state, {PG_MINUTE.format(row='new_rows')}
        FROM new_rows GROUP BY campaign_id, 3, 4, 5;
      RETURN NULL;
    END $$
    """,
    f"""
    CREATE FUNCTION fwcm_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO campaign_count_deltas (campaign_id, n, left_phase, left_state, left_minute)
        SELECT campaign_id, count(*), phase, state, {PG_MINUTE.format(row='old_rows')}
        FROM old_rows GROUP BY campaign_id, 3, 4, 5;
      RETURN NULL;
    END $$
    """,
    f"""
    CREATE TRIGGER deployments_count_update AFTER UPDATE ON deployments FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.phase IS DISTINCT FROM NEW.phase
          OR (NEW.state IN {CHART} AND OLD.updated_at IS DISTINCT FROM NEW.updated_at))
    EXECUTE FUNCTION fwcm_count_update()
    """,
    """
    CREATE TRIGGER deployments_count_insert AFTER INSERT ON deployments
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION fwcm_count_insert()
    """,
    """
    CREATE TRIGGER deployments_count_delete AFTER DELETE ON deployments
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION fwcm_count_delete()
    """,
]

PG_DROP = [
    "DROP TRIGGER deployments_count_update ON deployments",
    "DROP TRIGGER deployments_count_insert ON deployments",
    "DROP TRIGGER deployments_count_delete ON deployments",
    "DROP FUNCTION fwcm_count_update()",
    "DROP FUNCTION fwcm_count_insert()",
    "DROP FUNCTION fwcm_count_delete()",
]
SQLITE_DROP = [
    "DROP TRIGGER deployments_count_insert",
    "DROP TRIGGER deployments_count_delete",
    "DROP TRIGGER deployments_count_update",
    "DROP TRIGGER deployments_completion_update",
]


def upgrade() -> None:
    op.create_table(
        'campaign_counts',
        sa.Column('campaign_id', BigId, sa.ForeignKey('campaigns.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('phase', sa.Integer(), primary_key=True),
        sa.Column('state', sa.String(length=16), primary_key=True),
        sa.Column('n', sa.BigInteger(), nullable=False),
    )
    op.create_table(
        'campaign_completions',
        sa.Column('campaign_id', BigId, sa.ForeignKey('campaigns.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('minute', sa.BigInteger(), primary_key=True),
        sa.Column('state', sa.String(length=16), primary_key=True),
        sa.Column('n', sa.BigInteger(), nullable=False),
    )
    op.create_table(
        'campaign_count_deltas',
        sa.Column('campaign_id', sa.BigInteger(), nullable=False),
        sa.Column('n', sa.BigInteger(), nullable=False),
        sa.Column('left_phase', sa.Integer(), nullable=True),
        sa.Column('left_state', sa.String(length=16), nullable=True),
        sa.Column('left_minute', sa.BigInteger(), nullable=True),
        sa.Column('phase', sa.Integer(), nullable=True),
        sa.Column('state', sa.String(length=16), nullable=True),
        sa.Column('minute', sa.BigInteger(), nullable=True),
    )
    op.create_index('ix_campaign_count_deltas_campaign', 'campaign_count_deltas', ['campaign_id'])
    sqlite = op.get_bind().dialect.name == "sqlite"
    minute = SQLITE_MINUTE.format(row="deployments") if sqlite else "floor(extract(epoch FROM updated_at) / 60)"
    op.execute(
        "INSERT INTO campaign_counts (campaign_id, phase, state, n) "
        "SELECT campaign_id, phase, state, count(*) FROM deployments GROUP BY campaign_id, phase, state"
    )
    op.execute(
        f"INSERT INTO campaign_completions (campaign_id, minute, state, n) "
        f"SELECT campaign_id, {minute}, state, count(*) FROM deployments "
        f"WHERE state IN {CHART} AND updated_at IS NOT NULL GROUP BY 1, 2, 3"
    )
    for ddl in SQLITE_TRIGGERS if sqlite else PG_TRIGGERS:
        op.execute(ddl)


def downgrade() -> None:
    for ddl in SQLITE_DROP if op.get_bind().dialect.name == "sqlite" else PG_DROP:
        op.execute(ddl)
    op.drop_table('campaign_count_deltas')
    op.drop_table('campaign_completions')
    op.drop_table('campaign_counts')
