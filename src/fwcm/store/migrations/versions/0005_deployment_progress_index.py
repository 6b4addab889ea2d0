"""deployment progress index: state, silence and phase of a campaign's deployments in one index

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 02:40:00

The engine counts a running campaign's deployments by phase and state, and looks for silent ones
(state, updated_at), several times a second.  With (campaign_id, state) alone both read every
deployment row; with this index both are answered from the index.
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.drop_index('ix_deployments_campaign_state', table_name='deployments')
    op.create_index(
        'ix_deployments_progress', 'deployments', ['campaign_id', 'state', 'updated_at', 'phase'], unique=False
    )


def downgrade() -> None:
    op.drop_index('ix_deployments_progress', table_name='deployments')
    op.create_index('ix_deployments_campaign_state', 'deployments', ['campaign_id', 'state'], unique=False)
