"""The FastAPI application factory.

Run with `uvicorn --factory app.main:create_app`; there is no module-level `app` so that
importing this module never reads the environment or touches the disk.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app import errors, metrics
from app.db import engine_from_settings, make_sessionmaker
from app.limits import BodySizeLimit
from app.queue import CelerySender, TaskSender
from app.routes import adapters, bases, finetunes, generations, health, web
from app.routes import metrics as metrics_route
from app.settings import Settings, get_settings
from app.storage import LocalStorage, Storage

log = logging.getLogger(__name__)

# The one place where domain errors become HTTP statuses.
STATUS_OF: dict[type[errors.DomainError], int] = {
    errors.NotFound: 404,
    errors.InvalidInput: 422,
    errors.PayloadTooLarge: 413,
    errors.Conflict: 409,
    errors.Unauthorized: 401,
    errors.ServiceUnavailable: 503,
}


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.DomainError)
    status = STATUS_OF.get(type(exc), 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": exc.detail}, status_code=status, headers=headers)


async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    # Connection refused, server restarting, SQLite locked: the client can retry.
    log.error("database error: %s", exc)
    return JSONResponse(
        {"detail": "the database is not reachable right now; retry the request later"},
        status_code=503,
    )


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    # Keep the {"detail": ...} shape even for bugs; the traceback goes to the log only.
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse({"detail": "internal error; it has been logged"}, status_code=500)


def _operation_id(route: APIRoute) -> str:
    # The handler's name (create_finetune, get_adapter, ...): what generated clients call.
    return route.name


def create_app(
    settings: Settings | None = None,
    *,
    session_factory: sessionmaker[Session] | None = None,
    storage: Storage | None = None,
    sender: TaskSender | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="tuneqdm",
        version="0.1.0",
        description="Personalize Stable Diffusion with TuneQDM quantization-scale adapters.",
        generate_unique_id_function=_operation_id,
    )
    app.state.settings = settings
    app.state.sessionmaker = session_factory or make_sessionmaker(engine_from_settings(settings))
    app.state.storage = storage or LocalStorage(settings.resolved_storage_dir)
    app.state.sender = sender or CelerySender(
        settings.resolved_broker_url, timeout_s=settings.broker_timeout_s
    )
    app.add_exception_handler(errors.DomainError, _domain_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    metrics.install(app)
    for module in (health, metrics_route, finetunes, adapters, generations, bases):
        app.include_router(module.router)
    web.mount(app)
    return app
