"""the hello of the boot that confirmed a device's claim

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 10:00:00

A success report names the seq of the hello its confirming boot sent (report key 16). Hellos up
to that seq were sent before the boot, so one that reaches a replica after the success is not
taken for a revert.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0017'
down_revision: Union[str, Sequence[str], None] = '0016'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('claim_hello_seq', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.drop_column('claim_hello_seq')
