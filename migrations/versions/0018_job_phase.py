"""What a running job is doing (`phase`, written by its worker), and generations that also make
the base's images with the same seeds (`compare_base`; their images are marked `base`).

Revision ID: 0018
Revises: 0016
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("phase", sa.String(length=32), nullable=True))
    with op.batch_alter_table("generation_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("phase", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("compare_base", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table("generated_images", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("base", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("generated_images", schema=None) as batch_op:
        batch_op.drop_column("base")
    with op.batch_alter_table("generation_jobs", schema=None) as batch_op:
        batch_op.drop_column("compare_base")
        batch_op.drop_column("phase")
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.drop_column("phase")
