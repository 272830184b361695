"""Fixtures for the API tests: every test runs once on SQLite and once on PostgreSQL.

The PostgreSQL database is a throwaway one created for the test session and dropped at the end;
if the server is not reachable those tests are skipped with the reason. Each test gets empty
tables and its own storage directory, and both are cleaned up after it.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker
from app.deps import get_sender
from app.main import create_app
from app.models import Base
from app.settings import Settings
from app.storage import LocalStorage
from tests.api.factories import RecordingSender

ROOT = Path(__file__).resolve().parents[2]
# CI and developers can point the PostgreSQL half of the suite elsewhere.
PG_SERVER = os.environ.get("TEST_POSTGRES_SERVER", "127.0.0.1:5432")
PG_USERS = ("postgres", "root")


def alembic_config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["database_url"] = url
    return cfg


def _pg_admin_engine() -> tuple[Engine, str]:
    """An AUTOCOMMIT engine on the maintenance database (CREATE/DROP DATABASE need it).

    Skips only when nothing listens at PG_SERVER; a server that answers but refuses us is a
    failure, not a skip.
    """
    host, port = PG_SERVER.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        pytest.skip(f"PostgreSQL at {PG_SERVER} not reachable: {exc}")
    errors = []
    for user in PG_USERS:
        engine = create_engine(
            f"postgresql+psycopg://{user}@{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT"
        )
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return engine, user
        except Exception as exc:
            errors.append(f"{user}: {str(exc).splitlines()[0]}")
            engine.dispose()
    raise RuntimeError(f"PostgreSQL at {PG_SERVER} refused every user: {'; '.join(errors)}")


class PgDatabases:
    """Creates throwaway databases and drops them again."""

    def __init__(self) -> None:
        self.admin, self.user = _pg_admin_engine()
        self.names: list[str] = []

    def create(self) -> str:
        name = f"tuneqdm_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        return f"postgresql+psycopg://{self.user}@{PG_SERVER}/{name}"

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def pg() -> Iterator[PgDatabases]:
    dbs = PgDatabases()
    yield dbs
    dbs.drop_all()


def _new_database(backend: str, request: pytest.FixtureRequest, tmp: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp / f'{uuid.uuid4().hex[:8]}.sqlite'}"
    dbs: PgDatabases = request.getfixturevalue("pg")
    return dbs.create()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def new_database(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    """A callable that makes an empty database of the session's backend."""
    tmp = tmp_path_factory.mktemp("databases")

    def make() -> str:
        return _new_database(backend, request, tmp)

    yield make
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(new_database: object) -> str:
    url: str = new_database()  # type: ignore[operator]
    command.upgrade(alembic_config(url), "head")
    return url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> Iterator[sessionmaker[Session]]:
    yield make_sessionmaker(engine)
    # Leave nothing behind: empty every table, children first.
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    with session_factory() as s:
        yield s


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings must come from the tests, not from the developer's shell.
    for name in list(os.environ):
        if name.startswith("TUNEQDM_"):
            monkeypatch.delenv(name)


def make_settings(database_url: str, workdir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": workdir,
        "database_url": database_url,
        "broker_url": "memory://",
        "storage_dir": workdir / "files",
        # Small limits keep the bad-input tests fast.
        "max_images": 4,
        "max_image_bytes": 256 * 1024,
        "max_image_pixels": 1_000_000,
        "max_prompt_chars": 200,
        "max_request_bytes": 4 * 1024 * 1024,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(database_url: str, workdir: Path) -> Settings:
    return make_settings(database_url, workdir)


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.resolved_storage_dir)


@pytest.fixture
def sender() -> RecordingSender:
    return RecordingSender()


@pytest.fixture
def client(
    settings: Settings,
    session_factory: sessionmaker[Session],
    storage: LocalStorage,
    sender: RecordingSender,
) -> Iterator[TestClient]:
    app = create_app(settings, session_factory=session_factory, storage=storage)
    # The tests that are about the queue use the real Celery sender (test_queue.py).
    app.dependency_overrides[get_sender] = lambda: sender
    with TestClient(app) as c:
        yield c
