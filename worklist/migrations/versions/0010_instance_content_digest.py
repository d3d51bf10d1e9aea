"""instance.sha256 -> instance.content_digest, "algorithm:hex": new instances are hashed with BLAKE3

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 10:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a RENAME COLUMN in place (SQLite >= 3.25, PostgreSQL), never a batch "move and copy" (see 0009)
    op.execute("ALTER TABLE instance RENAME COLUMN sha256 TO content_digest")
    if op.get_bind().dialect.name != "sqlite":  # SQLite does not enforce a VARCHAR's length
        op.alter_column('instance', 'content_digest', type_=sa.String(71), existing_type=sa.String(64))
    op.execute("UPDATE instance SET content_digest = 'sha256:' || content_digest")  # the stored rows' algorithm


def downgrade() -> None:
    # a BLAKE3 row cannot become a SHA-256 one without its file: it is emptied, so that a resend rewrites it
    op.execute("UPDATE instance SET content_digest = CASE WHEN content_digest LIKE 'sha256:%' "
               "THEN SUBSTR(content_digest, 8) ELSE '' END")
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column('instance', 'content_digest', type_=sa.String(64), existing_type=sa.String(71))
    op.execute("ALTER TABLE instance RENAME COLUMN content_digest TO sha256")
