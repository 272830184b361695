"""Co-training with real processes (docs/workers.md, "Co-training"), one scenario so that only
two workers start: the group's places go to tenants in turn; after a SIGKILL each member resumes
from its own checkpoint; queued fine-tunes of two tenants train as one group, each ending with
the adapter it gets alone; a canceled member leaves without disturbing the others.

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

from app.models import Adapter, FinetuneJob
from app.schemas import FinetuneParams
from app.services.finetunes import cancel_finetune
from tests.core.test_cotrain import F32_ADAPTER, relative_error
from tests.service.procs import wait_for
from tests.service.test_faults import FAST, Deployment, deployed
from worker.files import checkpoint_key
from worker.runtime import Runtime
from worker.training import finetune_config

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")


@pytest.fixture
def deploy(logs: Path, tiny_settings: dict[str, object]) -> Iterator[Deployment]:
    with deployed({**tiny_settings, "photo_retention_s": 3600, **FAST}, logs) as deployment:
        yield deployment


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
        trained = finetune(runtime.base, [subject], config).adapter
        assert trained is not None
        alone = adapter_tensors(trained)
        grouped = load_file(storage.path(adapter.storage_key))
        assert grouped.keys() == alone.keys()
        for name, want in alone.items():
            error = relative_error(grouped[name], want)
            assert error <= F32_ADAPTER, (job_id, name, error)


def test_co_training_groups_fairly_matches_solo_survives_cancel_and_sigkill(
    deploy: Deployment,
) -> None:
    a, b = deploy.tenant("acme"), deploy.tenant("globex")
    jobs = Jobs(deploy)

    # Fair places, two of them: acme queues four, globex two; globex's first job takes the
    # second place of the first group although three of acme's are older.
    long = {"steps": 16, "checkpoint_every": 3}
    a1 = deploy.finetune(a, seed=1, **long)
    backlog = [deploy.finetune(a, seed=s, steps=4) for s in (2, 3, 4)]
    b1 = deploy.finetune(b, seed=5, **long)
    backlog.append(deploy.finetune(b, seed=6, steps=4))
    group = [a1, b1]
    checkpoints = [jobs.checkpoint(i) for i in group]
    first = deploy.worker("first", cotrain_max=2)

    def past_a_checkpoint() -> bool:
        rows = jobs.rows(group)
        return all(c.is_file() for c in checkpoints) and all(r.progress_step > 3 for r in rows)

    wait_for("both members past a checkpoint", past_a_checkpoint, 120, [first])
    # SIGKILL mid-way: each member must resume from its own checkpoint.
    first.kill()
    assert [(r.status, r.group_size) for r in jobs.rows(group)] == [("running", 2)] * 2
    assert [r.status for r in jobs.rows(backlog)] == ["queued"] * 4
    saved = [int(torch.load(c, weights_only=True)["step"]) for c in checkpoints]
    assert all(s >= 3 and s % 3 == 0 for s in saved), saved

    # Three places: the killed members come back alone (second attempts); of the backlog,
    # three of two tenants train as one group.
    second = deploy.worker("second", cotrain_max=3)
    states = deploy.wait_final()
    assert set(states.values()) == {"succeeded"}, (states, second.log()[-3000:])
    for row, step in zip(jobs.rows(group), saved, strict=True):
        assert (row.resumed_from_step, row.attempts, row.group_size) == (step, 2, None)
    grouped = [r for r in jobs.rows(backlog) if r.group_size == 3]
    assert len(grouped) == 3 and {r.tenant_id for r in grouped} == {a.id, b.id}
    assert "joined a co-training group of 3" in second.log()

    # A member canceled mid-way leaves; the other two train on as a group of two. They are
    # queued while no worker runs, so the next one claims all three at once (an idle worker
    # would start the first alone, and a short job can end before its first look for others).
    second.stop()
    staying = [deploy.finetune(a, seed=7, steps=40), deploy.finetune(b, seed=8, steps=40)]
    leaving = deploy.finetune(b, seed=9, steps=40)
    third = deploy.worker("third", cotrain_max=3)

    def three_training() -> bool:
        rows = jobs.rows([*staying, leaving])
        return all(r.group_size == 3 for r in rows) and rows[-1].progress_step >= 2

    wait_for("the three to train together", three_training, 120, [third])
    with deploy.sessions() as s:
        cancel_finetune(session=s, tenant=s.merge(b), finetune_id=leaving)
    states = deploy.wait_final()
    assert [states[i] for i in [*staying, leaving]] == ["succeeded"] * 2 + ["canceled"], states
    assert 2 <= deploy.row(FinetuneJob, leaving).progress_step < 40
    assert [r.group_size for r in jobs.rows(staying)] == [2, 2]
    deploy.check()
    _assert_trained_as_alone(deploy, [*backlog, *staying])


class Jobs:
    def __init__(self, deploy: Deployment) -> None:
        self.deploy = deploy

    def rows(self, ids: list[str]) -> list[FinetuneJob]:
        return [self.deploy.row(FinetuneJob, i) for i in ids]

    def checkpoint(self, job_id: str) -> Path:
        tenant = self.deploy.row(FinetuneJob, job_id).tenant_id
        return self.deploy.storage.path(checkpoint_key(tenant, job_id)) / "checkpoint.pt"
