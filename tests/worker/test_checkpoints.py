"""Kept checkpoints (params.keep_checkpoints) of a fine-tune run by the worker in-process: one
per progress-image step, each the core's adapter at that step; a promoted one generates what
the core made with it; deleting the fine-tune deletes their files; a step kept again adds
nothing, a lost lease writes nothing, and the collector takes a file no row names."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from sqlalchemy import select, update

from app.models import (
    Adapter,
    FinetuneCheckpoint,
    FinetuneImage,
    FinetuneJob,
    FinetuneSample,
    Tenant,
)
from app.schemas import FinetuneParams
from app.services import retention
from app.services.adapters import promote_checkpoint
from app.storage import finetune_checkpoints_prefix
from tests.worker.conftest import submit_finetune
from worker.context import Context
from worker.files import checkpoint_attempt_key, collect_orphans
from worker.finetunes import run_finetune, sampling_for, store_checkpoint
from worker.jobs import Lease, claim
from worker.training import finetune_config

PROMPTS = ["a photo of sks dog"]
STEPS = (2, 4, 5)  # every 2 steps and the last one


def _params() -> str:
    return json.dumps(
        {
            "steps": 5,
            "resolution": 32,
            "checkpoint_every": 2,
            "seed": 3,
            "validation_prompts": PROMPTS,
            "sample_every": 2,
            "keep_checkpoints": True,
        }
    )


def _core_adapters(ctx: Context, job_id: str, photos: list[Path]) -> dict[int, Any]:
    """The core's own run of the job: its adapter (scales) at each progress-image step."""
    from tuneqdm_core.finetune import Subject, finetune
    from tuneqdm_core.serialization import adapter_tensors

    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None
    params = FinetuneParams.model_validate(job.params)
    kept: dict[int, Any] = {}

    def on_sample(step: int, images: list[Any], adapter: Any) -> None:
        kept[step] = {k: v.clone() for k, v in adapter_tensors(adapter).items()}

    finetune(
        ctx.runtime.base,
        [Subject(instance_prompt=job.instance_prompt, images=photos)],
        finetune_config(params, job_id),
        sampling=sampling_for(ctx, params),
        on_sample=on_sample,
    )
    return kept


