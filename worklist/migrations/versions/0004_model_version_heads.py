"""trained heads served with a model version

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 14:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('model_version', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heads', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('model_version', schema=None) as batch_op:
        batch_op.drop_column('heads')
