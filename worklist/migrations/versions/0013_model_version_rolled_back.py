"""model_version.rolled_back_at: when a rollback took the version out of service

A rollback goes back past the versions rolled back from, never to one of them again (before, a second
rollback re-activated the version the first one had just taken out of service); an explicit activation
clears it.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 23:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN, never a batch "move and copy" (see 0009)
    op.add_column('model_version', sa.Column('rolled_back_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('model_version', 'rolled_back_at')
