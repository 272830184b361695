"""Several bases per deployment: a fine-tune job names its base (generation jobs and adapters
already do), so only that base's workers claim it.

Existing fine-tunes get their adapter's base, or, without one, the deployment's default base
(TUNEQDM_BASE_MODEL as this migration runs): until now a deployment served exactly that base.

Revision ID: 0014
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.settings import get_settings

revision: str = "0014"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("base_model", sa.String(length=255), nullable=True))
    op.execute(
        sa.text(
            "UPDATE finetune_jobs SET base_model = COALESCE("
            "(SELECT adapters.base_model FROM adapters "
            "WHERE adapters.finetune_job_id = finetune_jobs.id), :default)"
        ).bindparams(default=get_settings().base_model)
    )
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.alter_column("base_model", existing_type=sa.String(length=255), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.drop_column("base_model")
