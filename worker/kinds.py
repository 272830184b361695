"""The kinds of work a worker runs, each a small module that plugs into one lifecycle.

A kind is a job table (with the lease columns of worker/jobs.py), the Celery task name and the
queue (per base, app.queue) its messages travel on, and `run(job_id, ctx) -> str`, which claims
the fairest queued job of the kind (`ctx.claim_next`), works under `ctx.lease`, and ends it
(`worker.context.end`, or `ctx.release` for another attempt). Everything else is shared and
comes with the table: the Celery task with its database retry (worker/tasks.py), the stale
sweep, the reconciler of lost messages, attempts, cancel and deletion (docs/workers.md, "Adding
a job kind").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.models import AdapterExport, FinetuneJob, GenerationJob
from app.queue import EXPORT_TASK, FINETUNE_QUEUE, FINETUNE_TASK, GENERATE_QUEUE, GENERATE_TASK
from worker.context import Context
from worker.exports import run_export
from worker.finetunes import run_finetune
from worker.generations import run_generation
from worker.jobs import JobModel


@dataclass(frozen=True)
class JobKind:
    name: str  # in logs: "fine-tune 123: succeeded"
    model: JobModel
    task: str
    queue: str  # the kind of queue (app.queue.base_queue gives this base's one)
    run: Callable[[str, Context], str]


KINDS: tuple[JobKind, ...] = (
    JobKind("fine-tune", FinetuneJob, FINETUNE_TASK, FINETUNE_QUEUE, run_finetune),
    JobKind("generation", GenerationJob, GENERATE_TASK, GENERATE_QUEUE, run_generation),
    # Made where generations run: a worker that holds the adapter's quantized base.
    JobKind("export", AdapterExport, EXPORT_TASK, GENERATE_QUEUE, run_export),
)


def kind_of(model: JobModel) -> JobKind:
    for kind in KINDS:
        if kind.model is model:
            return kind
    raise KeyError(f"no job kind runs {model.__tablename__}")
