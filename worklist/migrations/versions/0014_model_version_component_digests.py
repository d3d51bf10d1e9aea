"""model_version.component_sha256: the digest of each component folder (text encoder, heads, four-view model,
lesion detector, FActOR) recorded at registration

Activation and the workers check them as they check the main weights. Versions registered before have none:
their components are only checked to exist.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 23:55:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN, never a batch "move and copy" (see 0009)
    op.add_column('model_version', sa.Column('component_sha256', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('model_version', 'component_sha256')
