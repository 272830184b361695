"""Exports in kohya/A1111 LoRA keys and as one original-layout merged checkpoint: the format
column takes `lora-kohya` and `merged-checkpoint` (17 characters: the column grows to 24).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "format IN ('lora', 'merged')"
NEW = "format IN ('lora', 'lora-kohya', 'merged', 'merged-checkpoint')"


def upgrade() -> None:
    with op.batch_alter_table("adapter_exports", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_adapter_exports_format"), type_="check")
        batch_op.alter_column(
            "format", existing_type=sa.String(length=16), type_=sa.String(length=24)
        )
        batch_op.create_check_constraint(op.f("ck_adapter_exports_format"), NEW)


def downgrade() -> None:
    # Rows of the new formats cannot be kept under the old constraint.
    op.execute("DELETE FROM adapter_exports WHERE format IN ('lora-kohya', 'merged-checkpoint')")
    with op.batch_alter_table("adapter_exports", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_adapter_exports_format"), type_="check")
        batch_op.alter_column(
            "format", existing_type=sa.String(length=24), type_=sa.String(length=16)
        )
        batch_op.create_check_constraint(op.f("ck_adapter_exports_format"), OLD)
