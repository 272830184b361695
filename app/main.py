"""The FastAPI application factory.

Run with `uvicorn --factory app.main:create_app`; there is no module-level `app` so that
importing this module never reads the environment or touches the disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app import errors, metrics, openapi, problems
from app.db import engine_from_settings, make_sessionmaker
from app.image_pool import ImagePool
from app.limits import BodySizeLimit
from app.logs import configure_logging, request_id
from app.middleware import KeyConcurrency, RequestContext
from app.queue import CelerySender, TaskSender
from app.routes import adapters, bases, exports, finetunes, generations, health, web
from app.routes import metrics as metrics_route
from app.schemas import FinetuneParams
from app.services import retention
from app.settings import Settings, get_settings
from app.storage import Storage, storage_from_settings

log = logging.getLogger(__name__)

# The one place where domain errors become HTTP statuses.
STATUS_OF: dict[type[errors.DomainError], int] = {
    errors.NotFound: 404,
    errors.InvalidInput: 422,
    errors.PayloadTooLarge: 413,
    errors.Conflict: 409,
    errors.Unauthorized: 401,
    errors.ServiceUnavailable: 503,
    errors.TooManyRequests: 429,
}
# Seconds a client should wait after a 503 (database or broker unreachable, pool exhausted).
RETRY_AFTER_UNAVAILABLE_S = 5


async def _domain_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.DomainError)
    status = STATUS_OF.get(type(exc), 400)
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, errors.TooManyRequests):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)}
    found = [problems.FieldError(field=exc.field, message=exc.detail)] if exc.field else None
    return problems.response(status, exc.detail, errors=found, headers=headers)


async def _invalid_request(_request: Request, exc: Exception) -> Response:
    # FastAPI's own handler echoes each value in `input`: a photo's bytes, a key. Only the
    # field and the rule are returned (app.problems).
    assert isinstance(exc, RequestValidationError)
    found = problems.validation_errors(exc.errors())
    return problems.response(422, problems.summary(found) or "invalid request", errors=found)


async def _http_error(_request: Request, exc: Exception) -> Response:
    # Starlette's 404 (no such route), 405 (method), and 413 raised while reading the body.
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.detail, list):  # field errors in FastAPI's shape (app/forms.py)
        found = problems.validation_errors(exc.detail)
        return problems.response(exc.status_code, problems.summary(found), errors=found)
    detail = exc.detail if isinstance(exc.detail, str) else problems.title_of(exc.status_code)
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no such endpoint; the OpenAPI document at /openapi.json lists them"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        detail = "this endpoint does not answer this method; see the Allow header"
    return problems.response(exc.status_code, detail, headers=exc.headers)


async def _database_unavailable(_request: Request, exc: Exception) -> Response:
    # Connection refused, server restarting, SQLite locked: the client can retry. Only the
    # error's class is logged: its text can quote the statement's parameters.
    log.error("database error: %s", type(getattr(exc, "orig", exc)).__name__)
    return problems.response(
        503,
        "the database is not reachable right now; retry the request later",
        headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
    )


async def _pool_exhausted(_request: Request, _exc: Exception) -> Response:
    # Every connection of this process is busy for longer than TUNEQDM_DB_POOL_TIMEOUT_S: the
    # service is overloaded, not broken, so the client is told to come back.
    log.warning("database pool exhausted; answering 503")
    return problems.response(
        503,
        "the service is busy; retry the request in a few seconds",
        headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
    )


async def _unexpected(_request: Request, exc: Exception) -> Response:
    # The problem shape even for bugs; the traceback goes to the log only.
    log.exception("unhandled error", exc_info=exc)
    rid = request_id.get()
    headers = {"X-Request-ID": rid} if rid != "-" else None
    return problems.response(500, "internal error; it has been logged", headers=headers)


async def _retention_sweeps(app: FastAPI) -> None:
    """Run the retention sweep every TUNEQDM_RETENTION_SWEEP_EVERY_S (first after one period).

    It runs in every API process, so it works the same in the embedded mode and in compose;
    concurrent sweeps of several replicas delete the same things idempotently.
    """
    settings: Settings = app.state.settings
    while True:
        await asyncio.sleep(settings.retention_sweep_every_s)
        try:
            await asyncio.to_thread(
                retention.sweep,
                sessions=app.state.sessionmaker,
                storage=app.state.storage,
                settings=settings,
            )
        except Exception:
            log.exception("retention sweep failed; trying again next period")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    sweeper = None
    if settings.retention_sweep_every_s > 0:
        sweeper = asyncio.create_task(_retention_sweeps(app))
    try:
        yield
    finally:
        if sweeper is not None:
            sweeper.cancel()
        app.state.image_pool.shutdown()


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
    configure_logging(json_lines=settings.log_json, level=settings.log_level)
    app = FastAPI(
        title="tuneqdm",
        version="0.1.0",
        description="Personalize Stable Diffusion with TuneQDM quantization-scale adapters.",
        lifespan=_lifespan,
        generate_unique_id_function=_operation_id,
    )
    app.state.settings = settings
    app.state.sessionmaker = session_factory or make_sessionmaker(engine_from_settings(settings))
    app.state.storage = storage or storage_from_settings(settings)
    app.state.sender = sender or CelerySender(
        settings.resolved_broker_url, timeout_s=settings.broker_timeout_s
    )
    app.state.image_pool = ImagePool(
        workers=settings.image_workers, per_tenant=settings.image_workers_per_tenant
    )
    app.add_exception_handler(errors.DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(PoolTimeout, _pool_exhausted)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    metrics.install(app)
    app.add_middleware(KeyConcurrency, per_key=settings.requests_per_key)
    # Added last, so it is outermost: even a 413 from BodySizeLimit carries the request id.
    app.add_middleware(RequestContext)
    for module in (health, metrics_route, finetunes, adapters, exports, generations, bases):
        app.include_router(module.router)
    web.mount(app)
    openapi.install(app, [FinetuneParams])
    return app
