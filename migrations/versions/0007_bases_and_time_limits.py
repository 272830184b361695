"""The bases registry (a row per base a worker serves, and the workers serving it) and the
per-job time limit.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bases",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=False),
        sa.Column("native_resolution", sa.Integer(), nullable=False),
        sa.Column("prediction_type", sa.String(length=32), nullable=False),
        sa.Column("bits", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=128), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("storage_mode", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("bits IN (4, 8)", name=op.f("ck_bases_bits")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_bases")),
    )
    op.create_table(
        "base_workers",
        sa.Column("base_name", sa.String(length=255), nullable=False),
        sa.Column("worker", sa.String(length=100), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_name"],
            ["bases.name"],
            name=op.f("fk_base_workers_base_name_bases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("base_name", "worker", name=op.f("pk_base_workers")),
    )
    for table in ("finetune_jobs", "generation_jobs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("time_limit_s", sa.Float(), nullable=True))


def downgrade() -> None:
    for table in ("generation_jobs", "finetune_jobs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("time_limit_s")
    op.drop_table("base_workers")
    op.drop_table("bases")
