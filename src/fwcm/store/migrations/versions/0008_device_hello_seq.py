"""device hello sequence: the newest hello applied, so a late one cannot undo it

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 17:00:00

A hello reports what a device runs. One delivered late (a broker hands a dead replica's unacknowledged
messages to another) must not overwrite what a newer hello or a success report recorded.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('hello_seq', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.drop_column('hello_seq')
