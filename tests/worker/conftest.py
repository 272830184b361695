"""In-process worker fixtures: a migrated SQLite registry, local storage, the tiny model.

The worker's job functions take everything as arguments (worker.context.Context), so these
tests run them without a broker; tests/service/ runs the real processes.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker
from app.models import Tenant
from app.services import keys
from app.services.finetunes import FinetuneForm, Upload, create_finetune
from app.settings import Settings
from app.storage import LocalStorage
from tests.api.conftest import alembic_config
from tests.api.factories import RecordingSender
from worker.context import Context
from worker.runtime import Runtime


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TUNEQDM_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The worker tests share the CPU with other processes; see TUNEQDM_TORCH_THREADS.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
    command.upgrade(alembic_config(url), "head")
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


def worker_settings(tmp_path: Path, model: Path, cache: Path, **values: object) -> Settings:
    defaults: dict[str, object] = {
        "data_dir": tmp_path,
        "database_url": f"sqlite:///{tmp_path / 'registry.sqlite'}",
        "broker_url": "memory://",
        "model": str(model),
        "quant_cache_dir": cache,
        "heartbeat_s": 0.2,
        "stale_after_s": 2.0,
    }
    defaults.update(values)
    return Settings(**defaults)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def shared_runtime(
    tiny_model_dir: Path, quant_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Runtime:
    """One base for the whole session, as a worker process holds one."""
    tmp = tmp_path_factory.mktemp("runtime")
    return Runtime(worker_settings(tmp, tiny_model_dir, quant_cache))


class Notified(list[str]):
    def __call__(self, finetune_id: str) -> None:
        self.append(finetune_id)


@pytest.fixture
def ctx(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    tiny_model_dir: Path,
    quant_cache: Path,
    shared_runtime: Runtime,
) -> Iterator[Context]:
    settings = worker_settings(tmp_path, tiny_model_dir, quant_cache)
    shared_runtime.settings = settings
    yield Context(
        settings=settings,
        sessions=sessions,
        storage=LocalStorage(settings.resolved_storage_dir),
        runtime=shared_runtime,
        notify=Notified(),
    )
    shutil.rmtree(tmp_path / "files", ignore_errors=True)


@pytest.fixture
def tenant(sessions: sessionmaker[Session]) -> Tenant:
    with sessions() as session:
        tenant = keys.get_or_create_tenant(session=session, name="acme")
        session.commit()
        return tenant


def photo_png(i: int, size: int = 64) -> bytes:
    array = np.zeros((size, size, 3), np.uint8)
    array[:, :] = (200, 30 + 10 * i, 30)
    array[10:40, 12 + i : 40 + i] = (20, 20, 220)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def submit_finetune(ctx: Context, tenant: Tenant, params: str, **form: object) -> str:
    """Through the API's own service, so the rows are exactly what the API stores."""
    with ctx.sessions() as session:
        job = create_finetune(
            session=session,
            storage=ctx.storage,
            sender=RecordingSender(),
            settings=ctx.settings,
            tenant=session.merge(tenant),
            form=FinetuneForm(instance_prompt="a photo of sks dog", params=params, **form),  # type: ignore[arg-type]
            uploads=[Upload(f"{i}.png", io.BytesIO(photo_png(i))) for i in range(3)],
        )
        return job.id
