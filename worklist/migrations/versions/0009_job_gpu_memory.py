"""job.gpu_memory_peak_bytes: the peak CUDA memory of the job's analysis (NULL off CUDA)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN, never a batch "move and copy": on SQLite that recreates the job table, and dropping
    # the old one cascades (ON DELETE CASCADE) to every result and export row
    op.add_column('job', sa.Column('gpu_memory_peak_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column('job', 'gpu_memory_peak_bytes')  # SQLite >= 3.35 drops a column in place
