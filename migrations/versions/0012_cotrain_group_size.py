"""Co-training: how many fine-tunes a running job's worker trains in one loop with it.

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("group_size", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.drop_column("group_size")
