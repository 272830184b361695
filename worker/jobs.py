"""Job leases: the database decides who runs a job, so a job never runs twice at once.

A worker claims a job with one conditional UPDATE (status queued, or running with a heartbeat
older than TUNEQDM_STALE_AFTER_S) that writes its lease owner, a heartbeat and one more attempt.
Every time here is the database's clock (SQL `now()`), never the host's: a worker whose clock is
off cannot make a live job look dead, nor a dead one look alive.

While it works a thread renews the heartbeat, but only while the job makes progress (`touch`):
a job with no progress for TUNEQDM_PROGRESS_TIMEOUT_S is given up (released for a retry) and its
worker process restarts. Every write a worker makes afterwards is conditional on still owning
the lease, so a worker whose lease was taken over (or whose job was canceled) learns it at its
next write and stops.

Messages are tokens: a task claims the fairest claimable job of its kind (`claim_next`), not
necessarily the one its message names, so one tenant's hundred queued jobs do not delay another
tenant's first. The number of messages stays equal to the number of queued jobs, and
`reconcile_queued` re-sends messages where the broker holds fewer than that (a publish lost
between the commit and the send, a broker restarted without its data).

A worker holds one base and has its own queues (app.queue.base_queue); everything here that picks
jobs takes that `base` (`of_base`), so a worker never claims, requeues or re-sends another
base's job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, true, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from app.db import sql_now
from app.events import record_event
from app.models import AdapterExport, FinetuneJob, GenerationJob, Phase
from app.outbox import record_webhook
from worker import metrics

log = logging.getLogger(__name__)

# The tables of jobs: each has the lease columns (status, lease_owner, heartbeat_at, attempts,
# started_at, error, base_model); the kinds of work that run them are in worker/kinds.py.
JobModel = type[FinetuneJob] | type[GenerationJob] | type[AdapterExport]
JOB_MODELS: tuple[JobModel, ...] = (FinetuneJob, GenerationJob, AdapterExport)


def _leaves_group(model: JobModel) -> dict[str, Any]:
    """What a job that leaves its group (canceled, failed, released, swept) clears: a fine-tune
    is no longer in a co-training group."""
    return {"group_size": None} if model is FinetuneJob else {}


def _no_phase(model: JobModel) -> dict[str, Any]:
    """What a job that stops running (ended, released, swept) clears: the phase its worker
    wrote (a queued job waits for a worker, a final one does nothing; docs/api.md "Phases")."""
    return {} if model is AdapterExport else {"phase": None}


# Set when the worker process is asked to stop (SIGTERM): running jobs checkpoint, give their
# lease back and stop between two steps, so the next worker resumes them at once.
SHUTDOWN = threading.Event()
# Exit status of a worker process whose job stalled: its supervisor (docker's restart policy,
# the embedded launcher) starts it again.
STALLED_EXIT = 70


def worker_name() -> str:
    """This worker process: host and process id, so two workers on one machine (one per GPU)
    are two names. Also its row in base_workers (worker/bases.py)."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}"


def new_owner() -> str:
    """One lease owner per claim: the worker's name and a random part (a restarted process on
    the same host is a different owner). A finished job keeps its last owner, so its row names
    the worker that ran it."""
    return f"{worker_name()}:{uuid.uuid4().hex[:12]}"


def of_base(model: JobModel, base: str | None) -> ColumnElement[bool]:
    """Only `base`'s jobs (None: any base, for tools and tests). A worker holds one base and
    passes it everywhere it picks jobs: claims, the stale sweep, the reconciler."""
    return true() if base is None else model.base_model == base


def _claimable(session: Session, model: JobModel, stale_after_s: float) -> Any:
    return or_(
        model.status == "queued",
        and_(
            model.status == "running",
            or_(
                model.heartbeat_at.is_(None),
                model.heartbeat_at < sql_now(session, -stale_after_s),
            ),
        ),
    )


def claim(
    session: Session,
    model: JobModel,
    job_id: str,
    owner: str,
    *,
    stale_after_s: float,
    base: str | None = None,
) -> int | None:
    """Take the job if nobody alive holds it; its attempt number when this call won. The job's
    `error` still says how the previous attempt ended (`attempts_exhausted` reads it); the
    first heartbeat of the new attempt clears it (`Lease`)."""
    now = sql_now(session)
    row = session.execute(
        update(model)
        .where(model.id == job_id, of_base(model, base), _claimable(session, model, stale_after_s))
        .values(
            status="running",
            lease_owner=owner,
            heartbeat_at=now,
            updated_at=now,
            attempts=model.attempts + 1,
            # started_at keeps the first start, so the ETA covers the whole job.
            started_at=func.coalesce(model.started_at, now),
        )
        .returning(model.attempts, model.base_model, model.created_at, model.started_at)
        .execution_options(synchronize_session=False)
    ).first()
    attempt = None if row is None else int(row.attempts)
    if attempt is not None and model is FinetuneJob:
        record_event(session, job_id, "running", attempt=attempt)
    if attempt is not None:
        record_webhook(session, model, job_id, "running", attempt=attempt)
    session.commit()
    if row is not None:
        kind = metrics.kind_of(model.__tablename__)
        metrics.job_started(kind, row.base_model, int(row.attempts), row.created_at, row.started_at)
    return attempt


