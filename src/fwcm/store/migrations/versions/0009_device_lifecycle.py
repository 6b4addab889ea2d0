"""device lifecycle: decommissioned devices, the review a stopped campaign was resumed with

Revision ID: 0009
Revises: 0008
Create Date: 2027-01-10 10:00:00

A decommissioned device keeps its row and history (no broker account, no campaigns, messages
refused) until it is deleted. A stopped campaign resumed after review remembers which failures the
operator accepted, so no replica stops it again for them.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0009'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('decommissioned_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('campaigns') as batch:
        batch.add_column(sa.Column('reviewed', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('campaigns') as batch:
        batch.drop_column('reviewed')
    with op.batch_alter_table('devices') as batch:
        batch.drop_column('decommissioned_at')
