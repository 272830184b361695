"""The worker's job functions in-process: fine-tune → adapter row, batched generations, failures
a user can act on, cancel between steps."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image
from sqlalchemy import select

from app.errors import InvalidInput
from app.models import Adapter, FinetuneImage, FinetuneJob, GenerationJob, Tenant
from app.schemas import GenerationCreate
from app.services.finetunes import cancel_finetune
from app.services.generations import create_generation
from app.storage import finetune_prefix
from tests.api.factories import RecordingSender
from tests.worker.conftest import submit_finetune
from worker.context import Context
from worker.files import checkpoint_key
from worker.finetunes import run_finetune
from worker.generations import run_generation
from worker.jobs import worker_name

SMALL = '{"steps": 3, "resolution": 64, "checkpoint_every": 2, "seed": 1}'


def _job(ctx: Context, job_id: str) -> FinetuneJob:
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None
        return job


def test_finetune_creates_the_adapter_row_and_file(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, SMALL, name="Rex")
    assert run_finetune(job_id, ctx) == "succeeded"
    job = _job(ctx, job_id)
    assert (job.status, job.progress_step, job.error) == ("succeeded", 3, None)
    # The row names the worker process that ran it.
    assert job.lease_owner is not None and job.lease_owner.startswith(f"{worker_name()}:")
    assert job.resumed_from_step == 0 and job.loss is not None and job.finished_at is not None
    with ctx.sessions() as s:
        adapter = s.scalars(select(Adapter)).one()
    path = ctx.storage.path(adapter.storage_key)
    assert adapter.finetune_job_id == job_id and adapter.name == "Rex"
    assert (adapter.method, adapter.bits, adapter.intervals, adapter.tokens) == (
        "tuneqdm",
        4,
        1,
        ["sks"],
    )
    assert adapter.size_bytes == path.stat().st_size > 0
    assert adapter.base_fingerprint == ctx.runtime.base.fingerprint
    assert adapter.base_model == ctx.settings.base_model
    assert not ctx.storage.path(checkpoint_key(tenant.id, job_id)).exists()
    _assert_photos_deleted(ctx, tenant, job_id)
    assert ctx.notify == [job_id]
    # A second delivery of the same message does nothing.
    assert run_finetune(job_id, ctx) == "skipped (succeeded)"


def _assert_photos_deleted(ctx: Context, tenant: Tenant, job_id: str) -> None:
    """A fine-tune that ended keeps no photo (TUNEQDM_PHOTO_RETENTION_S=0): files and rows."""
    job = _job(ctx, job_id)
    assert job.photos_deleted_at is not None and job.num_images == 3
    with ctx.sessions() as s:
        assert s.scalars(select(FinetuneImage).where(FinetuneImage.job_id == job_id)).all() == []
    assert not ctx.storage.path(finetune_prefix(tenant.id, job_id)).exists()


def _generation(ctx: Context, tenant: Tenant, adapter_id: str | None, seed: int) -> str:
    with ctx.sessions() as s:
        gen = create_generation(
            session=s,
            sender=RecordingSender(),
            settings=ctx.settings,
            tenant=s.merge(tenant),
            data=GenerationCreate(
                adapter_id=adapter_id,
                prompt="a photo of sks dog",
                steps=3,
                width=32,
                height=48,
                seed=seed,
                num_images=2 if adapter_id else 1,
            ),
        )
        return gen.id


def test_generations_for_different_adapters_share_one_loop(ctx: Context, tenant: Tenant) -> None:
    adapters = []
    for seed in (1, 2):
        job_id = submit_finetune(ctx, tenant, f'{{"steps": 2, "resolution": 64, "seed": {seed}}}')
        assert run_finetune(job_id, ctx) == "succeeded"
        adapters.append("ad_" + job_id.removeprefix("ft_"))
    ids = [_generation(ctx, tenant, a, i) for i, a in enumerate([*adapters, None])]
    assert run_generation(ids[0], ctx) == "succeeded (batch of 3)"
    for gen_id in ids[1:]:
        assert run_generation(gen_id, ctx) == "skipped (succeeded)"
    with ctx.sessions() as s:
        for gen_id, count in zip(ids, (2, 2, 1), strict=True):
            gen = s.get(GenerationJob, gen_id)
            assert gen is not None and gen.status == "succeeded", gen and gen.error
            assert [img.index for img in gen.images] == list(range(count))
            for img in gen.images:
                assert img.size_bytes == ctx.storage.path(img.storage_key).stat().st_size > 0
                with ctx.storage.open(img.storage_key) as f:
                    assert Image.open(io.BytesIO(f.read())).size == (32, 48)


def test_unreadable_photo_fails_with_a_message(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, SMALL)
    with ctx.sessions() as s:
        key = s.get(FinetuneJob, job_id).images[1].storage_key  # type: ignore[union-attr]
    ctx.storage.put(key, b"not a png at all")
    assert run_finetune(job_id, ctx) == "failed"
    job = _job(ctx, job_id)
    assert job.status == "failed" and job.error is not None
    assert "uploaded photo could not be used" in job.error
    assert str(ctx.storage.root) not in job.error
    _assert_photos_deleted(ctx, tenant, job_id)
    assert ctx.notify == [job_id]


def test_other_bits_than_the_workers_base_fail_clearly(ctx: Context, tenant: Tenant) -> None:
    # The API refuses other bits than the base's at submit; a job stored before its base's
    # worker was restarted at another width still fails with a message, not with a crash.
    with pytest.raises(InvalidInput, match="served at 4 bits"):
        submit_finetune(ctx, tenant, '{"steps": 2, "bits": 8}')
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.params["bits"] == 4
        job.params = {**job.params, "bits": 8}
        s.commit()
    assert run_finetune(job_id, ctx) == "failed"
    error = _job(ctx, job_id).error
    assert error is not None and "4-bit base" in error and "bits=4" in error


def test_cancel_is_honoured_between_steps(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(
        ctx, tenant, '{"steps": 2500, "resolution": 64, "checkpoint_every": 5}'
    )
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_finetune(job_id, ctx)))
    thread.start()
    deadline = time.monotonic() + 120
    while _job(ctx, job_id).progress_step < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    with ctx.sessions() as s:
        cancel_finetune(session=s, tenant=s.merge(tenant), finetune_id=job_id)
    thread.join(timeout=60)
    assert outcome == ["stopped"]
    job = _job(ctx, job_id)
    assert job.status == "canceled" and job.progress_step < 2500
    assert not ctx.storage.path(checkpoint_key(tenant.id, job_id)).exists()
    _assert_photos_deleted(ctx, tenant, job_id)
    assert ctx.notify == [job_id]
