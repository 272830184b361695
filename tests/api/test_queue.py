"""The enqueue after commit, through a real Redis broker, read back with kombu.

These tests use the real Celery sender (no override) against Redis at 127.0.0.1:6379, database
15 (TEST_REDIS_QUEUE_DB), and purge the two queues before and after.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from kombu import Connection
from sqlalchemy.orm import Session, sessionmaker

from app.main import create_app
from app.queue import FINETUNE_QUEUE, GENERATE_QUEUE, base_queue
from app.storage import LocalStorage
from tests.api.conftest import make_settings
from tests.api.factories import image_bytes, make_tenant, snapshot

# The default base's queues (the API's settings name no other base).
FINETUNE = base_queue(FINETUNE_QUEUE, "tuneqdm/fashion-sd")
GENERATE = base_queue(GENERATE_QUEUE, "tuneqdm/fashion-sd")
REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('TEST_REDIS_QUEUE_DB', '15')}"
DEAD_BROKER = "redis://127.0.0.1:1/0"


def _purge() -> None:
    """Drop the two queues and the routing tables kombu keeps for them in Redis."""
    import redis as redis_client

    r = redis_client.Redis.from_url(REDIS_URL)
    names = [FINETUNE, GENERATE]
    r.delete(
        *names,
        *(f"_kombu.binding.{n}" for n in names),
        *(f"_kombu.binding_permanent.{n}" for n in names),
    )
    r.close()


@pytest.fixture
def redis() -> Iterator[str]:
    try:
        with Connection(REDIS_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.skip(f"Redis at {REDIS_URL} not reachable: {exc}")
    _purge()
    yield REDIS_URL
    _purge()


def _client(
    broker_url: str, database_url: str, workdir: Path, factory: sessionmaker[Session]
) -> TestClient:
    settings = make_settings(database_url, workdir, broker_url=broker_url, broker_timeout_s=1.0)
    app = create_app(
        settings, session_factory=factory, storage=LocalStorage(settings.resolved_storage_dir)
    )
    return TestClient(app)


def _read_one(queue: str) -> tuple[str, list[object]]:
    with Connection(REDIS_URL) as conn:
        q = conn.SimpleQueue(queue)
        message = q.get(timeout=5)
        message.ack()
        q.close()
    # Celery message protocol 2: the task name is a header, the body is [args, kwargs, embed].
    return message.headers["task"], message.payload[0]


def test_finetune_and_generation_messages_reach_redis(
    redis: str,
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    session: Session,
) -> None:
    t = make_tenant(session)
    with _client(redis, database_url, workdir, session_factory) as client:
        r = client.post(
            "/v1/finetunes",
            headers=t.headers,
            files=[("images", ("a.png", image_bytes(), "image/png"))],
            data={"instance_prompt": "a photo of sks dog"},
        )
        assert r.status_code == 202, r.text
        # The queue-depth metric counts the waiting message (an empty Redis queue has no key).
        metrics = client.get("/metrics").text
        assert f'tuneqdm_queue_messages{{queue="{FINETUNE}"}} 1.0' in metrics
        assert f'tuneqdm_queue_messages{{queue="{GENERATE}"}} 0.0' in metrics
        assert _read_one(FINETUNE) == ("tuneqdm.finetune", [r.json()["id"]])
        assert f'tuneqdm_queue_messages{{queue="{FINETUNE}"}} 0.0' in client.get("/metrics").text

        r = client.post("/v1/generations", headers=t.headers, json={"prompt": "a dog"})
        assert r.status_code == 202, r.text
        assert _read_one(GENERATE) == ("tuneqdm.generate", [r.json()["id"]])

        assert client.get("/readyz").json()["checks"]["broker"] == "ok"


def test_dead_broker_gives_503_and_stores_nothing(
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    session: Session,
) -> None:
    t = make_tenant(session)
    storage = LocalStorage(workdir / "files")
    before = snapshot(session, storage)
    with _client(DEAD_BROKER, database_url, workdir, session_factory) as client:
        start = time.monotonic()
        r = client.post(
            "/v1/finetunes",
            headers=t.headers,
            files=[("images", ("a.png", image_bytes(), "image/png"))],
            data={"instance_prompt": "a photo of sks dog"},
        )
        assert r.status_code == 503, r.text
        assert "nothing was stored" in r.json()["detail"]
        assert time.monotonic() - start < 15
        assert snapshot(session, storage) == before

        assert "tuneqdm_broker_up 0.0" in client.get("/metrics").text
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "ok"
        assert ready.json()["checks"]["broker"].startswith("unreachable")


# kombu's SQLAlchemy transport uses a loader option that SQLAlchemy 2.1 deprecates.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_embedded_sqlite_broker_round_trip(workdir: Path) -> None:
    """The development default (kombu's SQLAlchemy transport on SQLite) needs no server."""
    from app.queue import FINETUNE_TASK, CelerySender
    from app.settings import Settings

    url = Settings(data_dir=workdir).resolved_broker_url
    assert url == f"sqla+sqlite:///{workdir.resolve()}/broker.sqlite"
    sender = CelerySender(url)
    sender.ping()
    sender.send(FINETUNE_TASK, "ft_123", queue=FINETUNE_QUEUE)
    assert sender.queue_sizes([FINETUNE_QUEUE, GENERATE_QUEUE]) == {
        FINETUNE_QUEUE: 1,
        GENERATE_QUEUE: 0,
    }
    with Connection(url) as conn:
        q = conn.SimpleQueue(FINETUNE_QUEUE)
        message = q.get(timeout=5)
        message.ack()
        q.close()
    assert (message.headers["task"], message.payload[0]) == (FINETUNE_TASK, ["ft_123"])
    assert sender.queue_sizes([FINETUNE_QUEUE]) == {FINETUNE_QUEUE: 0}
