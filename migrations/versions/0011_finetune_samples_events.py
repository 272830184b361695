"""Progress to look at: sample images made while a fine-tune trains, and its event log.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENT_TYPES = (
    "'queued', 'running', 'released', 'progress', 'samples', 'succeeded', 'failed', "
    "'canceled', 'webhook'"
)


def upgrade() -> None:
    op.create_table(
        "finetune_samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("prompt_index", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("storage_key", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["finetune_jobs.id"],
            name=op.f("fk_finetune_samples_job_id_finetune_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_finetune_samples")),
        sa.UniqueConstraint("job_id", "step", "prompt_index", name="uq_finetune_samples_step"),
    )
    op.create_index(
        op.f("ix_finetune_samples_job_id"), "finetune_samples", ["job_id"], unique=False
    )
    op.create_table(
        "finetune_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(f"type IN ({EVENT_TYPES})", name=op.f("ck_finetune_events_type")),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["finetune_jobs.id"],
            name=op.f("fk_finetune_events_job_id_finetune_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_finetune_events")),
    )
    op.create_index(op.f("ix_finetune_events_job_id"), "finetune_events", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_finetune_events_job_id"), table_name="finetune_events")
    op.drop_table("finetune_events")
    op.drop_index(op.f("ix_finetune_samples_job_id"), table_name="finetune_samples")
    op.drop_table("finetune_samples")
