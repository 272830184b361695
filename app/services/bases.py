"""The base a request will run on, and the registry listing (GET /v1/bases)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from app.bases import BaseInfo, describe_folder, info_of
from app.db import database_now
from app.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable
from app.models import AdapterExport, BaseWorker, FinetuneJob, GenerationJob, ServedBase
from app.settings import Settings


def known_bases(*, session: Session, settings: Settings) -> list[str]:
    """The bases requests may name: every base a worker has registered, plus the deployment's
    default (TUNEQDM_BASE_MODEL), which is accepted before its first worker starts."""
    names = set(session.scalars(select(ServedBase.name)))
    return sorted(names | {settings.base_model})


def resolve_base(*, session: Session, settings: Settings, name: str | None = None) -> BaseInfo:
    """The description of base `name` (None: the default base, TUNEQDM_BASE_MODEL).

    The registry row a worker wrote wins (it describes the model the worker really loaded).
    Before any worker registered the default base (the API may start first: `make run` starts
    both at once, compose starts the API without waiting for a GPU worker) the model folder's
    config JSON gives the same facts without torch; a hub id that only workers download cannot
    be read here, and then the request is refused with 503 rather than sized by a guessed
    default. Any other base is known only from its row: 422 naming the known ones otherwise.
    """
    name = name or settings.base_model
    row = session.get(ServedBase, name)
    if row is not None:
        return info_of(row)
    if name != settings.base_model:
        known = ", ".join(repr(b) for b in known_bases(session=session, settings=settings))
        raise InvalidInput(
            f"base {name!r} is not served here; send one of {known} (GET /v1/bases), or omit "
            "base for the default"
        )
    info = describe_folder(settings.resolved_model, name=settings.base_model, bits=settings.bits)
    if info is None:
        raise ServiceUnavailable(
            f"no worker has registered base model {settings.base_model!r} yet, so its native "
            "size is unknown; start a worker (or wait until it has started) and retry"
        )
    return info


def list_bases(*, session: Session) -> list[ServedBase]:
    stmt = select(ServedBase).options(selectinload(ServedBase.workers)).order_by(ServedBase.name)
    return list(session.scalars(stmt))


def get_base(*, session: Session, name: str) -> ServedBase:
    row = session.scalar(
        select(ServedBase).options(selectinload(ServedBase.workers)).where(ServedBase.name == name)
    )
    if row is None:
        raise NotFound(f"no base named {name!r}; list them with GET /v1/bases")
    return row


def queued_jobs(*, session: Session) -> dict[str, dict[str, int]]:
    """Queued jobs per base and kind ("finetune", "generation"), from the registry: what the
    base's workers have still to do (the broker's queues hold tokens, not jobs)."""
    counts: dict[str, dict[str, int]] = {}
    for kind, model in (("finetune", FinetuneJob), ("generation", GenerationJob)):
        stmt = (
            select(model.base_model, func.count())
            .where(model.status == "queued")
            .group_by(model.base_model)
        )
        for base, n in session.execute(stmt):
            counts.setdefault(base, {"finetune": 0, "generation": 0})[kind] = int(n)
    return counts


def waiting_reasons(
    *, session: Session, settings: Settings, bases: Iterable[str]
) -> dict[str, str]:
    """Why queued jobs of each of `bases` wait, from the facts GET /v1/bases shows: no worker
    of the base is up; its workers are busy (as many jobs of the base run as workers are up);
    or one is free and takes the job at its next claim. A few grouped counts, only for the
    bases asked about (none: no query)."""
    names = set(bases)
    if not names:
        return {}
    up_stmt = (
        select(BaseWorker.base_name, func.count())
        .where(
            BaseWorker.base_name.in_(names),
            BaseWorker.last_seen_at >= up_since(session, settings),
        )
        .group_by(BaseWorker.base_name)
    )
    up = {name: int(n) for name, n in session.execute(up_stmt)}
    running: dict[str, int] = {}
    # Exports run on the generation workers of their base, so they keep a worker busy too.
    for model in (FinetuneJob, GenerationJob, AdapterExport):
        stmt = (
            select(model.base_model, func.count())
            .where(model.status == "running", model.base_model.in_(names))
            .group_by(model.base_model)
        )
        for name, n in session.execute(stmt):
            running[name] = running.get(name, 0) + int(n)
    reasons = {}
    for name in names:
        workers, busy = up.get(name, 0), running.get(name, 0)
        if workers == 0:
            reasons[name] = (
                f"no worker of base {name!r} is up (GET /v1/bases); the job starts when one is"
            )
        elif busy >= workers:
            who = "its worker is" if workers == 1 else f"its {workers} workers are"
            reasons[name] = f"{who} busy with other jobs of base {name!r}"
        else:
            reasons[name] = f"a worker of base {name!r} is free and takes the job at its next claim"
    return reasons


def waiting_of(
    *, session: Session, settings: Settings, jobs: Iterable[FinetuneJob | GenerationJob]
) -> dict[str, str]:
    """`waiting_reasons` for the bases of the queued ones among `jobs`."""
    bases = {job.base_model for job in jobs if job.status == "queued"}
    return waiting_reasons(session=session, settings=settings, bases=bases)


def up_since(session: Session, settings: Settings) -> datetime:
    """Workers seen after this are up: a live one refreshes every TUNEQDM_BASE_SEEN_EVERY_S,
    so three missed refreshes mean it is gone (or cannot reach the database). By the database's
    clock, which also stamped last_seen_at (app.bases.register): no host's skew counts."""
    return database_now(session, -3 * settings.base_seen_every_s)


def retire_base(*, session: Session, settings: Settings, name: str) -> ServedBase:
    """Take base `name` off the registry, so requests naming it get 422 and generations with
    its adapters 409 (the adapters stay; their files can still be downloaded and exported).
    Refused for the default base (accepted even without a row), while any of its workers is up
    (it would register the base again) and while it has queued or running jobs."""
    row = get_base(session=session, name=name)
    if name == settings.base_model:
        raise Conflict(f"{name!r} is the default base (TUNEQDM_BASE_MODEL); change that first")
    up = [w.worker for w in row.workers if w.last_seen_at >= up_since(session, settings)]
    if up:
        raise Conflict(f"workers still serve {name!r} ({', '.join(up)}); stop them first")
    for kind, model in (("fine-tunes", FinetuneJob), ("generations", GenerationJob)):
        active = session.scalar(
            select(func.count()).where(
                model.base_model == name, model.status.in_(("queued", "running"))
            )
        )
        if active:
            raise Conflict(
                f"{active} {kind} of {name!r} are queued or running; cancel them or let them "
                "finish first"
            )
    session.delete(row)
    session.flush()
    return row
