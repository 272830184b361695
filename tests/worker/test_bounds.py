"""The worker enforces each job's bounds in-process: the time limit of a fine-tune and of a
generation, and cancel of one generation in a batch shared with another tenant's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from app.models import Adapter, FinetuneJob, GenerationJob, Tenant
from app.schemas import GenerationCreate
from app.services import keys
from app.services.generations import cancel_generation, create_generation
from tests.api.factories import RecordingSender
from tests.worker.conftest import submit_finetune, worker_settings
from worker.context import Context
from worker.files import checkpoint_key
from worker.finetunes import run_finetune
from worker.generations import run_generation


def _limit(ctx: Context, tmp_path: Path, **values: object) -> None:
    ctx.settings = worker_settings(
        tmp_path, Path(ctx.settings.resolved_model), ctx.settings.resolved_quant_cache_dir, **values
    )


def _files(ctx: Context) -> list[str]:
    root = ctx.storage.root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_finetune_past_its_time_limit_fails_and_leaves_no_files(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    _limit(ctx, tmp_path, finetune_time_limit_s=0.2)
    job_id = submit_finetune(ctx, tenant, '{"steps": 2500, "checkpoint_every": 1}')
    assert run_finetune(job_id, ctx) == "failed"
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.status == "failed" and job.lease_owner is not None
        assert job.error == (
            "the fine-tune ran past its time limit of 0.2 s and was stopped "
            "(TUNEQDM_FINETUNE_TIME_LIMIT_S); submit it again with fewer steps"
        )
        assert job.progress_step < 2500
        assert s.scalars(select(Adapter)).all() == []
    assert not ctx.storage.path(checkpoint_key(tenant.id, job_id)).exists()
    assert ctx.notify == [job_id]
    # Only the uploaded photos remain.
    assert all("/inputs/" in f or "/images/" in f for f in _files(ctx)), _files(ctx)


def _generation(ctx: Context, tenant: Tenant, **values: object) -> str:
    with ctx.sessions() as s:
        data = GenerationCreate(prompt="a photo of a bag", **values)  # type: ignore[arg-type]
        gen = create_generation(
            session=s,
            sender=RecordingSender(),
            settings=ctx.settings,
            tenant=s.merge(tenant),
            data=data,
        )
        return gen.id


def _gen(ctx: Context, gen_id: str) -> GenerationJob:
    with ctx.sessions() as s:
        gen = s.scalars(select(GenerationJob).where(GenerationJob.id == gen_id)).one()
        _ = gen.images
        return gen


def test_a_generation_longer_than_the_progress_timeout_keeps_its_lease(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    # The watchdog gives up a job whose lease saw no progress for PROGRESS_TIMEOUT_S; every
    # denoising step is progress, so one generate() call longer than that is not given up.
    stalls: list[str] = []
    _limit(ctx, tmp_path, progress_timeout_s=0.3, heartbeat_s=0.05)
    ctx.on_stall = lambda model, job_id: stalls.append(job_id)
    # 60 UNet calls at 32 px: several times 0.3 s, one call far shorter.
    gen_id = _generation(ctx, tenant, steps=60, width=32, height=32)
    assert run_generation(gen_id, ctx) == "succeeded (batch of 1)"
    assert stalls == [] and _gen(ctx, gen_id).status == "succeeded"


def test_a_generation_past_its_time_limit_fails(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    _limit(ctx, tmp_path, generation_time_limit_s=0.05)
    gen_id = _generation(ctx, tenant, steps=150, width=64, height=64)
    assert run_generation(gen_id, ctx) == "stopped"
    gen = _gen(ctx, gen_id)
    assert gen.status == "failed" and gen.images == []
    assert gen.error is not None and "time limit of 0.05 s" in gen.error
    assert "TUNEQDM_GENERATION_TIME_LIMIT_S" in gen.error
    assert _files(ctx) == []


def _run_in_thread(target: Callable[[], str]) -> tuple[threading.Thread, list[str]]:
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(target()))
    thread.start()
    return thread, outcome


def _wait_running(ctx: Context, gen_id: str) -> None:
    deadline = time.monotonic() + 120
    while _gen(ctx, gen_id).status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_cancel_one_generation_of_a_shared_batch(ctx: Context, tenant: Tenant) -> None:
    with ctx.sessions() as s:
        other = keys.get_or_create_tenant(session=s, name="other")
        s.commit()
    # Long enough to cancel while it runs; it is not stopped, so not longer.
    size = {"steps": 100, "width": 32, "height": 32}
    mine = _generation(ctx, tenant, seed=1, **size)
    theirs = _generation(ctx, other, seed=2, **size)
    thread, outcome = _run_in_thread(lambda: run_generation(mine, ctx))
    _wait_running(ctx, mine)
    _wait_running(ctx, theirs)  # claimed into the same loop by the same call
    with ctx.sessions() as s:
        cancel_generation(session=s, tenant=s.merge(tenant), generation_id=mine)
    thread.join(timeout=300)
    assert outcome == ["succeeded (batch of 2)"]
    canceled, done = _gen(ctx, mine), _gen(ctx, theirs)
    assert canceled.status == "canceled" and canceled.images == []
    assert done.status == "succeeded" and [i.index for i in done.images] == [0]
    # Files: exactly the other tenant's image.
    assert _files(ctx) == [done.images[0].storage_key]


def test_cancel_a_lone_generation_stops_its_loop(ctx: Context, tenant: Tenant) -> None:
    gen_id = _generation(ctx, tenant, steps=150, width=64, height=64, num_images=1)
    thread, outcome = _run_in_thread(lambda: run_generation(gen_id, ctx))
    _wait_running(ctx, gen_id)
    with ctx.sessions() as s:
        cancel_generation(session=s, tenant=s.merge(tenant), generation_id=gen_id)
    thread.join(timeout=300)
    assert outcome == ["stopped"]
    gen = _gen(ctx, gen_id)
    assert gen.status == "canceled" and gen.images == [] and gen.error is None
    assert _files(ctx) == []
