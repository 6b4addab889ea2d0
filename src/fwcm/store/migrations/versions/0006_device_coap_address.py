"""device CoAP address: where a CoAP device last observed its notice from

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 15:10:00

A server that restarted has no CoAP observations; it pushes notices to the endpoint each device
last observed from until the device observes again.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('coap_address', sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.drop_column('coap_address')