def fairest_queued(
    session: Session,
    model: JobModel,
    *,
    limit: int,
    base: str | None = None,
    where: Sequence[ColumnElement[bool]] = (),
) -> list[str]:
    """Queued jobs in fair order: the tenant with the fewest running jobs first, then the tenant
    that started a job least recently (never: first), then the oldest job. `where` narrows the
    jobs considered (not the tenants' running counts)."""
    other = aliased(model)
    running = (
        select(func.count())
        .where(other.tenant_id == model.tenant_id, other.status == "running")
        .scalar_subquery()
    )
    last_start = (
        select(func.max(other.started_at)).where(other.tenant_id == model.tenant_id)
    ).scalar_subquery()
    return list(
        session.scalars(
            select(model.id)
            .where(model.status == "queued", of_base(model, base), *where)
            .order_by(running, last_start.asc().nulls_first(), model.created_at, model.id)
            .limit(limit)
        ).all()
    )


def claim_next(
    session: Session,
    model: JobModel,
    owner: str,
    *,
    stale_after_s: float,
    hint: str,
    base: str | None = None,
) -> tuple[str, int] | None:
    """Claim the fairest queued job (or, with none queued, the message's own job `hint` when
    its worker died); (job id, attempt), or None when there is nothing to run."""
    for _ in range(5):  # other workers may win a candidate first; look again
        candidates = fairest_queued(session, model, limit=4, base=base)
        session.commit()
        if not candidates:
            break
        for job_id in candidates:
            attempt = claim(session, model, job_id, owner, stale_after_s=stale_after_s, base=base)
            if attempt is not None:
                return job_id, attempt
    attempt = claim(session, model, hint, owner, stale_after_s=stale_after_s, base=base)
    return (hint, attempt) if attempt is not None else None


