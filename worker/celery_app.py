"""The Celery app of the GPU workers, built from app.settings.

Start one worker process per GPU (prefetch 1, tasks acknowledged only after they ran):

    celery -A worker.celery_app worker --pool=solo -Q finetune,generate,webhooks

A worker serves one base (TUNEQDM_BASE_MODEL, TUNEQDM_MODEL, TUNEQDM_BITS): `-Q finetune,generate`
names the kinds of work, and the worker consumes its base's queues of those kinds,
`finetune.<base>` and `generate.<base>` (app.queue.base_queue), never another base's.

Nothing here imports torch; the model loads lazily on the first task (worker/runtime.py).
Each worker also runs the sweep (below): stale leases, queued jobs without a message, orphan
files. SIGTERM (`docker stop`) makes a running fine-tune checkpoint and give its job back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import (
    celeryd_after_setup,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from sqlalchemy.orm import Session, sessionmaker

import worker.logs  # noqa: F401  (JSON log lines, docs/deployment.md "Logs")
from app.db import engine_from_settings, make_sessionmaker
from app.queue import (
    EXPORT_TASK,
    FINETUNE_QUEUE,
    FINETUNE_TASK,
    GENERATE_QUEUE,
    GENERATE_TASK,
    WEBHOOK_QUEUE,
    base_queue,
)
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

WEBHOOK_TASK = "tuneqdm.webhook"


def create_celery(settings: Settings) -> Celery:
    broker = settings.resolved_broker_url
    if broker.startswith("sqla+sqlite:///"):
        Path(broker.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # The transport's options go to create_engine, which crashes on an unknown option such as
        # polling_interval: set it on the class instead.
        from kombu.transport.sqlalchemy import Transport

        Transport.polling_interval = settings.broker_poll_s
    celery = Celery("tuneqdm-worker", broker=broker, include=["worker.tasks"])
    base = settings.base_model
    celery.conf.update(
        task_routes={
            FINETUNE_TASK: {"queue": base_queue(FINETUNE_QUEUE, base)},
            GENERATE_TASK: {"queue": base_queue(GENERATE_QUEUE, base)},
            EXPORT_TASK: {"queue": base_queue(GENERATE_QUEUE, base)},
            WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
        },
        task_default_queue=base_queue(FINETUNE_QUEUE, base),
        # One task at a time per process, acknowledged after it ran: a message whose worker
        # died goes back to the queue (where the broker supports it); the database lease
        # (worker/jobs.py) makes a second delivery harmless.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # Redis re-delivers an unacknowledged message after this long; the sweep below usually
        # requeues a dead worker's job much sooner.
        broker_transport_options={"visibility_timeout": 3600}
        if broker.startswith(("redis", "rediss"))
        else {},
        worker_hijack_root_logger=True,
    )
    return celery


settings = get_settings()
app = create_celery(settings)


@lru_cache(maxsize=1)
def sessions() -> sessionmaker[Session]:
    """The worker process's database sessions (tasks and the sweep share the engine)."""
    return make_sessionmaker(engine_from_settings(settings))


def own_queues() -> dict[str, str]:
    """This worker's queue of each kind: its base's (TUNEQDM_BASE_MODEL)."""
    kinds = (FINETUNE_QUEUE, GENERATE_QUEUE)
    return {kind: base_queue(kind, settings.base_model) for kind in kinds}


def job_route(model: Any) -> tuple[str, str]:
    """(task name, queue) of a job table's messages, for a job of this worker's base (the only
    jobs a worker requeues or re-sends)."""
    from worker.kinds import kind_of

    kind = kind_of(model)
    return kind.task, own_queues()[kind.queue]


