"""Webhooks for exports: an export keeps the webhook_url and webhook_events of the request that
queued it, and its deliveries are of job kind "export".

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("adapter_exports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("webhook_url", sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column("webhook_events", sa.JSON(), nullable=True))
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_webhook_deliveries_job_kind"), type_="check")
        batch_op.create_check_constraint(
            op.f("ck_webhook_deliveries_job_kind"),
            "job_kind IN ('finetune', 'generation', 'export')",
        )


def downgrade() -> None:
    # The exports' deliveries cannot stay under the older constraint.
    op.execute("DELETE FROM webhook_deliveries WHERE job_kind = 'export'")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_webhook_deliveries_job_kind"), type_="check")
        batch_op.create_check_constraint(
            op.f("ck_webhook_deliveries_job_kind"), "job_kind IN ('finetune', 'generation')"
        )
    with op.batch_alter_table("adapter_exports", schema=None) as batch_op:
        batch_op.drop_column("webhook_events")
        batch_op.drop_column("webhook_url")
