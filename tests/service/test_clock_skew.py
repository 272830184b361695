"""Hosts whose clocks are 5 minutes off (libfaketime) against one PostgreSQL database: webhook
senders and a worker's liveness use the database's clock (app.db.sql_now), not their own.

With each host's clock, a sender 5 minutes slow held back due webhooks by 5 minutes and wrote
leases that had already ended, so a sender 5 minutes fast took a delivery whose attempt was
still in flight: the same webhook POSTed twice at once, the first outcome dropped. And a live
worker 5 minutes slow wrote last_seen_at 5 minutes in the past: `GET /v1/bases` said `up: false`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db import database_now, make_engine, make_sessionmaker
from app.ids import new_id
from app.models import WebhookDelivery
from app.services import keys
from tests.service.procs import (
    Proc,
    answers_ready,
    create_key,
    free_port,
    service_env,
    start_api,
    wait_for,
)

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

# The receiver holds each POST this long, so an attempt is surely in flight when the other
# sender sweeps (every 0.3 s), far below the attempt's deadline.
HOLD_S = 10.0


def faketime(offset: str) -> dict[str, str]:
    """libfaketime preloaded into the process itself. The monotonic clock stays real: faked,
    every threading.Event.wait(timeout) hangs under libfaketime 0.9.10, and the processes here
    (the webhook sweep, the worker's registration timer) wait that way. They never call
    time.sleep, which fails with EINVAL in that mode."""
    libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))
    if not libs:
        pytest.skip("libfaketime (Debian package faketime) is not installed")
    return {"LD_PRELOAD": str(libs[0]), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


class Receiver:
    """A webhook receiver that notes every POST: its webhook-id, and how many of that id were
    in flight at once."""

    def __init__(self) -> None:
        self.hold_s = 0.0
        self.lock = threading.Lock()
        self.posts: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.most_at_once: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                msg = self.headers["webhook-id"]
                self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.posts[msg] = receiver.posts.get(msg, 0) + 1
                    receiver.in_flight[msg] = receiver.in_flight.get(msg, 0) + 1
                    most = max(receiver.most_at_once.get(msg, 0), receiver.in_flight[msg])
                    receiver.most_at_once[msg] = most
                time.sleep(receiver.hold_s)
                with receiver.lock:
                    receiver.in_flight[msg] -= 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def busy(self) -> int:
        with self.lock:
            return sum(self.in_flight.values())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


# A webhook sender: the worker's sweep (worker.webhooks.sweep_deliveries), every
# TUNEQDM_SWEEP_EVERY_S, counting its sweeps in its log.
SENDER = """
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from app.db import engine_from_settings, make_sessionmaker
from app.settings import Settings
from worker.webhooks import sweep_deliveries

settings = Settings()
sessions = make_sessionmaker(engine_from_settings(settings))
pool = ThreadPoolExecutor(settings.webhook_senders)
print(f"sender ready, clock {time.time():.0f}", flush=True)
pause = threading.Event()
while True:
    sweep_deliveries(settings=settings, sessions=sessions, pool=pool)
    print("swept", flush=True)
    pause.wait(settings.sweep_every_s)
"""

# The worker's registration (worker.bases.Registrar): what stamps last_seen_at every
# TUNEQDM_BASE_SEEN_EVERY_S in a worker process.
REGISTRAR = """
import time
from app.db import engine_from_settings, make_sessionmaker
from app.settings import Settings
from worker.bases import Registrar


settings = Settings()
print(f"registrar ready, clock {time.time():.0f}", flush=True)
Registrar(settings, make_sessionmaker(engine_from_settings(settings))).run()
"""


def _skewed(script: str, env: dict[str, str], logs: Path, name: str, offset: str) -> Proc:
    """`script` in a process whose clock is `offset` (e.g. "-5m")."""
    proc = Proc(name, [sys.executable, "-c", script], {**env, **faketime(offset)}, logs)
    wait_for(f"{name} to start", lambda: " ready, clock " in proc.log(), 60, [proc])
    clock = float(proc.log().split("clock ")[1].split()[0])
    assert abs(clock - time.time()) > 240, "faketime did not reach the process"
    return proc


def _sender(env: dict[str, str], logs: Path, name: str, offset: str) -> Proc:
    return _skewed(SENDER, env, logs, name, offset)


def _deliveries(sessions: sessionmaker[Session], tenant_id: str, url: str, n: int, due: float):  # type: ignore[no-untyped-def]
    """`n` pending deliveries due `due` seconds from now by the database's clock (negative:
    overdue, e.g. a backlog after the receiver was down)."""
    ids = []
    with sessions() as session:
        when = database_now(session, due)
        for _ in range(n):
            row = WebhookDelivery(
                id=new_id("msg"),
                tenant_id=tenant_id,
                job_kind="generation",
                job_id=new_id("gen"),
                url=url,
                event="generation.succeeded",
                payload={"type": "generation.succeeded", "data": {}},
                status="pending",
                attempts=0,
                next_attempt_at=when,
            )
            session.add(row)
            ids.append(row.id)
        session.commit()
    return ids


def _rows(sessions: sessionmaker[Session], ids: list[str]) -> dict[str, tuple[str, int]]:
    with sessions() as session:
        rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.id.in_(ids)))
        return {r.id: (r.status, r.attempts) for r in rows}


@pytest.fixture
def senders_env(pg_url: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    env = service_env(
        database_url=pg_url,
        data_dir=tmp_path,
        allow_private_webhooks="true",
        webhook_ports="[]",
        webhook_timeout_s=30,
        sweep_every_s=0.3,
        log_json="false",
    )
    engine = make_engine(pg_url)
    with make_sessionmaker(engine)() as session:
        tenant = keys.get_or_create_tenant(session=session, name="acme")
        session.commit()
        tenant_id = tenant.id
    engine.dispose()
    yield env, tenant_id


def test_a_slow_sender_sends_a_due_webhook_at_once(
    senders_env: tuple[dict[str, str], str], pg_url: str, logs: Path, receiver: Receiver
) -> None:
    env, tenant_id = senders_env
    slow = _sender(env, logs, "slow", "-5m")
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    try:
        ids = _deliveries(sessions, tenant_id, receiver.url, 1, due=0)
        started = time.monotonic()
        wait_for(
            "the due webhook (a slow clock held it back by its skew)",
            lambda: _rows(sessions, ids)[ids[0]][0] == "delivered",
            30,
            [slow],
        )
        print(f"slow sender: delivered after {time.monotonic() - started:.1f} s")
        assert receiver.posts == {ids[0]: 1}
    finally:
        slow.stop()
        engine.dispose()


def test_a_fast_sender_leaves_an_attempt_in_flight_alone(
    senders_env: tuple[dict[str, str], str], pg_url: str, logs: Path, receiver: Receiver
) -> None:
    """The slow sender claims a backlog and POSTs it (held 10 s by the receiver); a sender 5
    minutes fast then sweeps every 0.3 s: it must not take those attempts over."""
    env, tenant_id = senders_env
    receiver.hold_s = HOLD_S
    slow = _sender(env, logs, "slow", "-5m")
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    fast = None
    try:
        # Due for 6 minutes: due by the database's clock and by the slow sender's.
        ids = _deliveries(sessions, tenant_id, receiver.url, 4, due=-360)
        wait_for("4 POSTs in flight", lambda: receiver.busy() == 4, 30, [slow])
        fast = _sender(env, logs, "fast", "+5m")
        wait_for(
            "every delivery recorded",
            lambda: {s for s, _ in _rows(sessions, ids).values()} == {"delivered"},
            60,
            [slow, fast],
        )
        time.sleep(1)  # a late second POST would show now
        sweeps = fast.log().count("swept")
        print(f"posts {sorted(receiver.posts.values())}, at once {receiver.most_at_once}")
        print(f"the fast sender swept {sweeps} times meanwhile")
        assert sweeps >= 5, fast.log()[-2000:]
        assert receiver.posts == dict.fromkeys(ids, 1), receiver.posts
        assert set(receiver.most_at_once.values()) == {1}
        # The slow sender's outcome was recorded: one attempt each, delivered.
        assert _rows(sessions, ids) == dict.fromkeys(ids, ("delivered", 1))
    finally:
        for proc in (slow, fast):
            if proc is not None:
                proc.stop()
        engine.dispose()


def test_a_live_worker_five_minutes_slow_shows_up(
    tiny_settings: dict[str, object], logs: Path
) -> None:
    """The worker's registration, 5 minutes slow, refreshing every second; the API (uvicorn,
    real clock) says whether it is up: seen within three refreshes by the database's clock."""
    env = service_env(**tiny_settings, base_seen_every_s=1, log_json="false")
    key = create_key(env, "acme")["api key"]
    port = free_port()
    api = start_api(env, logs, port)
    worker = _skewed(REGISTRAR, env, logs, "slow-worker", "-5m")
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}
        ) as client:
            wait_for("the API", lambda: answers_ready(client), 60, [api])

            def workers() -> list[dict[str, object]]:
                bases = client.get("/v1/bases").raise_for_status().json()["data"]
                return [w for b in bases for w in b["workers"]]

            wait_for("the worker registered", lambda: bool(workers()), 60, [api, worker])
            time.sleep(4)  # more than three refresh periods
            seen = workers()
            print(f"GET /v1/bases workers: {seen}")
            assert [w["up"] for w in seen] == [True], seen
            # Stamped with the database's clock, not the worker's 5 minutes slow one.
            last = datetime.fromisoformat(str(seen[0]["last_seen_at"]))
            assert abs(last - datetime.now(timezone.utc)) < timedelta(seconds=30), last
    finally:
        worker.stop()
        api.stop()
