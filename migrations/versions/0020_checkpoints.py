"""Checkpoints kept at the progress-image steps of a fine-tune with params.keep_checkpoints.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "finetune_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("storage_key", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["finetune_jobs.id"],
            name=op.f("fk_finetune_checkpoints_job_id_finetune_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_finetune_checkpoints")),
        sa.UniqueConstraint("job_id", "step", name="uq_finetune_checkpoints_step"),
    )
    op.create_index(
        op.f("ix_finetune_checkpoints_job_id"), "finetune_checkpoints", ["job_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_finetune_checkpoints_job_id"), table_name="finetune_checkpoints")
    op.drop_table("finetune_checkpoints")
