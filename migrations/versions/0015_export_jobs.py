"""Exports are jobs like the others: lease, heartbeat, attempts, the base that makes them, and
a `canceled` state (worker/jobs.py).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "status IN ('queued', 'running', 'succeeded', 'failed')"
NEW = "status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')"


def upgrade() -> None:
    with op.batch_alter_table("adapter_exports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("base_model", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
    # An export is made by a worker of its adapter's base.
    op.execute(
        "UPDATE adapter_exports SET base_model = "
        "(SELECT adapters.base_model FROM adapters WHERE adapters.id = adapter_exports.adapter_id)"
    )
    with op.batch_alter_table("adapter_exports", schema=None) as batch_op:
        batch_op.alter_column("base_model", existing_type=sa.String(length=255), nullable=False)
        batch_op.drop_constraint(op.f("ck_adapter_exports_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_adapter_exports_status"), NEW)


def downgrade() -> None:
    op.execute("UPDATE adapter_exports SET status = 'failed' WHERE status = 'canceled'")
    with op.batch_alter_table("adapter_exports", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_adapter_exports_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_adapter_exports_status"), OLD)
        batch_op.drop_column("attempts")
        batch_op.drop_column("started_at")
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("lease_owner")
        batch_op.drop_column("base_model")
