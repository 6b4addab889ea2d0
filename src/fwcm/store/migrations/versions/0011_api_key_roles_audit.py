"""API keys with names, roles, expiry, last use and revocation; the audit log

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 18:30:00

A tenant may hold several API keys, each with a role.  The key a tenant already has keeps working:
it becomes an admin key named ``initial``.  Every mutating API request is recorded in audit_log.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0011'
down_revision: Union[str, Sequence[str], None] = '0010'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('api_keys') as batch:
        batch.alter_column('label', new_column_name='name', existing_type=sa.String(100),
                           type_=sa.String(64), existing_nullable=False)
        batch.add_column(sa.Column('role', sa.String(8), nullable=False, server_default='admin'))
        batch.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True))
    # The first key of each tenant is "initial"; any other existing key gets a name of its own.
    op.execute("UPDATE api_keys SET name = 'key-' || CAST(id AS VARCHAR(20))")
    op.execute(
        "UPDATE api_keys SET name = 'initial' WHERE id IN (SELECT min(id) FROM api_keys GROUP BY tenant_id)"
    )
    op.create_index(
        'ux_api_keys_active_name', 'api_keys', ['tenant_id', 'name'], unique=True,
        sqlite_where=sa.text('revoked_at IS NULL'), postgresql_where=sa.text('revoked_at IS NULL'),
    )
    op.create_table(
        'audit_log',
        sa.Column('id', BigId, nullable=False),
        sa.Column('tenant_id', BigId, nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('key_name', sa.String(64), nullable=False),
        sa.Column('role', sa.String(8), nullable=False),
        sa.Column('method', sa.String(8), nullable=False),
        sa.Column('route', sa.String(200), nullable=False),
        sa.Column('object', sa.JSON(), nullable=False),
        sa.Column('status', sa.Integer(), nullable=False),
        sa.Column('source', sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_audit_log_tenant', 'audit_log', ['tenant_id', 'id'], unique=False)
    op.create_index('ix_audit_log_at', 'audit_log', ['at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_audit_log_at', table_name='audit_log')
    op.drop_index('ix_audit_log_tenant', table_name='audit_log')
    op.drop_table('audit_log')
    op.drop_index('ux_api_keys_active_name', table_name='api_keys')
    with op.batch_alter_table('api_keys') as batch:
        batch.drop_column('revoked_at')
        batch.drop_column('last_used_at')
        batch.drop_column('expires_at')
        batch.drop_column('role')
        batch.alter_column('name', new_column_name='label', existing_type=sa.String(64),
                           type_=sa.String(100), existing_nullable=False)
