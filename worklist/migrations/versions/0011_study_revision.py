"""study.revision and job.study_revision: what a job analysed, counted instead of timed

A study's revision goes up with every new or changed analysable instance, in the statement that records it;
a job keeps the revision its study had when it was promoted. A job whose study's revision moved on while it ran
sends the study back to RECEIVING (a new analysis), without comparing clocks; existing rows start at 0.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 20:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMNs, never a batch "move and copy" (see 0009)
    op.add_column('study', sa.Column('revision', sa.Integer(), nullable=False, server_default='0'))
    op.add_column('job', sa.Column('study_revision', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    op.drop_column('job', 'study_revision')
    op.drop_column('study', 'revision')
