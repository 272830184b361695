"""Per-tenant limits and request counts, photo retention, sizes of generated images.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rpm_limit", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("active_jobs_limit", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("stored_bytes_limit", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("rate_window", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("rate_count", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("num_images", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("photos_deleted_at", sa.DateTime(timezone=True), nullable=True)
        )
    # Jobs from before this revision: their photo count is their number of photo rows.
    op.execute(
        "UPDATE finetune_jobs SET num_images = (SELECT count(*) FROM finetune_images "
        "WHERE finetune_images.job_id = finetune_jobs.id)"
    )
    with op.batch_alter_table("generated_images", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("size_bytes", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("generated_images", schema=None) as batch_op:
        batch_op.drop_column("size_bytes")
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.drop_column("photos_deleted_at")
        batch_op.drop_column("num_images")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("rate_count")
        batch_op.drop_column("rate_window")
        batch_op.drop_column("stored_bytes_limit")
        batch_op.drop_column("active_jobs_limit")
        batch_op.drop_column("rpm_limit")
