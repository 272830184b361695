"""One lifecycle for every job kind (worker/kinds.py, worker/context.py, worker/jobs.py): the
package has no import cycle, every job table has a kind, and an export is claimed, swept,
re-sent, counted and capped like a fine-tune or a generation. Real processes (a lost message,
the database cut while a worker takes it): tests/service/test_lifecycle.py."""

from __future__ import annotations

import ast
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import update

from app.models import AdapterExport, Tenant, utcnow
from tests.worker.conftest import Notified
from tests.worker.test_exports import _adapter_row, _ask, _row
from worker.context import Context
from worker.exports import run_export
from worker.jobs import JOB_MODELS, claim, reconcile_queued, sweep_stale
from worker.kinds import KINDS

WORKER = Path(__file__).resolve().parents[2] / "worker"


def _imports(path: Path) -> set[str]:
    """The worker modules `path` imports, at its top or inside a function (a cycle through a
    lazy import is a cycle too); not those only under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "worker":
                found.update(f"worker.{alias.name}" for alias in node.names)
            elif node.module.startswith("worker."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("worker."))
    return found


def test_the_worker_package_has_no_import_cycle() -> None:
    graph = {f"worker.{p.stem}": _imports(p) for p in WORKER.glob("*.py")}
    assert "worker.finetunes" in graph and "worker.kinds" in graph
    # Depth-first search for a back edge; the first cycle found is the message.
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_every_job_table_is_a_kind_with_a_task_and_a_queue() -> None:
    assert [kind.model for kind in KINDS] == list(JOB_MODELS)
    assert len({kind.task for kind in KINDS}) == len(KINDS)
    from worker.tasks import TASKS  # each kind's Celery task, with the database retry

    assert set(TASKS) == {kind.task for kind in KINDS}
    assert all(task.max_retries is None for task in TASKS.values())


def _age(ctx: Context, export_id: str, **values: object) -> None:
    with ctx.sessions() as s:
        s.execute(update(AdapterExport).where(AdapterExport.id == export_id).values(**values))
        s.commit()


def test_a_queued_export_whose_message_was_lost_is_sent_again(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    export_id = _ask(ctx, tenant, _adapter_row(ctx, tenant, tmp_path), format="merged")
    sent: list[str] = []

    def reconcile(backlog: int) -> list[str]:
        return reconcile_queued(
            ctx.sessions,
            older_than_s=30,
            backlog=lambda model: backlog,
            enqueue=lambda model, job_id: sent.append(job_id),
            base=ctx.settings.base_model,
            # Exports travel on the generations' queue (worker/kinds.py).
            queue_of=lambda model: "generate" if model is AdapterExport else model.__tablename__,
        )

    assert reconcile(0) == []  # just queued: its message is on its way
    _age(ctx, export_id, updated_at=utcnow() - timedelta(minutes=5))
    assert reconcile(1) == []  # the queue holds one message: it is this one
    assert reconcile(0) == [export_id] and sent == [export_id]


def test_a_dead_workers_export_is_given_back_and_its_attempts_are_capped(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    export_id = _ask(ctx, tenant, _adapter_row(ctx, tenant, tmp_path), format="merged")
    requeued: list[str] = []
    for attempt in range(1, ctx.settings.max_attempts + 1):
        with ctx.sessions() as s:
            assert claim(s, AdapterExport, export_id, f"w{attempt}", stale_after_s=30) == attempt
        _age(ctx, export_id, heartbeat_at=utcnow() - timedelta(minutes=5))  # its worker died
        swept = sweep_stale(
            ctx.sessions,
            stale_after_s=30,
            enqueue=lambda model, job_id: requeued.append(job_id),
            base=ctx.settings.base_model,
        )
        assert swept == [export_id]
        row = _row(ctx, export_id)
        assert (row.status, row.lease_owner, row.attempts) == ("queued", None, attempt)
    assert requeued == [export_id] * ctx.settings.max_attempts
    assert run_export(export_id, ctx) == "skipped (failed)"
    row = _row(ctx, export_id)
    assert row.status == "failed" and row.error is not None
    assert "the worker stopped 3 times" in row.error and row.storage_key is None
    assert ctx.notify == Notified()  # exports have no webhook


def test_a_canceled_export_is_not_made_and_a_running_one_stores_nothing(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    from app.services.exports import cancel_export

    torch.manual_seed(0)
    adapter_id = _adapter_row(ctx, tenant, tmp_path)
    queued = _ask(ctx, tenant, adapter_id, format="merged")
    with ctx.sessions() as s:
        cancel_export(session=s, tenant=s.merge(tenant), adapter_id=adapter_id, export_id=queued)
    assert run_export(queued, ctx) == "skipped (canceled)"

    running = _ask(ctx, tenant, adapter_id, format="lora", rank=4)
    original = ctx.runtime.adapter

    def cancel_meanwhile(*args: Any) -> Any:
        # Canceled while its worker loads the adapter: the worker makes the file but does
        # not store it.
        with ctx.sessions() as s:
            cancel_export(
                session=s, tenant=s.merge(tenant), adapter_id=adapter_id, export_id=running
            )
        return original(*args)

    ctx.runtime.adapter = cancel_meanwhile  # type: ignore[method-assign,assignment]
    try:
        assert run_export(running, ctx) == "stopped (canceled, deleted or taken over)"
    finally:
        ctx.runtime.adapter = original  # type: ignore[method-assign]
    row = _row(ctx, running)
    assert (row.status, row.storage_key, row.attempts) == ("canceled", None, 1)
    exports = ctx.storage.root / "tenants" / tenant.id / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []


def test_the_staging_sweep_removes_a_deleted_or_ended_jobs_copies_whatever_their_age(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    from app.services.finetunes import cancel_finetune
    from tests.worker.conftest import submit_finetune
    from worker.files import still_needed
    from worker.staging import Staging

    live = submit_finetune(ctx, tenant, '{"steps": 2}')
    ended = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        cancel_finetune(session=s, tenant=s.merge(tenant), finetune_id=ended)
    # Staging of a store other than the local folder (the local backend has no copies).
    staging = Staging(_NotLocal(), tmp_path / "staging")  # type: ignore[arg-type]
    base = f"tenants/{tenant.id}"
    copies = {
        job: staging.output(f"{base}/finetunes/{job}/inputs/000.png")
        for job in (live, ended, "ft_deleted")
    }
    for path in copies.values():
        path.write_bytes(b"photo")
    empty_checkpoint = staging.output(f"{base}/finetunes/{live}/checkpoint/x").parent
    cached = staging.output(f"{base}/adapters/ad_1_a1.safetensors")
    cached.write_bytes(b"adapter")

    removed = staging.sweep(3600, needed=still_needed(ctx.sessions))
    assert sorted(removed) == sorted([copies[ended], copies["ft_deleted"]])
    assert copies[live].is_file() and cached.is_file()
    assert empty_checkpoint.is_dir()  # a running job's folder, empty until its first save
    assert not copies["ft_deleted"].parent.exists()


class _NotLocal:
    """Only what Staging reads of a store that is not the local folder (none is called)."""
