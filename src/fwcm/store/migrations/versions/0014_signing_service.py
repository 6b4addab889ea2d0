"""signing service: server-held keys, releases and their approvals, a hash-chained audit log

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 10:00:00

The server keeps tenant CA and signer keys in its key store (a PKCS#11 token or key files) and
signs manifests on request once a release has its approvals. Audit entries carry the hash of the
tenant's previous entry, so a removed or altered entry is detected.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0014'
down_revision: Union[str, Sequence[str], None] = '0013'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table('audit_log') as batch:
        batch.add_column(sa.Column('prev_hash', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('hash', sa.String(length=64), nullable=True))
    op.create_table(
        'signing_keys',
        sa.Column('id', BigId, primary_key=True),
        sa.Column('tenant_id', BigId, sa.ForeignKey('tenants.id', ondelete='CASCADE'), nullable=False),
        sa.Column('purpose', sa.String(length=8), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('store', sa.String(length=8), nullable=False),
        sa.Column('label', sa.String(length=100), nullable=False, unique=True),
        sa.Column('alg', sa.String(length=16), nullable=False),
        sa.Column('public_key_pem', sa.Text(), nullable=False),
        sa.Column('approvals', sa.Integer(), nullable=False),
        sa.Column('approver_role', sa.String(length=8), nullable=False),
        sa.Column('requester_role', sa.String(length=8), nullable=False),
        sa.Column('created_by', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint('tenant_id', 'purpose', 'name'),
    )
    op.create_index('ix_signing_keys_tenant_id', 'signing_keys', ['tenant_id'])
    op.create_table(
        'releases',
        sa.Column('id', BigId, primary_key=True),
        sa.Column('tenant_id', BigId, sa.ForeignKey('tenants.id', ondelete='CASCADE'), nullable=False),
        sa.Column('signing_key_id', BigId, sa.ForeignKey('signing_keys.id', ondelete='CASCADE'), nullable=False),
        sa.Column('state', sa.String(length=10), nullable=False),
        sa.Column('sequence', sa.BigInteger(), nullable=False),
        sa.Column('vendor_id', sa.String(length=36), nullable=False),
        sa.Column('class_id', sa.String(length=36), nullable=False),
        sa.Column('image_digest', sa.String(length=64), nullable=False),
        sa.Column('image_size', sa.BigInteger(), nullable=False),
        sa.Column('uris', sa.JSON(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=True),
        sa.Column('requested_by', sa.String(length=64), nullable=False),
        sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('decided_by', sa.String(length=64), nullable=True),
        sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('reason', sa.String(length=500), nullable=True),
        sa.Column('manifest_id', BigId, sa.ForeignKey('manifests.id', ondelete='SET NULL'), nullable=True),
    )
    op.create_index('ix_releases_tenant', 'releases', ['tenant_id', 'id'])
    op.create_table(
        'release_approvals',
        sa.Column('id', BigId, primary_key=True),
        sa.Column('release_id', BigId, sa.ForeignKey('releases.id', ondelete='CASCADE'), nullable=False),
        sa.Column('key_name', sa.String(length=64), nullable=False),
        sa.Column('role', sa.String(length=8), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint('release_id', 'key_name'),
    )
    op.create_index('ix_release_approvals_release_id', 'release_approvals', ['release_id'])


def downgrade() -> None:
    op.drop_table('release_approvals')
    op.drop_table('releases')
    op.drop_table('signing_keys')
    with op.batch_alter_table('audit_log') as batch:
        batch.drop_column('hash')
        batch.drop_column('prev_hash')
