"""models.last_version: version numbers are never reused after a delete

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_version", sa.Integer(), server_default="0", nullable=False)
        )
    # Existing models continue from their highest version.
    op.execute(
        "UPDATE models SET last_version = COALESCE("
        "(SELECT MAX(number) FROM versions WHERE versions.model_id = models.id), 0)"
    )


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("last_version")
