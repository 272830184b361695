"""Leases: one holder at a time, takeover after a stale heartbeat, the sweep requeues once."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.models import FinetuneJob, Tenant, utcnow
from tests.worker.conftest import submit_finetune
from worker.finetunes import Context
from worker.jobs import JobModel, Lease, claim, sweep_stale, write_owned


def _age_heartbeat(sessions: sessionmaker[Session], job_id: str, seconds: float) -> None:
    with sessions() as session:
        session.execute(
            update(FinetuneJob)
            .where(FinetuneJob.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )
        session.commit()


def test_claim_is_exclusive_until_the_heartbeat_is_stale(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "a", stale_after_s=30)
        assert not claim(s, FinetuneJob, job_id, "b", stale_after_s=30)
        assert write_owned(s, FinetuneJob, job_id, "a", progress_step=1)
    _age_heartbeat(ctx.sessions, job_id, 60)
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "b", stale_after_s=30)
        # The old holder learns at its next write that it lost the job.
        assert not write_owned(s, FinetuneJob, job_id, "a", progress_step=2)
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.lease_owner == "b" and job.progress_step == 1


def test_lease_heartbeat_and_loss(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "a", stale_after_s=30)
    with Lease(ctx.sessions, FinetuneJob, job_id, "a", heartbeat_s=0.05) as lease:
        assert lease.write(progress_step=1)
        with ctx.sessions() as s:  # the API's cancel
            s.execute(update(FinetuneJob).values(status="canceled"))
            s.commit()
        lease.lost.wait(5)
        assert lease.should_stop()


def test_sweep_requeues_a_dead_workers_job_once(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "dead", stale_after_s=30)
    sent: list[str] = []

    def enqueue(model: JobModel, object_id: str) -> None:
        sent.append(object_id)

    assert sweep_stale(ctx.sessions, stale_after_s=30, enqueue=enqueue) == []
    _age_heartbeat(ctx.sessions, job_id, 60)
    assert sweep_stale(ctx.sessions, stale_after_s=30, enqueue=enqueue) == [job_id]
    assert sweep_stale(ctx.sessions, stale_after_s=30, enqueue=enqueue) == []
    assert sent == [job_id]
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.status == "queued" and job.lease_owner is None
