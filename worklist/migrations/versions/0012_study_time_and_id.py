"""study.study_time and study.dicom_study_id (Study ID; "study_id" names the study row elsewhere): the two Required keys of a STUDY-level C-FIND the node did not hold

Study Time is kept as sortable text (``HHMMSS.FFFFFF``, ``dicom_node.study_time``) for range matching. Rows
stored before have neither: they match these keys only universally.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 21:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMNs, never a batch "move and copy" (see 0009)
    op.add_column('study', sa.Column('study_time', sa.String(13), nullable=True))
    op.add_column('study', sa.Column('dicom_study_id', sa.String(16), nullable=True))


def downgrade() -> None:
    op.drop_column('study', 'dicom_study_id')
    op.drop_column('study', 'study_time')
