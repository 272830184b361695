"""What every kind of job gets from its worker process (`Context`), and the lifecycle steps
all kinds share: claiming the fairest job, holding its lease, giving it back, ending it.

A job kind (worker/kinds.py) is a function `run(job_id, ctx) -> str` that claims through
`ctx.claim_next`, works under `ctx.lease(...)`, and ends with `end` (or `ctx.release` for a
retry); the database side of each step is in worker/jobs.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app import storage as st
from app.models import AdapterExport, FinetuneJob, GenerationJob, WebhookDelivery
from app.outbox import record_final
from app.settings import Settings
from worker.jobs import JobModel, Lease, claim_next, finish_owned, release_owned, write_owned
from worker.runtime import Runtime
from worker.staging import Staging

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "canceled")

# The storage backend's own type: tests that run on the local backend reach its paths.
S = TypeVar("S", bound=st.Storage)


@dataclass
class Context(Generic[S]):
    """What a task needs from its process: settings, database, storage (and `files`, the local
    copies of stored files the model code reads and writes: worker/staging.py), the model runtime,
    `notify`, a callable taking a job id that asks for its webhook's first attempt now (the
    delivery row itself is written with the job's final state; the sweep is the safety net),
    what sends a message for a job given back to the queue (`requeue`; without it the sweep's
    reconciler sends one later), and what a stalled job's watchdog does to its process
    (`on_stall`: restart it)."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: S
    runtime: Runtime
    notify: Callable[[str], None]
    requeue: Callable[[JobModel, str], None] | None = None
    on_stall: Callable[[JobModel, str], None] | None = None
    files: Staging = field(init=False)

    def __post_init__(self) -> None:
        self.files = Staging(self.storage, self.settings.resolved_staging_dir)

    def claim_next(
        self, session: Session, model: JobModel, owner: str, hint: str
    ) -> tuple[str, int] | None:
        """`jobs.claim_next` for this worker: its base only, its stale time."""
        claimed = claim_next(
            session,
            model,
            owner,
            stale_after_s=self.settings.stale_after_s,
            hint=hint,
            base=self.settings.base_model,
        )
        if claimed is not None and self.pending_webhook(claimed[0]):
            self.notify(claimed[0])  # its `running` webhook (app.outbox.record_webhook)
        return claimed

    def pending_webhook(self, job_id: str) -> bool:
        with self.sessions() as session:
            return (
                session.scalar(
                    select(WebhookDelivery.id)
                    .where(WebhookDelivery.job_id == job_id, WebhookDelivery.status == "pending")
                    .limit(1)
                )
                is not None
            )

    def lease(self, model: JobModel, job_id: str, owner: str) -> Lease:
        """The lease of a job this process claimed, with its heartbeat, stall timeout and
        watchdog (entering it starts the heartbeat)."""
        return Lease(
            self.sessions,
            model,
            job_id,
            owner,
            heartbeat_s=self.settings.heartbeat_s,
            progress_timeout_s=self.settings.progress_timeout_s,
            on_stall=self.on_stall,
            notify=self.notify,
            webhook_every_s=self.settings.webhook_progress_every_s,
        )

    def release(self, model: JobModel, job_id: str, owner: str, reason: str | None) -> None:
        """Give the job back for another attempt (one that does not count when `reason` is
        None: the worker is stopping) and send its message at once."""
        try:
            released = release_owned(
                self.sessions, model, job_id, owner, reason=reason, counts=reason is not None
            )
        except Exception:
            # The database is gone too: the lease runs out and the sweep requeues the job.
            log.exception("could not release %s", job_id)
            return
        if released and self.requeue is not None:
            try:
                self.requeue(model, job_id)
            except Exception:
                log.exception("could not send %s again; the reconciler will", job_id)


def end(ctx: Context, model: JobModel, job_id: str, owner: str, status: str, **values: Any) -> bool:
    """Move an owned running job to its final `status` with its webhook row in one
    transaction, then ask for the webhook; False when the job was not this owner's any more
    (canceled, deleted, taken over)."""
    with ctx.sessions() as session:
        done = finish_owned(session, model, job_id, owner, status, **values)
        delivery = record_final(session, model, job_id) if done else None
        session.commit()
    # Exports, most without a webhook, ask for a sender only when they have one to send.
    if done and (model is not AdapterExport or delivery is not None):
        ctx.notify(job_id)
    return done


@contextmanager
def while_owned(ctx: Context, lease: Lease) -> Iterator[Session | None]:
    """A transaction that holds the job's row lock while `lease` is still its owner's: yields
    the session when it is (what the block writes to storage then lands before anyone can
    cancel or delete the job, and whoever does so deletes it afterwards), None when the lease
    is lost (the block must write nothing). The block's own rows commit with the lease's
    renewal."""
    with ctx.sessions() as session:
        if not write_owned(session, lease.model, lease.job_id, lease.owner, commit=False):
            session.rollback()
            lease.lost.set()
            yield None
            return
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


def unclaimed(session: Session, model: JobModel, job_id: str) -> str:
    """What a task whose message named `job_id` did when it claimed nothing."""
    job = cast("FinetuneJob | GenerationJob | AdapterExport | None", session.get(model, job_id))
    if job is None:
        return "missing"  # e.g. the API removed a fine-tune after a failed publish
    if job.status in TERMINAL:
        return f"skipped ({job.status})"
    return "skipped (held by another worker)"
