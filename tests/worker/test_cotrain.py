"""Co-training in-process (worker/cotrain.py): which queued jobs a group claims, in what order,
and a stopping worker's group giving every member back at its own step. The real worker
process, cancel, SIGKILL and adapter equality: tests/service/test_cotrain.py."""

from __future__ import annotations

import threading
import time

import torch

from app.models import FinetuneJob, Tenant
from app.services import keys
from tests.worker.conftest import submit_finetune
from worker.context import Context
from worker.cotrain import claim_compatible
from worker.files import checkpoint_key
from worker.finetunes import run_finetune
from worker.jobs import SHUTDOWN, claim, new_owner

TINY = '{{"steps": {steps}, "resolution": 32, "seed": {seed}, "checkpoint_every": 1000}}'


def _tenant(ctx: Context, name: str) -> Tenant:
    with ctx.sessions() as session:
        tenant = keys.get_or_create_tenant(session=session, name=name)
        session.commit()
        return tenant


def _row(ctx: Context, job_id: str) -> FinetuneJob:
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None
        return job


def test_places_go_round_robin_across_tenants_in_fair_order(ctx: Context) -> None:
    a, b, c = (_tenant(ctx, n) for n in ("acme", "globex", "initech"))
    a_jobs = [submit_finetune(ctx, a, TINY.format(steps=2, seed=i)) for i in range(4)]
    b_job = submit_finetune(ctx, b, TINY.format(steps=2, seed=5))
    c_jobs = [submit_finetune(ctx, c, TINY.format(steps=2, seed=i)) for i in (6, 7)]
    odd = submit_finetune(ctx, c, '{"steps": 2, "resolution": 48}')  # another group
    retry = submit_finetune(ctx, b, TINY.format(steps=2, seed=8))
    with ctx.sessions() as s:  # a second attempt: it trains alone, never joins
        s.get(FinetuneJob, retry).attempts = 1  # type: ignore[union-attr]
        s.commit()

    def claim_some(room: int, taken: list[str], exclude: list[str]) -> list[str]:
        with ctx.sessions() as s:
            return [
                job_id
                for job_id, _, _ in claim_compatible(
                    s,
                    base=ctx.settings.base_model,
                    room=room,
                    taken=taken,
                    exclude=exclude,
                    fits=lambda params: params["resolution"] == 32,
                    stale_after_s=60,
                )
            ]

    # The group holds one of acme's: globex and initech get a place before acme's second one,
    # and initech's second ties with it, initech being the fairer (nothing running).
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, a_jobs[0], new_owner(), stale_after_s=60) == 1
    assert claim_some(3, [a.id], [a_jobs[0]]) == [b_job, c_jobs[0], c_jobs[1]]
    # Later, with room for two: only acme's are left that fit (not the 48 px one, not the
    # second attempt).
    assert claim_some(2, [a.id, b.id, c.id, c.id], []) == a_jobs[1:3]
    assert [_row(ctx, i).status for i in (a_jobs[3], odd, retry)] == ["queued"] * 3
    assert claim_some(4, [], []) == [a_jobs[3]]


def test_a_stopping_worker_gives_every_member_back_at_its_own_step(
    ctx: Context, tenant: Tenant
) -> None:
    other = _tenant(ctx, "globex")
    ids = [
        submit_finetune(ctx, tenant, TINY.format(steps=400, seed=1)),
        submit_finetune(ctx, other, TINY.format(steps=400, seed=2)),
    ]
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_finetune(ids[0], ctx)))
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = [_row(ctx, i) for i in ids]
            if all(r.group_size == 2 and r.progress_step >= 2 for r in rows):
                break
            time.sleep(0.05)
        SHUTDOWN.set()  # what SIGTERM does (worker/celery_app.py)
        thread.join(timeout=120)
    finally:
        SHUTDOWN.clear()
    assert outcome == ["2 released (co-trained, group of 2)"]
    for job_id in ids:
        row = _row(ctx, job_id)
        # Given back without counting an attempt, its step saved, out of its group.
        assert (row.status, row.lease_owner, row.attempts) == ("queued", None, 0)
        assert row.group_size is None
        folder = ctx.storage.path(checkpoint_key(row.tenant_id, job_id))
        saved = int(torch.load(folder / "checkpoint.pt", weights_only=True)["step"])
        assert 2 <= saved < 400 and row.progress_step <= saved


def test_a_member_that_leaves_its_group_no_longer_shows_a_group_size(
    ctx: Context, tenant: Tenant
) -> None:
    from app.services.finetunes import cancel_finetune

    others = [_tenant(ctx, "globex"), _tenant(ctx, "initech")]
    ids = [
        submit_finetune(ctx, t, TINY.format(steps=400, seed=seed))
        for seed, t in enumerate([tenant, *others], start=1)
    ]
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_finetune(ids[0], ctx)))
    thread.start()

    def wait(what: str, check: object) -> None:
        deadline = time.monotonic() + 120
        while not check():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    def cancel(job_id: str) -> None:
        with ctx.sessions() as session:
            job = session.get(FinetuneJob, job_id)
            assert job is not None
            owner = session.get(Tenant, job.tenant_id)
            assert owner is not None
            cancel_finetune(session=session, tenant=owner, finetune_id=job_id)

    try:
        wait("a group of 3", lambda: all(_row(ctx, i).group_size == 3 for i in ids))
        cancel(ids[2])
        # The canceled member's row says it trains with nobody; the others' say 2.
        assert _row(ctx, ids[2]).group_size is None
        wait("a group of 2", lambda: all(_row(ctx, i).group_size == 2 for i in ids[:2]))
        cancel(ids[1])
        assert _row(ctx, ids[1]).group_size is None
        wait("training alone", lambda: _row(ctx, ids[0]).group_size is None)
        cancel(ids[0])
        thread.join(timeout=120)
    finally:
        for job_id in ids:
            if _row(ctx, job_id).status in ("queued", "running"):
                cancel(job_id)
        thread.join(timeout=120)
    assert outcome == ["3 stopped (co-trained, group of 3)"]
    assert [(r.status, r.group_size) for r in map(lambda i: _row(ctx, i), ids)] == [
        ("canceled", None)
    ] * 3
