"""study.views_complete: the last analysis scored the four screening views (the triage sections' filter)

The triage list used to count each analysed study's screening views in a correlated subquery; the
"incomplete" section then scanned every analysed study. The flag is set when a study is settled ANALYSED
(worklist.state) and back-filled here from the instances; the triage index leads with it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 17:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

BACKFILL = """
UPDATE study SET views_complete = (
    SELECT COUNT(DISTINCT UPPER(instance.laterality || instance.view)) FROM instance
    WHERE instance.study_id = study.id AND instance.analysable
      AND UPPER(instance.laterality || instance.view) IN ('LCC', 'RCC', 'LMLO', 'RMLO')
) = 4 AND study.suspicion IS NOT NULL
WHERE study.state = 'ANALYSED'
"""


def upgrade() -> None:
    # a plain ADD COLUMN, never a batch "move and copy": on SQLite that recreates the study table, and
    # dropping the old one cascades (ON DELETE CASCADE) to every series and instance row
    op.add_column('study', sa.Column('views_complete', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.execute(BACKFILL)
    op.drop_index('ix_study_triage', table_name='study')
    op.create_index('ix_study_triage', 'study', ['state', 'views_complete', sa.text('suspicion DESC'),
                                                 'last_received_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_study_triage', table_name='study')
    op.create_index('ix_study_triage', 'study', ['state', sa.text('suspicion DESC'), 'last_received_at', 'id'],
                    unique=False)
    op.drop_column('study', 'views_complete')  # SQLite >= 3.35 drops a column in place
