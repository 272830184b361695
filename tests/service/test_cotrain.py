"""Co-training with real processes (docs/workers.md, "Co-training"): a Celery worker trains
several queued fine-tunes in one loop, each ending with the adapter it gets alone; a canceled
member leaves without disturbing the others; the group's places go to tenants in turn; after a
SIGKILL each member resumes from its own checkpoint.

The adapters are compared with the same jobs trained alone in this process (`finetune()` on the
stored photos, the worker's settings), tensor by tensor, within the float32 bound of
tests/core/test_cotrain.py. Photos are kept (TUNEQDM_PHOTO_RETENTION_S) for that.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from app.db import make_engine, make_sessionmaker
from app.models import Adapter, FinetuneJob
from app.schemas import FinetuneParams
from app.services.finetunes import cancel_finetune
from tests.core.test_cotrain import F32_ADAPTER, relative_error
from tests.service.procs import wait_for
from tests.service.test_faults import FAST, Deployment
from worker.files import checkpoint_key
from worker.finetunes import finetune_config
from worker.runtime import Runtime


@pytest.fixture
def deploy(
    pg_url: str,
    redis_url: str,
    logs: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    quant_cache: Path,
) -> Iterator[Deployment]:
    engine = make_engine(pg_url)
    values: dict[str, object] = {
        "database_url": pg_url,
        "broker_url": redis_url,
        "data_dir": tmp_path,
        "model": str(tiny_model_dir),
        "quant_cache_dir": quant_cache,
        "photo_retention_s": 3600,
        **FAST,
    }
    deployment = Deployment(values=values, logs=logs, sessions=make_sessionmaker(engine))
    try:
        yield deployment
    finally:
        deployment.stop()
        engine.dispose()


def _assert_trained_as_alone(deploy: Deployment, job_ids: list[str]) -> None:
    """Each job's stored adapter equals the one `finetune()` gives the same job alone."""
    from tuneqdm_core.finetune import Subject, finetune
    from tuneqdm_core.serialization import adapter_tensors

    runtime = Runtime(deploy.settings)  # the worker's base, loaded as the worker loads it
    storage = deploy.storage
    for job_id in job_ids:
        with deploy.sessions() as s:
            job = s.get(FinetuneJob, job_id)
            assert job is not None
            photos = [storage.path(img.storage_key) for img in job.images]
            adapter = s.scalars(select(Adapter).where(Adapter.finetune_job_id == job_id)).one()
        subject = Subject(job.instance_prompt, photos, class_prompt=job.class_prompt)
        config = finetune_config(FinetuneParams.model_validate(job.params), job.id)
        alone = adapter_tensors(finetune(runtime.base, [subject], config).adapter)
        grouped = load_file(storage.path(adapter.storage_key))
        assert grouped.keys() == alone.keys()
        for name, want in alone.items():
            error = relative_error(grouped[name], want)
            assert error <= F32_ADAPTER, (job_id, name, error)


def test_jobs_of_two_tenants_train_in_one_group_and_a_canceled_member_leaves_alone(
    deploy: Deployment,
) -> None:
    deploy.values["cotrain_max"] = 3
    a, b = deploy.tenant("acme"), deploy.tenant("globex")
    first = [
        deploy.finetune(a, steps=6, seed=1),
        deploy.finetune(a, steps=6, seed=2),
        deploy.finetune(b, steps=6, seed=3),
    ]
    worker = deploy.worker("worker")
    assert set(deploy.wait_final().values()) == {"succeeded"}, worker.log()[-3000:]
    assert [deploy.row(FinetuneJob, i).group_size for i in first] == [3, 3, 3]
    assert "joined a co-training group of 3" in worker.log()

    # Queued while the worker runs: later ones join the group between steps.
    second = [
        deploy.finetune(a, steps=40, seed=4),
        deploy.finetune(b, steps=40, seed=5),
        deploy.finetune(b, steps=40, seed=6),
    ]
    leaving = second[1]

    def all_three_training() -> bool:
        rows = [deploy.row(FinetuneJob, i) for i in second]
        return all(r.group_size == 3 for r in rows) and rows[1].progress_step >= 2

    wait_for("the three to train together", all_three_training, 120, [worker])
    with deploy.sessions() as s:
        cancel_finetune(session=s, tenant=s.merge(b), finetune_id=leaving)
    states = deploy.wait_final()
    assert [states[i] for i in second] == ["succeeded", "canceled", "succeeded"], states
    canceled = deploy.row(FinetuneJob, leaving)
    assert 2 <= canceled.progress_step < 40
    # The other two trained on as a group of two.
    assert [deploy.row(FinetuneJob, i).group_size for i in (second[0], second[2])] == [2, 2]
    deploy.check()
    _assert_trained_as_alone(deploy, [*first, second[0], second[2]])


def test_places_go_to_tenants_in_turn_and_members_resume_from_their_own_checkpoints(
    deploy: Deployment,
) -> None:
    """Tenant acme queues four, globex one, two places: globex's job is in the first group. A
    SIGKILL of that worker: each member resumes from its own checkpoint on the next one (alone,
    being a second attempt); every job ends succeeded."""
    deploy.values.update(cotrain_max=2)
    a, b = deploy.tenant("acme"), deploy.tenant("globex")
    long = {"steps": 40, "checkpoint_every": 3}
    a_first = deploy.finetune(a, seed=1, **long)
    a_rest = [deploy.finetune(a, seed=s, steps=4) for s in (2, 3, 4)]
    b_job = deploy.finetune(b, seed=5, **long)
    group = [a_first, b_job]
    checkpoints = [
        deploy.storage.path(checkpoint_key(deploy.row(FinetuneJob, i).tenant_id, i))
        / "checkpoint.pt"
        for i in group
    ]
    first = deploy.worker("first")

    def past_a_checkpoint() -> bool:
        rows = [deploy.row(FinetuneJob, i) for i in group]
        return all(c.is_file() for c in checkpoints) and all(r.progress_step > 3 for r in rows)

    wait_for("both members past a checkpoint", past_a_checkpoint, 120, [first])
    first.kill()
    rows = [deploy.row(FinetuneJob, i) for i in group]
    assert [(r.status, r.group_size) for r in rows] == [("running", 2)] * 2
    # Nothing of acme's backlog started: globex's job took the second place.
    assert [deploy.row(FinetuneJob, i).status for i in a_rest] == ["queued"] * 3
    saved = [int(torch.load(c, weights_only=True)["step"]) for c in checkpoints]
    assert all(s >= 3 and s % 3 == 0 for s in saved), saved

    second = deploy.worker("second")
    states = deploy.wait_final()
    assert set(states.values()) == {"succeeded"}, (states, second.log()[-3000:])
    for job_id, step in zip(group, saved, strict=True):
        row = deploy.row(FinetuneJob, job_id)
        # Its own checkpoint's step, on a second attempt that trained alone.
        assert (row.resumed_from_step, row.attempts, row.group_size) == (step, 2, None)
    deploy.check()
