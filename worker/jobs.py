"""Job leases: the database decides who runs a job, so a job never runs twice at once.

A worker claims a job with one conditional UPDATE (status queued, or running with a heartbeat
older than TUNEQDM_STALE_AFTER_S) that writes its lease owner and a heartbeat. While it works a
thread renews the heartbeat; every write it makes afterwards is conditional on still owning the
lease, so a worker whose lease was taken over (or whose job was canceled) learns it at its next
write and stops. A worker killed with SIGKILL stops heartbeating: `sweep_stale` (run by every
worker at start and on a timer) puts such jobs back to `queued` and re-enqueues them, and the
next worker resumes from the job's last checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.models import FinetuneJob, GenerationJob, utcnow

log = logging.getLogger(__name__)

JobModel = type[FinetuneJob] | type[GenerationJob]


def new_owner() -> str:
    """One lease owner per claim: host, process and a random part (a restarted process on the
    same host is a different owner)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _claimable(model: JobModel, now: datetime, stale_after_s: float) -> Any:
    stale = now - timedelta(seconds=stale_after_s)
    return or_(
        model.status == "queued",
        and_(
            model.status == "running",
            or_(model.heartbeat_at.is_(None), model.heartbeat_at < stale),
        ),
    )


def claim(
    session: Session, model: JobModel, job_id: str, owner: str, *, stale_after_s: float
) -> bool:
    """Take the job if nobody alive holds it; True when this call won."""
    now = utcnow()
    result = session.execute(
        update(model)
        .where(model.id == job_id, _claimable(model, now, stale_after_s))
        .values(status="running", lease_owner=owner, heartbeat_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    won = bool(result.rowcount)  # type: ignore[attr-defined]
    if won:
        # started_at keeps the first start, so the ETA covers the whole job.
        session.execute(
            update(model)
            .where(model.id == job_id, model.started_at.is_(None))
            .values(started_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
    return won


def write_owned(session: Session, model: JobModel, job_id: str, owner: str, **values: Any) -> bool:
    """Update a running job only while `owner` still holds its lease; False if it lost it."""
    now = utcnow()
    result = session.execute(
        update(model)
        .where(model.id == job_id, model.lease_owner == owner, model.status == "running")
        .values(heartbeat_at=now, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def finish_owned(
    session: Session, model: JobModel, job_id: str, owner: str, status: str, **values: Any
) -> bool:
    """Move an owned running job to a terminal status (in the caller's transaction)."""
    now = utcnow()
    result = session.execute(
        update(model)
        .where(model.id == job_id, model.lease_owner == owner, model.status == "running")
        .values(status=status, finished_at=now, updated_at=now, lease_owner=None, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


class Lease:
    """A claimed job's heartbeat thread plus its throttled progress writes.

    `lost` is set as soon as a write finds the lease gone (canceled, or taken over after this
    worker looked dead); training polls it between steps through `should_stop`.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        model: JobModel,
        job_id: str,
        owner: str,
        *,
        heartbeat_s: float,
    ) -> None:
        self.factory = factory
        self.model = model
        self.job_id = job_id
        self.owner = owner
        self.heartbeat_s = heartbeat_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_s + 5)

    def write(self, **values: Any) -> bool:
        with self._lock, self.factory() as session:
            try:
                ok = write_owned(session, self.model, self.job_id, self.owner, **values)
            except Exception:
                # A database hiccup is not a lost lease; the next heartbeat tries again.
                log.exception("heartbeat of %s failed", self.job_id)
                return not self.lost.is_set()
        if not ok:
            self.lost.set()
        return ok

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.write():
                return

    def should_stop(self) -> bool:
        return self.lost.is_set()


class ProgressWriter:
    """Writes training progress at most every `every_s` seconds (always the first and last)."""

    def __init__(self, lease: Lease, every_s: float, clock: Callable[[], float]) -> None:
        self.lease = lease
        self.every_s = every_s
        self.clock = clock
        self.last = float("-inf")

    def __call__(self, step: int, total: int, loss: float, **extra: Any) -> None:
        now = self.clock()
        if step < total and now - self.last < self.every_s and not extra:
            return
        self.last = now
        self.lease.write(progress_step=step, loss=loss, **extra)


def sweep_stale(
    factory: sessionmaker[Session],
    *,
    stale_after_s: float,
    enqueue: Callable[[JobModel, str], None],
) -> list[str]:
    """Put running jobs with a stale heartbeat back to `queued` and enqueue them again.

    Several workers may sweep at once: the conditional UPDATE lets exactly one of them requeue
    a given job. Returns the ids it requeued.
    """
    requeued = []
    now = utcnow()
    stale = now - timedelta(seconds=stale_after_s)
    for model in (FinetuneJob, GenerationJob):
        with factory() as session:
            ids = session.scalars(
                select(model.id).where(
                    model.status == "running",
                    or_(model.heartbeat_at.is_(None), model.heartbeat_at < stale),
                )
            ).all()
            for job_id in ids:
                result = session.execute(
                    update(model)
                    .where(
                        model.id == job_id,
                        model.status == "running",
                        or_(model.heartbeat_at.is_(None), model.heartbeat_at < stale),
                    )
                    .values(status="queued", lease_owner=None, updated_at=now)
                    .execution_options(synchronize_session=False)
                )
                session.commit()
                if not result.rowcount:  # type: ignore[attr-defined]
                    continue
                try:
                    enqueue(model, job_id)
                except Exception:
                    # Back to running-and-stale, so the next sweep tries again.
                    log.exception("re-enqueue of %s failed", job_id)
                    session.execute(
                        update(model)
                        .where(model.id == job_id, model.status == "queued")
                        .values(status="running")
                        .execution_options(synchronize_session=False)
                    )
                    session.commit()
                    continue
                log.warning("job %s had a stale heartbeat; requeued", job_id)
                requeued.append(job_id)
    return requeued
