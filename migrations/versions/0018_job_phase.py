"""What a running job is doing (`phase`, written by its worker; a fine-tune's event log records
each change as a `phase` event), and generations that also make the base's images with the
same seeds (`compare_base`; their images are marked `base`).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_EVENTS = (
    "type IN ('queued', 'running', 'released', 'progress', 'samples', 'succeeded', 'failed', "
    "'canceled', 'webhook')"
)
NEW_EVENTS = (
    "type IN ('queued', 'running', 'released', 'progress', 'samples', 'phase', 'succeeded', "
    "'failed', 'canceled', 'webhook')"
)


def upgrade() -> None:
    with op.batch_alter_table("finetune_events", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_finetune_events_type"), type_="check")
        batch_op.create_check_constraint(op.f("ck_finetune_events_type"), NEW_EVENTS)
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
    # Phase events cannot be kept under the old constraint.
    op.execute("DELETE FROM finetune_events WHERE type = 'phase'")
    with op.batch_alter_table("finetune_events", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_finetune_events_type"), type_="check")
        batch_op.create_check_constraint(op.f("ck_finetune_events_type"), OLD_EVENTS)
