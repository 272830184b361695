"""A worker whose TUNEQDM_MODEL is an SDXL folder: it describes the base from its configs,
fine-tunes through it and serves generations from the adapter it made."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.bases import describe_folder
from app.models import Adapter, GenerationJob, Tenant
from app.schemas import GenerationCreate
from app.services.generations import create_generation
from app.storage import LocalStorage
from tests.api.factories import RecordingSender
from tests.worker.conftest import Notified, submit_finetune, worker_settings
from worker.bases import loaded_info
from worker.context import Context
from worker.finetunes import run_finetune
from worker.generations import run_generation
from worker.runtime import Runtime


@pytest.fixture
def xl_ctx(
    tmp_path: Path, sessions: sessionmaker[Session], tiny_xl_dir: Path, quant_cache: Path
) -> Iterator[Context]:
    settings = worker_settings(tmp_path, tiny_xl_dir, quant_cache)
    yield Context(
        settings=settings,
        sessions=sessions,
        storage=LocalStorage(settings.resolved_storage_dir),
        runtime=Runtime(settings),
        notify=Notified(),
    )
    shutil.rmtree(tmp_path / "files", ignore_errors=True)


def test_sdxl_base_finetunes_and_generates(xl_ctx: Context, tenant: Tenant) -> None:
    settings = xl_ctx.settings
    # Native size: the UNet's sample_size × the VAE's scale factor, before and after loading.
    assert settings.model is not None
    described = describe_folder(settings.model, name=settings.base_model, bits=settings.bits)
    assert described is not None and described.native_resolution == 32
    base = xl_ctx.runtime.base
    assert base.is_xl and loaded_info(settings, base).native_resolution == 32

    job_id = submit_finetune(xl_ctx, tenant, '{"steps": 2, "resolution": 32, "seed": 1}')
    assert run_finetune(job_id, xl_ctx) == "succeeded"
    with xl_ctx.sessions() as s:
        adapter = s.scalars(select(Adapter)).one()
        assert adapter.base_fingerprint == base.fingerprint
        gen = create_generation(
            session=s,
            sender=RecordingSender(),
            settings=settings,
            tenant=s.merge(tenant),
            data=GenerationCreate(
                adapter_id=adapter.id, prompt="a photo of sks dog", steps=2, width=32, height=48
            ),
        )
        gen_id = gen.id
    assert run_generation(gen_id, xl_ctx).startswith("succeeded")
    with xl_ctx.sessions() as s:
        done = s.get(GenerationJob, gen_id)
        assert done is not None and done.status == "succeeded", done and done.error
        [image] = done.images
        with xl_ctx.storage.open(image.storage_key) as f:
            assert Image.open(io.BytesIO(f.read())).size == (32, 48)
