"""lesion detector and Mammo-FActOR served with a model version

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 15:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('model_version', schema=None) as batch_op:
        batch_op.add_column(sa.Column('detector_path', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('factor_path', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('model_version', schema=None) as batch_op:
        batch_op.drop_column('factor_path')
        batch_op.drop_column('detector_path')
