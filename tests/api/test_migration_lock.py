"""Two API replicas started at once (compose scales the API; each container runs
`alembic upgrade head` first) upgrade one fresh PostgreSQL database together: migrations/env.py
takes a PostgreSQL advisory lock around the upgrade, so one migrates and the other then finds
the schema at head. Without it both created the same tables at once and one failed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from app.db import make_engine
from app.models import Base
from tests.api.conftest import ROOT, PgDatabases, alembic_config
from tests.service.procs import service_env

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

PAIRS = 3


@pytest.fixture
def databases() -> Iterator[PgDatabases]:
    dbs = PgDatabases()
    yield dbs
    dbs.drop_all()


def test_two_upgrades_at_once_on_a_fresh_database_both_succeed(databases: PgDatabases) -> None:
    head = ScriptDirectory.from_config(alembic_config("unused")).get_current_head()
    for _ in range(PAIRS):
        url = databases.create()
        env = service_env(database_url=url)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "alembic", "upgrade", "head"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        codes = [p.returncode for p in procs]
        assert codes == [0, 0], "\n---\n".join(out[-3000:] for out in outputs)
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                context = MigrationContext.configure(conn)
                assert context.get_current_heads() == (head,)
                assert compare_metadata(context, Base.metadata) == []
        finally:
            engine.dispose()
