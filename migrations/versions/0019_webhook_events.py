"""Webhooks for more than the final state: fine-tunes and generations keep the events they
asked for (`webhook_events`, NULL: the final states only), and a job may have several
deliveries, numbered in order per job (`sequence`) instead of one per job.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("finetune_jobs", "generation_jobs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("webhook_events", sa.JSON(), nullable=True))
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sequence", sa.Integer(), server_default="0", nullable=False))
        batch_op.drop_constraint(op.f("uq_webhook_deliveries_job_id"), type_="unique")
        batch_op.create_unique_constraint(
            "uq_webhook_deliveries_job_sequence", ["job_id", "sequence"]
        )
        batch_op.create_index(batch_op.f("ix_webhook_deliveries_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    # One delivery per job again: the final state's (the other events' rows cannot stay).
    op.execute(
        "DELETE FROM webhook_deliveries WHERE event NOT LIKE '%.succeeded' "
        "AND event NOT LIKE '%.failed' AND event NOT LIKE '%.canceled'"
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_job_id"))
        batch_op.drop_constraint("uq_webhook_deliveries_job_sequence", type_="unique")
        batch_op.create_unique_constraint(op.f("uq_webhook_deliveries_job_id"), ["job_id"])
        batch_op.drop_column("sequence")
    for table in ("generation_jobs", "finetune_jobs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("webhook_events")
