"""FastAPI dependencies and their `Annotated` aliases.

Everything the handlers need hangs off `app.state` (set by `create_app`), so tests build an app
from their own Settings and swap the task sender with `dependency_overrides[get_sender]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.errors import Unauthorized
from app.image_pool import ImagePool
from app.models import Tenant
from app.queue import TaskSender
from app.services.keys import authenticate
from app.services.quotas import count_request
from app.settings import Settings
from app.storage import Storage


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_sender(request: Request) -> TaskSender:
    sender: TaskSender = request.app.state.sender
    return sender


def get_image_pool(request: Request) -> ImagePool:
    pool: ImagePool = request.app.state.image_pool
    return pool


SettingsDep = Annotated[Settings, Depends(get_settings)]
ImagePoolDep = Annotated[ImagePool, Depends(get_image_pool)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SenderDep = Annotated[TaskSender, Depends(get_sender)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `tuneqdm-admin keys create`.")


def get_current_tenant(
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
    try:
        tenant = authenticate(session=session, key=credentials.credentials)
        count_request(session=session, tenant=tenant, settings=settings)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    # Committed: the connection is back in the pool before the handler reads or decodes
    # anything (a slow upload must not hold one while other tenants wait for it).
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