@celeryd_after_setup.connect
def _consume_own_base(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """`-Q finetune,generate` → this base's `finetune.<base>,generate.<base>`. A queue of
    another base (`-Q finetune.other`) is refused: this worker would take that base's messages
    and find none of its jobs to claim."""
    queues = instance.app.amqp.queues
    own = own_queues()
    for kind, queue in own.items():
        if kind in queues.consume_from:
            queues.select_add(queue)
            queues.deselect(kind)
    foreign = [
        name
        for name in queues.consume_from
        if name.split(".", 1)[0] in own and name not in own.values()
    ]
    if foreign:
        raise RuntimeError(
            f"this worker serves base {settings.base_model!r} (TUNEQDM_BASE_MODEL), whose queues "
            f"are {sorted(own.values())}; it must not consume {sorted(foreign)}: start it with "
            "-Q finetune,generate"
        )
    log.info("serving base %s from queues %s", settings.base_model, sorted(queues.consume_from))


class _Sweeper:
    """At worker start, then on a timer: requeue jobs whose worker died (stale heartbeat), send
    messages for queued jobs that have none, and (less often) remove files no row owns."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="stale-job-sweep", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from app.queue import CelerySender
        from app.storage import storage_from_settings
        from worker.files import collect_orphans, still_needed
        from worker.jobs import reconcile_queued, sweep_stale
        from worker.staging import Staging

        # One store client for the sweep's lifetime (an S3 client holds a connection pool).
        storage = storage_from_settings(settings)
        staging = Staging(storage, settings.resolved_staging_dir)

        # Its own broker connection: the task thread's producer is not shared across threads.
        sender = CelerySender(settings.resolved_broker_url, timeout_s=settings.broker_timeout_s)

        def enqueue(model: Any, job_id: str) -> None:
            task, queue = job_route(model)
            sender.send(task, job_id, queue=queue)

        def backlog(model: Any) -> int:
            _, queue = job_route(model)
            with sender.celery.connection_for_write() as conn:
                return int(conn.default_channel.queue_declare(queue=queue).message_count)

        next_collect = time.monotonic()
        while True:
            try:
                # Only this worker's base: its queues are the ones `enqueue` and `backlog` use.
                sweep_stale(
                    sessions(),
                    stale_after_s=settings.stale_after_s,
                    enqueue=enqueue,
                    base=settings.base_model,
                )
                reconcile_queued(
                    sessions(),
                    older_than_s=settings.requeue_after_s,
                    backlog=backlog,
                    enqueue=enqueue,
                    base=settings.base_model,
                    queue_of=lambda model: job_route(model)[1],
                )
                # Local copies of ended or deleted jobs (a worker process that died before it
                # removed them) go at once; any other copy once it is old.
                staging.sweep(settings.collect_after_s, needed=still_needed(sessions()))
                if time.monotonic() >= next_collect:
                    next_collect = time.monotonic() + settings.collect_every_s
                    collect_orphans(sessions(), storage, older_than_s=settings.collect_after_s)
            except Exception:
                log.exception("job sweep failed; trying again later")
            if self.stop.wait(settings.sweep_every_s):
                return


_sweeper = _Sweeper()
_delivery_sweeper: Any = None
_registrar: Any = None


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    global _delivery_sweeper
    _sweeper.start()
    # Workers that consume the webhooks queue also send what the outbox holds (due retries,
    # deliveries whose sender died); the GPU-only workers never make outbound requests.
    if sender is not None and WEBHOOK_QUEUE in sender.app.amqp.queues.consume_from:
        from worker.webhooks import DeliverySweeper

        _delivery_sweeper = DeliverySweeper(settings, sessions)
        _delivery_sweeper.start()


@worker_ready.connect
def _register_base(sender: Any = None, **_: Any) -> None:
    """Tell the registry which base this worker serves (worker/bases.py)."""
    global _registrar
    from worker.bases import Registrar
    from worker.runtime import get_runtime

    if sender is not None and not set(own_queues().values()) & set(
        sender.app.amqp.queues.consume_from
    ):
        return  # a webhooks-only worker serves no base
    if settings.worker_ready_file is not None:
        # A container restarted in place keeps its files: not ready until loaded again.
        settings.worker_ready_file.unlink(missing_ok=True)
    _registrar = Registrar(settings, sessions())
    get_runtime(settings).on_load = _registrar.on_load
    threading.Thread(target=_registrar.run, name="base-registrar", daemon=True).start()


@worker_shutting_down.connect
def _stop_jobs(sender: Any = None, **_: Any) -> None:
    # Celery's warm shutdown waits for the running task; this makes a fine-tune checkpoint and
    # give its job back between two steps instead of running to the end.
    from worker.jobs import SHUTDOWN

    SHUTDOWN.set()


@worker_shutdown.connect
def _stop_sweeper(sender: Any = None, **_: Any) -> None:
    _sweeper.stop.set()
    if _delivery_sweeper is not None:
        _delivery_sweeper.stop.set()
    if _registrar is not None:
        _registrar.stop.set()
        if settings.worker_ready_file is not None:
            settings.worker_ready_file.unlink(missing_ok=True)


@worker_init.connect
def _reset_metrics(sender: Any = None, **_: Any) -> None:
    # Before a prefork pool's children start writing their values (worker/metrics.py).
    from worker import metrics

    metrics.reset_multiprocess_dir()


@worker_process_shutdown.connect
def _child_metrics_gone(pid: int | None = None, **_: Any) -> None:
    from worker import metrics

    if pid is not None:
        metrics.child_exited(pid)


@worker_ready.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    # In the main process: with --pool=solo the tasks run here too; a prefork pool's children
    # write to PROMETHEUS_MULTIPROC_DIR, which this process serves (worker/metrics.py).
    from worker import metrics

    if sender is None or set(own_queues().values()) & set(sender.app.amqp.queues.consume_from):
        metrics.declare(settings.base_model)  # not in a webhooks-only worker: it runs no jobs
    metrics.serve(settings.worker_metrics_port)


def restart_stalled(model: Any, job_id: str) -> None:
    """A job's watchdog fired (worker/jobs.py Lease): send its message again and end this
    process at once; its thread may be stuck where nothing else can stop it."""
    task, queue = job_route(model)
    try:
        app.send_task(task, args=[job_id], queue=queue)
    except Exception:
        log.exception("could not send %s again; the reconciler will", job_id)
    from worker.jobs import STALLED_EXIT

    log.critical("job %s stalled; restarting this worker process", job_id)
    logging.shutdown()
    os._exit(STALLED_EXIT)
