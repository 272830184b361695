"""What a worker says it is doing (`phase`, docs/api.md "Phases"), the step-0 progress images of
the base, and generations with `compare_base`: the job functions in-process on the tiny model.

A fine-tune's event log records each phase its worker entered, in order, so the sequence is
read back exactly (no polling of a moving row)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from sqlalchemy import select

from app.models import FinetuneEvent, FinetuneJob, FinetuneSample, GenerationJob, Tenant
from app.schemas import GenerationCreate
from app.services.generations import create_generation
from tests.api.factories import RecordingSender
from tests.worker.conftest import submit_finetune
from worker.context import Context
from worker.finetunes import SAMPLE_SEED, run_finetune
from worker.generations import run_generation
from worker.jobs import Lease, claim, release_owned

PROMPTS = ["a photo of sks dog", "sks dog on a beach"]


def _phases(ctx: Context, job_id: str) -> list[str]:
    """The phases of the job's event log, without the base's load (done once per process: only
    the first job of this test process sees it)."""
    with ctx.sessions() as s:
        events = s.scalars(
            select(FinetuneEvent)
            .where(FinetuneEvent.job_id == job_id, FinetuneEvent.type == "phase")
            .order_by(FinetuneEvent.id)
        ).all()
    return [e.data["phase"] for e in events if e.data["phase"] != "loading base"]


def _pixels(ctx: Context, key: str) -> np.ndarray:
    with ctx.storage.open(key) as f:
        return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"), dtype=np.int16)


def test_a_fine_tune_with_progress_images_goes_through_its_phases(
    ctx: Context, tenant: Tenant
) -> None:
    from tuneqdm_core.generate import GenerationRequest, generate

    ctx.settings.sample_steps = 2
    params = {"steps": 4, "resolution": 32, "seed": 3}
    job_id = submit_finetune(
        ctx, tenant, json.dumps({**params, "validation_prompts": PROMPTS, "sample_every": 2})
    )
    assert run_finetune(job_id, ctx) == "succeeded"
    # Step 0 (the base) first, then the photos, training between the progress images of steps
    # 2 and 4, and the adapter's save.
    assert _phases(ctx, job_id) == [
        "progress images",
        "preparing photos",
        "training",
        "progress images",
        "training",
        "progress images",
        "saving",
    ]
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.status == "succeeded" and job.phase is None
        rows = s.scalars(
            select(FinetuneSample)
            .where(FinetuneSample.job_id == job_id)
            .order_by(FinetuneSample.step, FinetuneSample.prompt_index)
        ).all()
    assert [(r.step, r.prompt_index, r.seed) for r in rows] == [
        (step, i, SAMPLE_SEED + i) for step in (0, 2, 4) for i in (0, 1)
    ]
    # Step 0 is the plain base with the prompts' seeds: the same images as a generation of it.
    made = generate(
        ctx.runtime.base,
        [
            GenerationRequest(prompt=p, steps=2, seed=SAMPLE_SEED + i, width=32, height=32)
            for i, p in enumerate(PROMPTS)
        ],
    )
    for row, images in zip(rows[:2], made, strict=True):
        expected = np.asarray(images[0].image.convert("RGB"), dtype=np.int16)
        assert np.array_equal(_pixels(ctx, row.storage_key), expected)


def test_a_co_trained_fine_tune_goes_through_its_phases(ctx: Context, tenant: Tenant) -> None:
    assert ctx.settings.cotrain_max > 1  # a first attempt without progress images co-trains
    job_id = submit_finetune(ctx, tenant, '{"steps": 2, "resolution": 32}')
    assert run_finetune(job_id, ctx) == "succeeded"
    assert _phases(ctx, job_id) == ["preparing photos", "training", "saving"]
    with ctx.sessions() as s:
        assert s.get(FinetuneJob, job_id).phase is None  # type: ignore[union-attr]


def _generation(ctx: Context, tenant: Tenant, adapter_id: str | None, **values: object) -> str:
    with ctx.sessions() as s:
        data = GenerationCreate(
            adapter_id=adapter_id,
            prompt="a photo of sks dog",
            steps=3,
            width=32,
            height=32,
            seed=11,
            num_images=2,
            **values,  # type: ignore[arg-type]
        )
        gen = create_generation(
            session=s,
            sender=RecordingSender(),
            settings=ctx.settings,
            tenant=s.merge(tenant),
            data=data,
        )
        return gen.id


def test_compare_base_makes_the_bases_images_with_the_same_seeds(
    ctx: Context, tenant: Tenant
) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 30, "resolution": 32, "seed": 1}')
    assert run_finetune(job_id, ctx) == "succeeded"
    adapter_id = "ad_" + job_id.removeprefix("ft_")
    both = _generation(ctx, tenant, adapter_id, compare_base=True)
    assert run_generation(both, ctx) == "succeeded (batch of 1)"
    plain = _generation(ctx, tenant, None)
    assert run_generation(plain, ctx) == "succeeded (batch of 1)"
    with ctx.sessions() as s:
        compared = s.get(GenerationJob, both)
        alone = s.get(GenerationJob, plain)
        assert compared is not None and alone is not None
        assert compared.phase is None and alone.phase is None
        # Twice num_images: the adapter's first, then the base's with the same seeds.
        assert [(i.index, i.seed, i.base) for i in compared.images] == [
            (0, 11, False),
            (1, 12, False),
            (2, 11, True),
            (3, 12, True),
        ]
        assert [(i.index, i.seed, i.base) for i in alone.images] == [(0, 11, False), (1, 12, False)]
        ours = [_pixels(ctx, i.storage_key) for i in compared.images]
        theirs = [_pixels(ctx, i.storage_key) for i in alone.images]
    # The base's images equal a plain base generation with the same seeds, up to float32
    # rounding of a different batch (at most one level of 255 on a pixel).
    for base_image, plain_image in zip(ours[2:], theirs, strict=True):
        assert np.abs(base_image - plain_image).max() <= 1
    # The adapter's images are not the base's: it changed something.
    assert any(np.abs(a - b).max() > 8 for a, b in zip(ours[:2], ours[2:], strict=True))


def test_a_phase_is_written_once_and_only_under_the_lease(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "a", stale_after_s=30) == 1
    with Lease(ctx.sessions, FinetuneJob, job_id, "a", heartbeat_s=30) as lease:
        assert lease.enter_phase("training") and lease.enter_phase("training")
    with Lease(ctx.sessions, FinetuneJob, job_id, "other", heartbeat_s=30) as lost:
        # A worker that lost the job (here: never held it) writes no phase and no event.
        assert not lost.enter_phase("saving") and lost.lost.is_set()
    assert _phases(ctx, job_id) == ["training"]
    with ctx.sessions() as s:
        assert s.get(FinetuneJob, job_id).phase == "training"  # type: ignore[union-attr]
    # Given back to the queue, the job drops its worker's phase: it waits again.
    assert release_owned(ctx.sessions, FinetuneJob, job_id, "a", reason=None, counts=False)
    with ctx.sessions() as s:
        assert s.get(FinetuneJob, job_id).phase is None  # type: ignore[union-attr]
