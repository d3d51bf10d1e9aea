"""triage indexes: the ranked list's order, and the four-view check of each study

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.create_index('ix_study_triage', ['state', sa.text('suspicion DESC'), 'last_received_at', 'id'],
                              unique=False)
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.create_index('ix_instance_views', ['study_id', 'analysable', 'laterality', 'view'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_index('ix_instance_views')
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_index('ix_study_triage')
