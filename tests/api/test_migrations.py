"""The Alembic history creates the schema from empty, matches the models, and downgrades."""

from __future__ import annotations

from collections.abc import Callable

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db import make_engine
from app.models import Base
from tests.api.conftest import alembic_config

TABLES = {
    "tenants",
    "api_keys",
    "finetune_jobs",
    "finetune_images",
    "adapters",
    "generation_jobs",
    "generated_images",
    "bases",
    "base_workers",
    "webhook_deliveries",
}


def test_upgrade_downgrade_upgrade(new_database: Callable[[], str]) -> None:
    url = new_database()
    cfg = alembic_config(url)
    engine = make_engine(url)
    try:
        command.upgrade(cfg, "head")
        assert set(inspect(engine).get_table_names()) >= TABLES

        command.downgrade(cfg, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

        command.upgrade(cfg, "head")
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_migrations_match_the_models(engine: object) -> None:
    # The session database was built by the migrations; the models must not differ from it,
    # otherwise someone changed a model without writing a revision.
    with engine.connect() as conn:  # type: ignore[attr-defined]
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == []
