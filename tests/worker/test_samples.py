"""Progress images and the event log of a fine-tune run by the worker in-process: samples at
the expected steps (files and rows), events in order, the same adapter as without samples, and
a resumed attempt that samples a step again adds no row."""

from __future__ import annotations

import io
import json

import torch
from PIL import Image
from safetensors.torch import load_file
from sqlalchemy import select, update

from app.models import Adapter, FinetuneEvent, FinetuneJob, FinetuneSample, Tenant
from app.schemas import FinetuneParams
from app.services import retention
from app.storage import finetune_sample_key, finetune_samples_prefix
from tests.worker.conftest import submit_finetune
from worker.context import Context
from worker.files import collect_orphans
from worker.finetunes import run_finetune, store_samples
from worker.jobs import Lease, claim

PROMPTS = ["a photo of sks dog", "sks dog on a beach"]


def _params(**extra: object) -> str:
    return json.dumps({"steps": 5, "resolution": 32, "checkpoint_every": 2, "seed": 3, **extra})


def _adapter_tensors(ctx: Context, job_id: str) -> dict[str, torch.Tensor]:
    with ctx.sessions() as s:
        adapter = s.scalars(select(Adapter).where(Adapter.finetune_job_id == job_id)).one()
    return load_file(ctx.storage.path(adapter.storage_key))


def test_samples_at_the_expected_steps_events_in_order_and_the_same_adapter(
    ctx: Context, tenant: Tenant
) -> None:
    ctx.settings.sample_steps = 2
    sampled = submit_finetune(
        ctx, tenant, _params(validation_prompts=PROMPTS, sample_every=2), name="sampled"
    )
    plain = submit_finetune(ctx, tenant, _params(), name="plain")
    assert run_finetune(sampled, ctx) == "succeeded"
    # A job with progress images trains alone: the compatible queued one was not co-trained.
    assert ctx.settings.cotrain_max > 1
    with ctx.sessions() as s:
        assert s.get(FinetuneJob, plain).status == "queued"  # type: ignore[union-attr]
    assert run_finetune(plain, ctx) == "succeeded"

    with ctx.sessions() as s:
        rows = s.scalars(
            select(FinetuneSample)
            .where(FinetuneSample.job_id == sampled)
            .order_by(FinetuneSample.step, FinetuneSample.prompt_index)
        ).all()
        events = s.scalars(
            select(FinetuneEvent).where(FinetuneEvent.job_id == sampled).order_by(FinetuneEvent.id)
        ).all()
        assert s.scalars(select(FinetuneSample).where(FinetuneSample.job_id == plain)).all() == []
    # The base at step 0, then every 2 steps and after the last one; prompt i always with
    # seed i.
    assert [(r.step, r.prompt_index, r.seed) for r in rows] == [
        (step, i, i) for step in (0, 2, 4, 5) for i in (0, 1)
    ]
    assert [r.prompt for r in rows[:2]] == PROMPTS
    for row in rows:
        data = ctx.storage.path(row.storage_key).read_bytes()
        assert len(data) == row.size_bytes
        assert Image.open(io.BytesIO(data)).size == (32, 32)  # the tiny base's native size

    types = [e.type for e in events]
    assert types[:2] == ["queued", "running"] and types[-1] == "succeeded"
    samples = [e.data for e in events if e.type == "samples"]
    assert samples == [{"step": s, "prompt_indexes": [0, 1]} for s in (0, 2, 4, 5)]
    steps = [e.data["step"] for e in events if e.type == "progress"]
    assert steps == sorted(steps) and steps[-1] == 5 and 1 <= len(steps) <= 5
    # A samples event comes after the progress of its step.
    order = [(e.type, int(e.data["step"])) for e in events if e.type in ("progress", "samples")]
    for i, (kind, step) in enumerate(order):
        if kind == "samples":
            assert all(s <= step for k, s in order[:i] if k == "progress"), order
    assert events[-1].data["adapter_id"] == "ad_" + sampled.removeprefix("ft_")

    # Sampling drew nothing from the training's random streams.
    a, b = _adapter_tensors(ctx, sampled), _adapter_tensors(ctx, plain)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)

    # Photos are gone with the job's end; progress images stay, and are owned.
    with ctx.sessions() as s:
        assert s.get(FinetuneJob, sampled).photos_deleted_at is not None  # type: ignore[union-attr]
    assert collect_orphans(ctx.sessions, ctx.storage, older_than_s=0) == []
    assert all(ctx.storage.exists(r.storage_key) for r in rows)

    # Deleting the fine-tune deletes its progress images (files, rows) and its events.
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, sampled)
        assert job is not None
        retention.delete_finetune(session=s, storage=ctx.storage, job=job, delete_adapter=False)
    with ctx.sessions() as s:
        assert s.scalars(select(FinetuneSample).where(FinetuneSample.job_id == sampled)).all() == []
        assert s.scalars(select(FinetuneEvent).where(FinetuneEvent.job_id == sampled)).all() == []
    assert not ctx.storage.path(finetune_samples_prefix(tenant.id, sampled)).exists()


def test_a_step_sampled_again_adds_no_row_and_no_event(ctx: Context, tenant: Tenant) -> None:
    """What a resumed attempt does when it repeats steps it sampled before its worker died."""
    job_id = submit_finetune(ctx, tenant, _params(validation_prompts=PROMPTS))
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and claim(s, FinetuneJob, job_id, "a", stale_after_s=30)
        s.refresh(job)
    params = FinetuneParams.model_validate(job.params)
    assert params.sample_every == 2  # the default: a quarter of the steps, rounded up
    images = [Image.new("RGB", (32, 32), (i * 90, 0, 0)) for i in range(2)]
    with Lease(ctx.sessions, FinetuneJob, job_id, "a", heartbeat_s=30) as lease:
        assert store_samples(ctx, job, params, lease, 2, images)
        assert store_samples(ctx, job, params, lease, 2, images)
    with ctx.sessions() as s:
        rows = s.scalars(select(FinetuneSample).where(FinetuneSample.job_id == job_id)).all()
        kinds = s.scalars(
            select(FinetuneEvent.type)
            .where(FinetuneEvent.job_id == job_id)
            .order_by(FinetuneEvent.id)
        ).all()
    assert sorted((r.step, r.prompt_index) for r in rows) == [(2, 0), (2, 1)]
    assert kinds == ["queued", "running", "samples"]
    # A worker that lost the lease stores no row.
    with Lease(ctx.sessions, FinetuneJob, job_id, "other", heartbeat_s=30) as lease:
        assert not store_samples(ctx, job, params, lease, 4, images)
        assert lease.lost.is_set()


def test_the_collector_removes_progress_images_no_row_owns(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, _params(validation_prompts=PROMPTS))
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and claim(s, FinetuneJob, job_id, "a", stale_after_s=30)
        s.refresh(job)
    params = FinetuneParams.model_validate(job.params)
    images = [Image.new("RGB", (32, 32)) for _ in PROMPTS]
    with Lease(ctx.sessions, FinetuneJob, job_id, "a", heartbeat_s=30) as lease:
        assert store_samples(ctx, job, params, lease, 2, images)
    owned = ctx.storage.path(finetune_sample_key(tenant.id, job_id, 2, 0))
    stray = finetune_sample_key(tenant.id, job_id, 4, 0)  # written, then the worker died
    ctx.storage.put(stray, b"png")
    gone_job = finetune_sample_key(tenant.id, "ft_0123456789abcdef", 2, 0)
    ctx.storage.put(gone_job, b"png")
    # While the job runs, its worker may be between a file and its row: nothing is taken.
    assert collect_orphans(ctx.sessions, ctx.storage, older_than_s=0) == [
        finetune_samples_prefix(tenant.id, "ft_0123456789abcdef")
    ]
    with ctx.sessions() as s:
        s.execute(update(FinetuneJob).where(FinetuneJob.id == job_id).values(status="failed"))
        s.commit()
    assert collect_orphans(ctx.sessions, ctx.storage, older_than_s=0) == [stray]
    assert owned.is_file()
