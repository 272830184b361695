"""Alembic environment: the URL comes from the tuneqdm settings, or from
`config.attributes["database_url"]` when a test or the CLI runs migrations programmatically."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from app.db import engine_from_settings, make_engine
from app.models import Base
from app.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url: str | None = config.attributes.get("database_url")
    return url or get_settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


# PostgreSQL advisory lock key of schema upgrades (any fixed 64-bit number; "tqdm" in ASCII).
MIGRATION_LOCK = 0x7471646D


def run_migrations_online() -> None:
    url = config.attributes.get("database_url")
    engine = make_engine(url) if url else engine_from_settings(get_settings())
    with engine.connect() as connection:
        postgres = connection.dialect.name == "postgresql"
        if postgres:
            # Replicas started at once (compose scales the API, each runs `alembic upgrade
            # head` first) would create the same tables together and all but one fail. The
            # lock is the connection's (not the transaction's): the others wait here, then
            # read the version the first one wrote and have nothing left to do. SQLite needs
            # none: its migration transaction holds the database's write lock.
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things; batch mode rebuilds tables in later revisions.
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if postgres:
                connection.rollback()  # a failed migration leaves its transaction aborted
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
                connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
