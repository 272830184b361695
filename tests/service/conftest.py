"""Fixtures for the tests that run the service as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command

from tests.api.conftest import PgDatabases, alembic_config
from tests.service.procs import flush_redis, require_redis


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway, migrated PostgreSQL database (skipped when the server is not reachable)."""
    dbs = PgDatabases()
    try:
        url = dbs.create()
        command.upgrade(alembic_config(url), "head")
        yield url
    finally:
        dbs.drop_all()


@pytest.fixture
def redis_url() -> Iterator[str]:
    url = require_redis()
    yield url
    flush_redis()


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def tiny_settings(
    pg_url: str, redis_url: str, tmp_path: Path, tiny_model_dir: Path, quant_cache: Path
) -> dict[str, object]:
    """The settings a service test starts from (for `service_env` or `Settings`): its own
    database, broker and data folder, and the tiny base with its shared quantized cache."""
    return {
        "database_url": pg_url,
        "broker_url": redis_url,
        "data_dir": tmp_path,
        "model": str(tiny_model_dir),
        "quant_cache_dir": quant_cache,
    }
