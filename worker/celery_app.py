"""The Celery app of the GPU workers, built from app.settings.

Start one worker process per GPU (prefetch 1, tasks acknowledged only after they ran):

    celery -A worker.celery_app worker --pool=solo -Q finetune,generate,webhooks

Nothing here imports torch; the model loads lazily on the first task (worker/runtime.py).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

import worker.logs  # noqa: F401  (JSON log lines, docs/deployment.md "Logs")
from app.queue import (
    FINETUNE_QUEUE,
    FINETUNE_TASK,
    GENERATE_QUEUE,
    GENERATE_TASK,
    WEBHOOK_QUEUE,
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
    celery = Celery("tuneqdm-worker", broker=broker, include=["worker.tasks", "worker.bases"])
    celery.conf.update(
        task_routes={
            FINETUNE_TASK: {"queue": FINETUNE_QUEUE},
            GENERATE_TASK: {"queue": GENERATE_QUEUE},
            WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
        },
        task_default_queue=FINETUNE_QUEUE,
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


class _Sweeper:
    """Requeues jobs whose worker died (stale heartbeat): at worker start, then on a timer."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="stale-job-sweep", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from app.queue import CelerySender
        from worker.jobs import sweep_stale
        from worker.tasks import sessions

        # Its own broker connection: the task thread's producer is not shared across threads.
        sender = CelerySender(settings.resolved_broker_url, timeout_s=settings.broker_timeout_s)

        def enqueue(model: Any, job_id: str) -> None:
            if model.__tablename__ == "finetune_jobs":
                sender.send(FINETUNE_TASK, job_id, queue=FINETUNE_QUEUE)
            else:
                sender.send(GENERATE_TASK, job_id, queue=GENERATE_QUEUE)

        while True:
            try:
                sweep_stale(sessions(), stale_after_s=settings.stale_after_s, enqueue=enqueue)
            except Exception:
                log.exception("stale-job sweep failed; trying again later")
            if self.stop.wait(settings.sweep_every_s):
                return


_sweeper = _Sweeper()
_delivery_sweeper: Any = None


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    global _delivery_sweeper
    _sweeper.start()
    # Workers that consume the webhooks queue also send what the outbox holds (due retries,
    # deliveries whose sender died); the GPU-only workers never make outbound requests.
    if sender is not None and WEBHOOK_QUEUE in sender.app.amqp.queues.consume_from:
        from worker.tasks import sessions
        from worker.webhooks import DeliverySweeper

        _delivery_sweeper = DeliverySweeper(settings, sessions)
        _delivery_sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(sender: Any = None, **_: Any) -> None:
    _sweeper.stop.set()
    if _delivery_sweeper is not None:
        _delivery_sweeper.stop.set()


@worker_ready.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    # In the main process: with --pool=solo the tasks run here too (worker/metrics.py).
    from worker import metrics

    metrics.serve(settings.worker_metrics_port)
