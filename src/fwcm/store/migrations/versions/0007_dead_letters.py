"""dead letters: device messages that failed to apply, kept for their tenant instead of retried

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 15:00:00

A report that passes every check but still fails in the database (a bug, a constraint nobody
foresaw) used to fail its whole ingest batch forever.  Ingest now isolates it, stores it here and
acknowledges it.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'dead_letters',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('tenant_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('device', sa.String(length=64), nullable=False),
        sa.Column('transport', sa.String(length=8), nullable=False),
        sa.Column('payload', sa.LargeBinary(), nullable=False),
        sa.Column('reason', sa.String(length=16), nullable=False),
        sa.Column('error', sa.String(length=200), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_dead_letters_tenant', 'dead_letters', ['tenant_id', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_dead_letters_tenant', table_name='dead_letters')
    op.drop_table('dead_letters')
