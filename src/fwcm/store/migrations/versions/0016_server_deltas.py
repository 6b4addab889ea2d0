"""server-made delta updates: what each device runs, the patches made per source image, and which
deployment uses one

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04 10:00:00

Devices report the digest of the image they run (hello and success reports, key 15); a campaign
that asks for deltas gets, per source image, a patch and a delta manifest signed by the signer
that signed its release. ``deltas`` caches them per (tenant, target manifest, base image), also
recording why a source got none; ``deployments.delta_id`` names the patch a deployment uses.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0016'
down_revision: Union[str, Sequence[str], None] = '0015'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('image_digest', sa.String(length=64), nullable=True))
    with op.batch_alter_table('deployments') as batch:
        batch.add_column(sa.Column('delta_id', sa.BigInteger(), nullable=True))
    op.create_table(
        'deltas',
        sa.Column('id', BigId, primary_key=True),
        sa.Column('tenant_id', BigId, sa.ForeignKey('tenants.id', ondelete='CASCADE'), nullable=False),
        sa.Column('manifest_id', BigId, sa.ForeignKey('manifests.id', ondelete='CASCADE'), nullable=False),
        sa.Column('base_digest', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=8), nullable=False),
        sa.Column('reason', sa.String(length=200), nullable=True),
        sa.Column('image_size', sa.BigInteger(), nullable=False),
        sa.Column('patch_digest', sa.String(length=64), nullable=True),
        sa.Column('patch_size', sa.BigInteger(), nullable=True),
        sa.Column('seconds', sa.Float(), nullable=True),
        sa.Column(
            'delta_manifest_id', BigId, sa.ForeignKey('manifests.id', ondelete='SET NULL'), nullable=True
        ),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint('tenant_id', 'manifest_id', 'base_digest'),
    )


def downgrade() -> None:
    op.drop_table('deltas')
    with op.batch_alter_table('deployments') as batch:
        batch.drop_column('delta_id')
    with op.batch_alter_table('devices') as batch:
        batch.drop_column('image_digest')
