"""device version key: filters order versions semantically (1.0.10 after 1.0.4)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 18:30:00

``devices.version_key`` holds ``fwcm.versions.version_key(version)``, compared byte by byte (the
``C`` collation on PostgreSQL). Existing devices get theirs here.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from fwcm.versions import KEY_CHARS, version_key


revision: str = '0012'
down_revision: Union[str, Sequence[str], None] = '0011'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BATCH = 5000


def upgrade() -> None:
    key_type = sa.String(KEY_CHARS).with_variant(sa.String(KEY_CHARS, collation='C'), 'postgresql')
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('version_key', key_type, nullable=True))
    conn = op.get_bind()
    devices = sa.table('devices', sa.column('id', sa.BigInteger), sa.column('version', sa.String),
                       sa.column('version_key', sa.String))
    last = 0
    while True:
        rows = conn.execute(
            sa.select(devices.c.id, devices.c.version)
            .where(devices.c.id > last, devices.c.version.is_not(None))
            .order_by(devices.c.id)
            .limit(BATCH)
        ).all()
        if not rows:
            return
        keyed = [{'i': r.id, 'k': version_key(r.version)} for r in rows]
        keyed = [k for k in keyed if k['k'] is not None]
        if keyed:
            set_key = devices.update().where(devices.c.id == sa.bindparam('i'))
            conn.execute(set_key.values(version_key=sa.bindparam('k')), keyed)
        last = rows[-1].id


def downgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.drop_column('version_key')
