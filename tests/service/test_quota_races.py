"""Per-tenant limits under concurrency, with real HTTP: ten requests of one tenant at once to
an API of two uvicorn processes, against an active-jobs limit of 3 (generations, then another
tenant's fine-tunes) and an export-variant limit of 3, on PostgreSQL and on SQLite. Exactly
three are admitted (the tenant's row lock, app/services/quotas.py); without it, each request
counted the others' rows before any was inserted and most were admitted."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from alembic import command
from sqlalchemy import func, select

from app.db import make_engine, make_sessionmaker
from app.ids import new_id
from app.models import Adapter, AdapterExport, FinetuneJob, GenerationJob, Tenant
from tests.api.conftest import alembic_config
from tests.service.procs import (
    Proc,
    answers_ready,
    create_key,
    free_port,
    post_finetune,
    service_env,
    wait_for,
)

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

CONCURRENT = 10
LIMIT = 3


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'race.sqlite'}"
        command.upgrade(alembic_config(url), "head")
        yield url
    else:
        yield request.getfixturevalue("pg_url")


def _api(env: dict[str, str], logs: Path, port: int) -> Proc:
    # Two processes, each serving requests from its thread pool: the requests race across
    # processes and within one.
    args = ["--factory", "app.main:create_app", "--host", "127.0.0.1", "--port", str(port)]
    return Proc("api", [sys.executable, "-m", "uvicorn", *args, "--workers", "2"], env, logs)


def _at_once(send: Callable[[httpx.Client], httpx.Response], client: httpx.Client) -> Counter[int]:
    start = threading.Barrier(CONCURRENT)
    statuses: list[int] = []

    def one() -> None:
        start.wait()
        statuses.append(send(client).status_code)

    threads = [threading.Thread(target=one) for _ in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Counter(statuses)


def test_ten_concurrent_requests_against_a_limit_of_three_admit_three(
    database: str, tmp_path: Path, tiny_model_dir: Path, logs: Path
) -> None:
    env = service_env(
        database_url=database,
        broker_url="memory://",
        data_dir=tmp_path,
        model=tiny_model_dir,
        tenant_active_jobs=LIMIT,
        tenant_exports=LIMIT,
        tenant_rpm=0,
        requests_per_key=0,
        retention_sweep_every_s=0,
        min_image_side=32,
    )
    key = create_key(env, "acme")["api key"]
    other = create_key(env, "globex")["api key"]
    port = free_port()
    api = _api(env, logs, port)
    headers = {"Authorization": f"Bearer {key}"}
    engine = make_engine(database)
    sessions = make_sessionmaker(engine)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c:
            wait_for("the API", lambda: answers_ready(c), 60, [api])
            generations = _at_once(
                lambda c: c.post("/v1/generations", json={"prompt": "a dog", "steps": 2}), c
            )

            with sessions() as session:
                tenant = session.scalars(select(Tenant).where(Tenant.name == "acme")).one()
                adapter = Adapter(
                    id=new_id("ad"),
                    tenant_id=tenant.id,
                    method="tuneqdm",
                    bits=4,
                    intervals=1,
                    tokens=[],
                    size_bytes=10,
                    base_model="tuneqdm/fashion-sd",
                    base_fingerprint="-",
                    storage_key="unused",
                )
                session.add(adapter)
                session.commit()
                adapter_id = adapter.id
            # Ten different variants (ranks 1..10) of one adapter at once.
            ranks = iter(range(1, CONCURRENT + 1))
            lock = threading.Lock()

            def export(c: httpx.Client) -> httpx.Response:
                with lock:
                    rank = next(ranks)
                body = {"format": "lora", "rank": rank}
                return c.post(f"/v1/adapters/{adapter_id}/exports", json=body)

            exports = _at_once(export, c)
            c.headers["Authorization"] = f"Bearer {other}"
            finetunes = _at_once(lambda c: post_finetune(c, {"steps": 2}), c)
        with sessions() as session:
            rows = session.scalar(select(func.count()).select_from(GenerationJob))
            variants = session.scalar(select(func.count()).select_from(AdapterExport))
            jobs = session.scalar(select(func.count()).select_from(FinetuneJob))
    finally:
        api.stop()
        engine.dispose()
    print(
        f"generations: {dict(generations)} ({rows} rows); exports: {dict(exports)} "
        f"({variants} rows); fine-tunes: {dict(finetunes)} ({jobs} rows)"
    )
    assert generations == Counter({202: LIMIT, 429: CONCURRENT - LIMIT}), api.log()[-3000:]
    assert rows == LIMIT
    assert exports == Counter({202: LIMIT, 429: CONCURRENT - LIMIT}), api.log()[-3000:]
    assert variants == LIMIT
    assert finetunes == Counter({202: LIMIT, 429: CONCURRENT - LIMIT}), api.log()[-3000:]
    assert jobs == LIMIT
