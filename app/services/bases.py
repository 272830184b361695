"""The base a request will run on, and the registry listing (GET /v1/bases)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app.bases import BaseInfo, SizeRange, describe_folder, info_of, size_range
from app.errors import NotFound, ServiceUnavailable
from app.models import ServedBase
from app.settings import Settings


def current_base(*, session: Session, settings: Settings) -> BaseInfo:
    """The description of the base this deployment serves (TUNEQDM_BASE_MODEL).

    The registry row a worker wrote wins (it describes the model the worker really loaded).
    Before any worker registered (the API may start first: `make run` starts both at once,
    compose starts the API without waiting for a GPU worker) the model folder's config JSON
    gives the same facts without torch; a hub id that only workers download cannot be read
    here, and then the request is refused with 503 rather than sized by a guessed default.
    """
    row = session.get(ServedBase, settings.base_model)
    if row is not None:
        return info_of(row)
    info = describe_folder(settings.resolved_model, name=settings.base_model, bits=settings.bits)
    if info is None:
        raise ServiceUnavailable(
            f"no worker has registered base model {settings.base_model!r} yet, so its native "
            "size is unknown; start a worker (or wait until it has started) and retry"
        )
    return info


def sizes_of(native: int, settings: Settings) -> SizeRange:
    return size_range(native, settings)


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
