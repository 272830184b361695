"""A worker holds one base: its claims, its stale sweep and its reconciler see only that base's
jobs, and a message of another base's job (a misrouted token) runs nothing here."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.bases import BaseInfo, register
from app.models import FinetuneJob, Tenant, utcnow
from app.queue import queue_safe
from tests.worker.conftest import submit_finetune
from worker.context import Context
from worker.finetunes import run_finetune
from worker.jobs import JobModel, claim, claim_next, reconcile_queued, sweep_stale

OTHER = "sd21-8bit"


def _two_bases(ctx: Context, tenant: Tenant) -> tuple[str, str]:
    """A fine-tune on the worker's base and one on OTHER (registered by its own worker)."""
    with ctx.sessions() as session:
        info = BaseInfo(OTHER, "/models/sd21", 32, "epsilon", 8)
        register(session, info, worker="gpu-2:7")
        session.commit()
    mine = submit_finetune(ctx, tenant, '{"steps": 2}')
    theirs = submit_finetune(ctx, tenant, '{"steps": 2}', base=OTHER)
    return mine, theirs


def _stale(sessions: sessionmaker[Session], *job_ids: str) -> None:
    with sessions() as session:
        session.execute(
            update(FinetuneJob)
            .where(FinetuneJob.id.in_(job_ids))
            .values(status="running", heartbeat_at=utcnow() - timedelta(seconds=600))
        )
        session.commit()


def test_claims_take_only_the_workers_base(ctx: Context, tenant: Tenant) -> None:
    mine, theirs = _two_bases(ctx, tenant)
    base = ctx.settings.base_model
    with ctx.sessions() as s:
        assert s.get(FinetuneJob, theirs).base_model == OTHER  # type: ignore[union-attr]
        # The message names the other base's job: the token claims this base's job instead.
        assert claim_next(s, FinetuneJob, "w1", stale_after_s=30, hint=theirs, base=base) == (
            mine,
            1,
        )
        # Nothing of this base is left, and the other base's job is not claimable here.
        assert claim_next(s, FinetuneJob, "w2", stale_after_s=30, hint=theirs, base=base) is None
        assert claim(s, FinetuneJob, theirs, "w2", stale_after_s=30, base=base) is None
        assert claim(s, FinetuneJob, theirs, "w3", stale_after_s=30, base=OTHER) == 1


def test_a_misrouted_message_runs_nothing(ctx: Context, tenant: Tenant) -> None:
    _, theirs = _two_bases(ctx, tenant)
    with ctx.sessions() as s:  # this base's job is gone already
        s.execute(
            update(FinetuneJob).where(FinetuneJob.base_model != OTHER).values(status="failed")
        )
        s.commit()
    assert run_finetune(theirs, ctx) == "skipped (held by another worker)"
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, theirs)
        assert job is not None and (job.status, job.attempts) == ("queued", 0)


def test_sweep_and_reconciler_keep_to_the_base(ctx: Context, tenant: Tenant) -> None:
    mine, theirs = _two_bases(ctx, tenant)
    base = ctx.settings.base_model
    sent: list[str] = []

    def enqueue(model: JobModel, job_id: str) -> None:
        sent.append(job_id)

    def backlog(model: JobModel) -> int:
        return 0

    assert reconcile_queued(
        ctx.sessions, older_than_s=0, backlog=backlog, enqueue=enqueue, base=base
    ) == [mine]
    _stale(ctx.sessions, mine, theirs)
    assert sweep_stale(ctx.sessions, stale_after_s=30, enqueue=enqueue, base=base) == [mine]
    assert sent == [mine, mine]
    with ctx.sessions() as s:
        assert s.get(FinetuneJob, theirs).status == "running"  # type: ignore[union-attr]
    # Its own base's worker requeues it.
    assert sweep_stale(ctx.sessions, stale_after_s=30, enqueue=enqueue, base=OTHER) == [theirs]


def test_minus_q_kinds_mean_the_workers_own_base_queues() -> None:
    # Here, not at the top: the module builds its app from the environment's settings.
    from worker.celery_app import _consume_own_base, create_celery, own_queues, settings

    app = create_celery(settings)
    app.amqp.queues.select(["finetune", "generate", "webhooks"])
    _consume_own_base(instance=SimpleNamespace(app=app))
    mine = own_queues()
    assert set(app.amqp.queues.consume_from) == {*mine.values(), "webhooks"}
    assert mine["finetune"] == f"finetune.{queue_safe(settings.base_model)}"
    # Another base's queue: this worker would swallow that base's messages; refused.
    app = create_celery(settings)
    app.amqp.queues.select(["finetune.sd21-8bit"])
    with pytest.raises(RuntimeError, match="must not consume"):
        _consume_own_base(instance=SimpleNamespace(app=app))
