"""No lost job: SIGKILL the worker mid-fine-tune; another worker resumes from the checkpoint.

The job also makes progress images every SAMPLE_EVERY steps: the killed worker may have
sampled steps after its last checkpoint, which the resumed one samples again; each (step,
prompt) still has one row and one `samples` event.

Real processes: two `celery worker` processes one after the other, Redis broker, PostgreSQL.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from app.db import make_engine, make_sessionmaker
from app.models import Adapter, FinetuneEvent, FinetuneJob, FinetuneSample
from app.queue import CelerySender
from app.services import keys
from app.services.finetunes import FinetuneForm, Upload, create_finetune
from app.settings import Settings
from app.storage import LocalStorage
from tests.service.procs import service_env, start_worker, wait_for
from tests.worker.conftest import photo_png
from worker.files import checkpoint_key

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

STEPS, EVERY = 60, 3
SAMPLE_EVERY = 4


def test_sigkilled_fine_tune_resumes_from_its_checkpoint(
    pg_url: str, redis_url: str, logs: Path, tiny_settings: dict[str, object]
) -> None:

    values: dict[str, object] = {
        **tiny_settings,
        "heartbeat_s": 0.5,
        "stale_after_s": 3,
        "sweep_every_s": 1,
        "torch_threads": 1,
        "sample_steps": 2,
    }
    settings = Settings(**values)  # type: ignore[arg-type]
    env = service_env(**values)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    storage = LocalStorage(settings.resolved_storage_dir)
    with sessions() as s:
        tenant = keys.get_or_create_tenant(session=s, name="acme")
        s.commit()
        job_id = create_finetune(
            session=s,
            storage=storage,
            sender=CelerySender(redis_url),
            settings=settings,
            tenant=tenant,
            form=FinetuneForm(
                instance_prompt="a photo of sks dog",
                params=f'{{"steps": {STEPS}, "checkpoint_every": {EVERY}, "resolution": 32, '
                f'"seed": 5, "validation_prompts": ["a photo of sks dog"], '
                f'"sample_every": {SAMPLE_EVERY}}}',
            ),
            uploads=[Upload(f"{i}.png", io.BytesIO(photo_png(i))) for i in range(3)],
        ).id
    checkpoint = storage.path(checkpoint_key(tenant.id, job_id)) / "checkpoint.pt"

    def job() -> FinetuneJob:
        with sessions() as s:
            row = s.get(FinetuneJob, job_id)
            assert row is not None
            return row

    first = start_worker(env, logs, "first")
    second = None
    try:
        wait_for(
            "progress past a checkpoint",
            lambda: checkpoint.is_file() and job().progress_step > EVERY,
            240,
            [first],
        )
        first.kill()
        killed_at = job().progress_step
        assert job().status == "running", "finished before the kill; raise STEPS"
        # The database's progress lags the worker by up to one write interval; the checkpoint
        # on disk says exactly where the next run must start.
        saved = int(torch.load(checkpoint, weights_only=True)["step"])
        assert saved >= EVERY and saved % EVERY == 0

        second = start_worker(env, logs, "second")
        seen: list[int] = []

        def done() -> bool:
            row = job()
            if row.lease_owner is not None and row.heartbeat_at is not None:
                seen.append(row.progress_step)
            return row.status in ("succeeded", "failed", "canceled")

        wait_for("the resumed job to finish", done, 240, [second])
        row = job()
        assert row.status == "succeeded", (row.error, second.log()[-3000:])
        resumed = row.resumed_from_step
        assert resumed == saved, (resumed, saved)
        assert row.attempts == 2  # the killed run and this one
        # Progress never went back to step 0 after the kill.
        assert min(seen) >= EVERY, seen
        assert f"{job_id}" in second.log() and "requeued" in second.log()
        with sessions() as s:
            adapter = s.scalars(select(Adapter).where(Adapter.finetune_job_id == job_id)).one()
        assert storage.path(adapter.storage_key).stat().st_size == adapter.size_bytes
        assert not checkpoint.exists()
        # Progress images: once per sampled step (and step 0, the base, made by the first
        # attempt only), however often a step was sampled.
        sampled = list(range(0, STEPS + 1, SAMPLE_EVERY))
        with sessions() as s:
            rows = s.scalars(
                select(FinetuneSample.step)
                .where(FinetuneSample.job_id == job_id)
                .order_by(FinetuneSample.step)
            ).all()
            events = s.scalars(
                select(FinetuneEvent)
                .where(FinetuneEvent.job_id == job_id)
                .order_by(FinetuneEvent.id)
            ).all()
        assert list(rows) == sampled
        assert [e.data["step"] for e in events if e.type == "samples"] == sampled
        # The sweep requeued the job (its log says so above), then the second worker ran it.
        kinds = [e.type for e in events if e.type not in ("progress", "samples", "phase")]
        assert kinds == ["queued", "running", "released", "running", "succeeded"], kinds
        assert [e.data["attempt"] for e in events if e.type == "running"] == [1, 2]
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
        engine.dispose()
    # Leave a timing note in the output for the closing note.
    print(f"killed at step {killed_at}, resumed from {resumed}; {time.strftime('%X')}")