def write_owned(
    session: Session,
    model: JobModel,
    job_id: str,
    owner: str,
    *,
    event: tuple[str, dict[str, Any]] | None = None,
    commit: bool = True,
    **values: Any,
) -> bool:
    """Update a running job only while `owner` still holds its lease; False if it lost it.
    `event` (type, data) is added to a fine-tune's event log in the same transaction;
    `commit=False` leaves the transaction (and the job's row lock) to the caller."""
    now = sql_now(session)
    result = session.execute(
        update(model)
        .where(model.id == job_id, model.lease_owner == owner, model.status == "running")
        .values(heartbeat_at=now, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    owned = bool(result.rowcount)  # type: ignore[attr-defined]
    if owned and event is not None and model is FinetuneJob:
        record_event(session, job_id, event[0], **event[1])
    if commit:
        session.commit()
    return owned


def finish_owned(
    session: Session, model: JobModel, job_id: str, owner: str, status: str, **values: Any
) -> bool:
    """Move an owned running job to a terminal status (in the caller's transaction). The lease
    owner stays on the row: it names the worker that ran the job's last attempt."""
    now = sql_now(session)
    base = session.execute(
        update(model)
        .where(model.id == job_id, model.lease_owner == owner, model.status == "running")
        .values(
            status=status,
            finished_at=now,
            updated_at=now,
            # A fine-tune that succeeded in a group keeps its size: the group it trained in.
            **{
                **({} if status == "succeeded" else _leaves_group(model)),
                **_no_phase(model),
                **values,
            },
        )
        .returning(model.base_model)
        .execution_options(synchronize_session=False)
    ).scalar()
    if base is None:
        return False
    metrics.job_finished(metrics.kind_of(model.__tablename__), base, status, values.get("error"))
    return True


def release_owned(
    factory: sessionmaker[Session],
    model: JobModel,
    job_id: str,
    owner: str,
    *,
    reason: str | None,
    counts: bool = True,
) -> bool:
    """Give an owned running job back to `queued` for another attempt. `reason` is shown to the
    user meanwhile (and in the final message if the attempts run out); an attempt that ended
    through no fault of the job (the worker was stopped) does not count (`counts=False`)."""
    values: dict[str, Any] = {
        "attempts": model.attempts - (0 if counts else 1),
        **_leaves_group(model),
        **_no_phase(model),
    }
    if reason is not None:
        values["error"] = reason
    with factory() as session:
        now = sql_now(session)
        result = session.execute(
            update(model)
            .where(model.id == job_id, model.lease_owner == owner, model.status == "running")
            .values(status="queued", lease_owner=None, heartbeat_at=None, updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )
        released = bool(result.rowcount)  # type: ignore[attr-defined]
        if released and model is FinetuneJob:
            record_event(session, job_id, "released", reason=reason or "worker stopped")
        session.commit()
    if released:
        log.warning("job %s released for another attempt: %s", job_id, reason or "worker stopped")
    return released


def attempts_exhausted(attempt: int, max_attempts: int, reason: str | None) -> str | None:
    """The failure message when claim number `attempt` is past the cap, else None."""
    if attempt <= max_attempts:
        return None
    ended = attempt - 1
    if reason:
        return f"gave up after {ended} attempts; the last one ended with: {reason}"
    return (
        f"the worker stopped {ended} times while running this job (it may have run out of "
        "memory or crashed); submit it again with smaller settings, or contact the operator"
    )


class Lease:
    """A claimed job's heartbeat thread plus its throttled progress writes.

    The heartbeat is renewed only while the job makes progress (`touch`); with none for
    `progress_timeout_s` the thread gives the job up (`stalled`) and calls `on_stall`, which in
    a worker process restarts the process (the job's thread may be stuck where nothing can
    interrupt it). `lost` is set as soon as a write finds the lease gone (canceled, or taken
    over after this worker looked dead); training polls `should_stop` between steps.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        model: JobModel,
        job_id: str,
        owner: str,
        *,
        heartbeat_s: float,
        progress_timeout_s: float = float("inf"),
        on_stall: Callable[[JobModel, str], None] | None = None,
        notify: Callable[[str], None] | None = None,
        webhook_every_s: float = 0.0,
    ) -> None:
        self.factory = factory
        # A progress write may add a `progress` webhook (at most one per webhook_every_s);
        # `notify` asks for its delivery at once.
        self.notify = notify
        self.webhook_every_s = webhook_every_s
        self.model = model
        self.job_id = job_id
        self.owner = owner
        self.heartbeat_s = heartbeat_s
        self.progress_timeout_s = progress_timeout_s
        self.on_stall = on_stall
        self.lost = threading.Event()
        self.stalled = threading.Event()
        self.last_progress = time.monotonic()
        self.phase: Phase | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        # A new attempt runs: how the previous one ended is no longer the job's news.
        self.write(error=None)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_s + 5)

    def touch(self) -> None:
        """The job made progress: keep renewing the lease."""
        self.last_progress = time.monotonic()

    def enter_phase(self, phase: Phase) -> bool:
        """Say what the job does now (app.models.Phase, docs/api.md "Phases"): written when it
        changes (a fine-tune's event log gets a `phase` event with it), like every write only
        while the lease holds; False once the lease is lost."""
        if phase == self.phase:
            return not self.lost.is_set()
        self.phase = phase
        return self.write(event=("phase", {"phase": phase}), phase=phase)

    def write(self, event: tuple[str, dict[str, Any]] | None = None, **values: Any) -> bool:
        delivery = None
        with self._lock, self.factory() as session:
            try:
                ok = write_owned(
                    session,
                    self.model,
                    self.job_id,
                    self.owner,
                    event=event,
                    commit=False,
                    **values,
                )
                if (
                    ok
                    and self.model is FinetuneJob
                    and event is not None
                    and event[0] == "progress"
                ):
                    # Under the row lock of the UPDATE above: in order with the job's others.
                    delivery = record_webhook(
                        session,
                        FinetuneJob,
                        self.job_id,
                        "progress",
                        every_s=self.webhook_every_s,
                    )
                session.commit()
            except Exception:
                # A database hiccup is not a lost lease; the next heartbeat tries again.
                session.rollback()
                log.exception("heartbeat of %s failed", self.job_id)
                return not self.lost.is_set()
        if not ok:
            self.lost.set()
        if delivery is not None and self.notify is not None:
            self.notify(self.job_id)
        return ok

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if time.monotonic() - self.last_progress > self.progress_timeout_s:
                self._give_up()
                return
            if not self.write():
                return

    def _give_up(self) -> None:
        reason = (
            f"the job made no progress for {self.progress_timeout_s:.0f} s; its worker restarted"
        )
        self.stalled.set()
        self.lost.set()
        metrics.watchdog_gave_up(metrics.kind_of(self.model.__tablename__))
        try:
            release_owned(self.factory, self.model, self.job_id, self.owner, reason=reason)
        except Exception:
            # The lease then runs out on its own and the sweep requeues the job.
            log.exception("could not release stalled job %s", self.job_id)
        log.error("job %s stalled: %s", self.job_id, reason)
        if self.on_stall is not None:
            self.on_stall(self.model, self.job_id)

    def should_stop(self) -> bool:
        # A stopping worker (SHUTDOWN) does not stop here, inside a step: the fine-tune pauses
        # after its step with a checkpoint (should_pause), a generation finishes.
        return self.lost.is_set()


class ProgressWriter:
    """Writes training progress at most every `every_s` seconds (always the first and last);
    every call counts as progress for the lease."""

    def __init__(self, lease: Lease, every_s: float, clock: Callable[[], float]) -> None:
        self.lease = lease
        self.every_s = every_s
        self.clock = clock
        self.last = float("-inf")

    def __call__(self, step: int, total: int, loss: float, **extra: Any) -> None:
        self.lease.touch()
        now = self.clock()
        if step < total and now - self.last < self.every_s and not extra:
            return
        self.last = now
        # The event log gets one progress entry per write, not one per step.
        event = ("progress", {"step": step, "total": total, "loss": loss})
        self.lease.write(event=event, progress_step=step, loss=loss, **extra)


def sweep_stale(
    factory: sessionmaker[Session],
    *,
    stale_after_s: float,
    enqueue: Callable[[JobModel, str], None],
    base: str | None = None,
) -> list[str]:
    """Put running jobs (of `base`) with a stale heartbeat back to `queued` and enqueue them
    again.

    Several workers may sweep at once: the conditional UPDATE lets exactly one of them requeue
    a given job. A failed enqueue is left to `reconcile_queued`. Returns the requeued ids.
    """
    requeued = []
    for model in JOB_MODELS:
        with factory() as session:
            stale = or_(
                model.heartbeat_at.is_(None), model.heartbeat_at < sql_now(session, -stale_after_s)
            )
            ids = session.scalars(
                select(model.id).where(model.status == "running", of_base(model, base), stale)
            ).all()
            for job_id in ids:
                result = session.execute(
                    update(model)
                    .where(model.id == job_id, model.status == "running", stale)
                    .values(
                        status="queued",
                        lease_owner=None,
                        updated_at=sql_now(session),
                        **_leaves_group(model),
                        **_no_phase(model),
                    )
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount and model is FinetuneJob:  # type: ignore[attr-defined]
                    reason = "its worker stopped answering (stale heartbeat)"
                    record_event(session, job_id, "released", reason=reason)
                session.commit()
                if not result.rowcount:  # type: ignore[attr-defined]
                    continue
                log.warning("job %s had a stale heartbeat; requeued", job_id)
                requeued.append(job_id)
                try:
                    enqueue(model, job_id)
                except Exception:
                    log.exception("re-enqueue of %s failed; the reconciler sends it later", job_id)
    return requeued


def reconcile_queued(
    factory: sessionmaker[Session],
    *,
    older_than_s: float,
    backlog: Callable[[JobModel], int],
    enqueue: Callable[[JobModel, str], None],
    base: str | None = None,
    queue_of: Callable[[JobModel], str] | None = None,
    models: Sequence[JobModel] = JOB_MODELS,
) -> list[str]:
    """Send a message for queued jobs (of `base`, whose queue `backlog` counts) that may have
    none: when the broker's queue holds fewer messages (`backlog`) than there are jobs queued
    for longer than `older_than_s`, the difference is sent, naming the oldest of them. Kinds
    that share a queue (`queue_of`: exports travel with generations) are counted together,
    and each of them gets up to that difference: a message cannot say which kind lost one,
    and a message too many is harmless (its task finds nothing to claim). Returns the ids
    messages were sent for."""
    queue_of = queue_of or (lambda model: model.__tablename__)
    owed: dict[JobModel, Sequence[str]] = {}
    for model in models:
        with factory() as session:
            owed[model] = session.scalars(
                select(model.id)
                .where(
                    model.status == "queued",
                    of_base(model, base),
                    model.updated_at < sql_now(session, -older_than_s),
                )
                .order_by(model.created_at)
            ).all()
    sent = []
    for queue in dict.fromkeys(queue_of(model) for model in models):
        sharing = [model for model in models if queue_of(model) == queue]
        total = sum(len(owed[model]) for model in sharing)
        if not total:
            continue
        missing = total - backlog(sharing[0])
        if missing <= 0:
            continue
        for model in sharing:
            for job_id in owed[model][:missing]:
                enqueue(model, job_id)
                sent.append(job_id)
        log.warning("%d queued job(s) in %s had no message; sent again", missing, queue)
    return sent