def test_one_checkpoint_per_progress_step_each_the_cores_adapter_then_deleted(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    ctx.settings.sample_steps = 2
    job_id = submit_finetune(ctx, tenant, _params(), name="rex")
    # The photos as the worker reads them, before its end deletes them.
    with ctx.sessions() as s:
        keys = s.scalars(
            select(FinetuneImage.storage_key)
            .where(FinetuneImage.job_id == job_id)
            .order_by(FinetuneImage.index)
        ).all()
    photos = [
        Path(shutil.copy(ctx.storage.path(k), tmp_path / f"{i}.jpg")) for i, k in enumerate(keys)
    ]
    assert run_finetune(job_id, ctx) == "succeeded"

    with ctx.sessions() as s:
        rows = s.scalars(
            select(FinetuneCheckpoint)
            .where(FinetuneCheckpoint.job_id == job_id)
            .order_by(FinetuneCheckpoint.step)
        ).all()
        published = s.scalars(select(Adapter).where(Adapter.finetune_job_id == job_id)).one()
    assert [r.step for r in rows] == list(STEPS)
    for row in rows:
        assert row.storage_key == checkpoint_attempt_key(tenant.id, job_id, row.step, 1)
        assert ctx.storage.path(row.storage_key).stat().st_size == row.size_bytes
    stored = {r.step: load_file(ctx.storage.path(r.storage_key)) for r in rows}
    # The last step's checkpoint is the published adapter; earlier ones differ from it.
    final = load_file(ctx.storage.path(published.storage_key))
    assert all(stored[5][k].equal(final[k]) for k in final)
    assert not all(stored[2][k].equal(final[k]) for k in final)
    # Each is the core's adapter at that step.
    core = _core_adapters(ctx, job_id, photos)
    assert sorted(core) == list(STEPS)
    for step in STEPS:
        assert stored[step].keys() == core[step].keys()
        assert all(stored[step][k].equal(core[step][k]) for k in core[step]), step
    # Owned files: the collector leaves them.
    assert collect_orphans(ctx.sessions, ctx.storage, older_than_s=0) == []

    # Promoted, step 2 is a registry adapter that makes the image the core made at step 2.
    with ctx.sessions() as s:
        adapter = promote_checkpoint(
            session=s,
            storage=ctx.storage,
            settings=ctx.settings,
            tenant=s.merge(tenant),
            finetune_id=job_id,
            step=2,
        )
        sample = s.scalars(
            select(FinetuneSample).where(FinetuneSample.job_id == job_id, FinetuneSample.step == 2)
        ).one()
    promoted = ctx.storage.path(adapter.storage_key)
    assert adapter.tokens == ["sks"] and adapter.name == "rex step 2"
    assert adapter.base_fingerprint == ctx.runtime.base.fingerprint
    assert load_file(promoted).keys() == core[2].keys()
    assert all(load_file(promoted)[k].equal(core[2][k]) for k in core[2])
    made = _generate(ctx, promoted, sample)
    expected = Image.open(io.BytesIO(ctx.storage.path(sample.storage_key).read_bytes()))
    assert made.tobytes() == expected.convert("RGB").tobytes()

    # Deleting the fine-tune deletes its checkpoints (files, rows), not the promoted adapter.
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None
        retention.delete_finetune(session=s, storage=ctx.storage, job=job, delete_adapter=False)
    with ctx.sessions() as s:
        assert s.scalars(select(FinetuneCheckpoint)).all() == []
    assert not ctx.storage.path(finetune_checkpoints_prefix(tenant.id, job_id)).exists()
    assert not any(ctx.storage.exists(r.storage_key) for r in rows)
    assert promoted.is_file()


def _generate(ctx: Context, path: Path, sample: FinetuneSample) -> Image.Image:
    """The core's generation with the adapter file, as the progress image was made."""
    from tuneqdm_core.generate import GenerationRequest, generate
    from tuneqdm_core.serialization import load_adapter

    base = ctx.runtime.base
    sampling = sampling_for(
        ctx,
        FinetuneParams(validation_prompts=PROMPTS, steps=5, sample_every=2),
    )
    request = GenerationRequest(
        prompt=sample.prompt,
        adapter=load_adapter(path, base.unet),
        steps=sampling.steps,
        guidance_scale=sampling.guidance_scale,
        seed=sample.seed,
        width=sampling.size,
        height=sampling.size,
    )
    with torch.no_grad():
        (images,) = generate(base, [request], precision=sampling.precision)
    return images[0].image.convert("RGB")


def test_a_step_kept_again_adds_nothing_a_lost_lease_writes_nothing(
    ctx: Context, tenant: Tenant
) -> None:
    """What a resumed attempt does when it reaches a step it kept before its worker died."""
    from tuneqdm_core.adapter import Adapter as CoreAdapter
    from tuneqdm_core.adapter import AdapterConfig

    job_id = submit_finetune(ctx, tenant, _params())
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and claim(s, FinetuneJob, job_id, "a", stale_after_s=30)
        s.refresh(job)
    adapter = CoreAdapter.create(
        ctx.runtime.base.unet, AdapterConfig(method="tuneqdm", intervals=1)
    )
    with Lease(ctx.sessions, FinetuneJob, job_id, "a", heartbeat_s=30) as lease:
        assert store_checkpoint(ctx, job, lease, 1, 2, adapter)
        assert store_checkpoint(ctx, job, lease, 2, 2, adapter)  # attempt 2, the same step
    with ctx.sessions() as s:
        rows = s.scalars(
            select(FinetuneCheckpoint).where(FinetuneCheckpoint.job_id == job_id)
        ).all()
    assert [(r.step, r.storage_key) for r in rows] == [
        (2, checkpoint_attempt_key(tenant.id, job_id, 2, 1))
    ]
    assert not ctx.storage.exists(checkpoint_attempt_key(tenant.id, job_id, 2, 2))
    # A worker that lost the lease stores neither a row nor a file.
    with Lease(ctx.sessions, FinetuneJob, job_id, "other", heartbeat_s=30) as lease:
        assert not store_checkpoint(ctx, job, lease, 3, 4, adapter)
        assert lease.lost.is_set()
    assert not ctx.storage.exists(checkpoint_attempt_key(tenant.id, job_id, 4, 3))

    # A file written by a worker that died before its row: the collector's once the job ended.
    stray = checkpoint_attempt_key(tenant.id, job_id, 4, 1)
    ctx.storage.put(stray, b"scales")
    assert collect_orphans(ctx.sessions, ctx.storage, older_than_s=0) == []
    with ctx.sessions() as s:
        s.execute(update(FinetuneJob).where(FinetuneJob.id == job_id).values(status="failed"))
        s.commit()
    assert collect_orphans(ctx.sessions, ctx.storage, older_than_s=0) == [stray]
    assert ctx.storage.exists(rows[0].storage_key)
