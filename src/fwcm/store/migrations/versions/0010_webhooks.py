"""webhooks: tenant URLs that receive signed campaign and device events, and their deliveries

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 18:30:00

Campaign events gain a ``kind`` (phase, note, or None for a state change) so that webhook events
can be told apart without reading reasons. Each webhook keeps cursors into campaign and device
events; deliveries keep the exact body sent, and each attempt is logged.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0010'
down_revision: Union[str, Sequence[str], None] = '0009'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('campaign_events') as batch:
        batch.add_column(sa.Column('kind', sa.String(length=16), nullable=True))
    op.create_table(
        'webhooks',
        sa.Column('id', _ID, nullable=False),
        sa.Column('tenant_id', _ID, nullable=False),
        sa.Column('url', sa.String(length=2048), nullable=False),
        sa.Column('secret', sa.String(length=64), nullable=False),
        sa.Column('events', sa.JSON(), nullable=True),
        sa.Column('campaign_cursor', sa.BigInteger(), nullable=False),
        sa.Column('device_cursor', sa.BigInteger(), nullable=False),
        sa.Column('flushed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('lease_owner', sa.String(length=64), nullable=True),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sqlite_autoincrement=True,
    )
    op.create_index('ix_webhooks_tenant_id', 'webhooks', ['tenant_id'], unique=False)
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', _ID, nullable=False),
        sa.Column('webhook_id', _ID, nullable=False),
        sa.Column('event_id', sa.String(length=64), nullable=False),
        sa.Column('type', sa.String(length=40), nullable=False),
        sa.Column('body', sa.LargeBinary(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_status', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.String(length=200), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['webhook_id'], ['webhooks.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(
        'ix_webhook_deliveries_hook', 'webhook_deliveries', ['webhook_id', 'state', 'id'], unique=False
    )
    op.create_table(
        'webhook_attempts',
        sa.Column('id', _ID, nullable=False),
        sa.Column('delivery_id', _ID, nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('status', sa.Integer(), nullable=True),
        sa.Column('error', sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(['delivery_id'], ['webhook_deliveries.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(
        'ix_webhook_attempts_delivery', 'webhook_attempts', ['delivery_id', 'attempt'], unique=False
    )


def downgrade() -> None:
    op.drop_index('ix_webhook_attempts_delivery', table_name='webhook_attempts')
    op.drop_table('webhook_attempts')
    op.drop_index('ix_webhook_deliveries_hook', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_webhooks_tenant_id', table_name='webhooks')
    op.drop_table('webhooks')
    with op.batch_alter_table('campaign_events') as batch:
        batch.drop_column('kind')
