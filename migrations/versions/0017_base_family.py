"""A base's model family, how it uses guidance_scale, and the multiple its image sides keep:
what a request may ask of it (app/families.py) now that transformer (FLUX, SD3) bases are served.

Rows written before this migration were UNet bases (SD or SDXL: the same request rules), so
they get `sd`, `cfg` and 8, the rules they were served by; a worker corrects the family of an
SDXL base when it next registers (at its start and every TUNEQDM_BASE_SEEN_EVERY_S).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("bases", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("family", sa.String(length=16), nullable=False, server_default="sd")
        )
        batch_op.add_column(
            sa.Column("guidance", sa.String(length=16), nullable=False, server_default="cfg")
        )
        batch_op.add_column(
            sa.Column("size_multiple", sa.Integer(), nullable=False, server_default="8")
        )
        batch_op.create_check_constraint(
            op.f("ck_bases_family"), "family IN ('sd', 'sdxl', 'sd3', 'flux')"
        )
        batch_op.create_check_constraint(
            op.f("ck_bases_guidance"), "guidance IN ('cfg', 'embedded', 'none')"
        )


def downgrade() -> None:
    with op.batch_alter_table("bases", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_bases_guidance"), type_="check")
        batch_op.drop_constraint(op.f("ck_bases_family"), type_="check")
        batch_op.drop_column("size_multiple")
        batch_op.drop_column("guidance")
        batch_op.drop_column("family")
