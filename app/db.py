"""Engine and session helpers, shared by the API, the CLI, the migrations and the worker."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    create_engine,
    event,
    func,
    literal,
    select,
    type_coerce,
)
from sqlalchemy.orm import Session, sessionmaker

from app.models import UTCDateTime
from app.settings import Settings


def make_engine(
    url: str, *, pool_size: int = 5, max_overflow: int = 10, pool_timeout_s: float = 30.0
) -> Engine:
    # hide_parameters: a failed statement's bound values (prompts, webhook URLs, key hashes)
    # must not reach the logs through the exception text.
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True}
    if ":memory:" not in url:
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout_s)
    if url.startswith("sqlite"):
        # The API serves requests from a thread pool; SQLite objects are usable across threads
        # as long as one connection is not shared concurrently, which the pool guarantees.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite ignores foreign keys (and ON DELETE CASCADE) unless asked, per connection.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: handlers serialise rows after commit without reloading them.
    return sessionmaker(engine, expire_on_commit=False)


def engine_from_settings(settings: Settings) -> Engine:
    url = settings.resolved_database_url
    if url.startswith("sqlite:///") and ":memory:" not in url:
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return make_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout_s=settings.db_pool_timeout_s,
    )


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (CLI and worker use)."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def sql_now(session: Session, offset_s: float = 0.0) -> ColumnElement[datetime]:
    """The database's current time plus `offset_s` seconds, as an SQL expression.

    Times that several processes compare (leases, due times, liveness) are written and compared
    with the database's clock, never a host's: a process whose clock is minutes off would
    otherwise take over a live lease, or hold back what is due, by its skew. PostgreSQL's
    `now()` is the start of the transaction. SQLite runs inside each process, so its `now` is
    that host's clock; every process of a SQLite deployment is on one host, with one clock.
    """
    expr: ColumnElement[Any]
    if session.get_bind().dialect.name == "sqlite":
        # In the format SQLAlchemy stores datetimes in on SQLite (microseconds), so the strings
        # compare in time order with the stored ones.
        modifier = f"{offset_s:+.6f} seconds"
        expr = func.strftime("%Y-%m-%d %H:%M:%f", "now", modifier).concat("000")
    elif offset_s:
        expr = func.now() + literal(timedelta(seconds=offset_s))
    else:
        expr = func.now()
    return type_coerce(expr, UTCDateTime())


def database_now(session: Session, offset_s: float = 0.0) -> datetime:
    """`sql_now` read into Python: the database's clock as an aware UTC datetime."""
    now = session.scalar(select(sql_now(session, offset_s)))
    assert now is not None
    return now
