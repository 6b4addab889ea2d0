"""device claim: the image a device's confirmed success said it runs

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 10:00:00

A success is reported after the device's trial boot confirmed the new image, with the image's
digest. The server keeps that claim per device, so a later hello that reports another image (a
bootloader that fell back) marks the deployment ``reverted``.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0013'
down_revision: Union[str, Sequence[str], None] = '0012'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('claim_campaign', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('claim_sequence', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('claim_digest', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.drop_column('claim_digest')
        batch.drop_column('claim_sequence')
        batch.drop_column('claim_campaign')
