"""Two tenants on real processes (uvicorn, PostgreSQL, the Redis broker): one floods the
service with 50 concurrent uploads and 200 generations, the other keeps working.

What must hold: the quiet tenant gets no 5xx and no 429 while the flooding tenant is held to
its limits (429 with Retry-After and the limit's name), and the registry never holds more of
the flooder's active jobs than its limit plus the requests that were in flight. The latency
table (tenant, endpoint, count, p50, p99, 5xx, 429) is printed, not asserted: timing depends on
the machine (docs/benchmarks.md has the measured numbers).

No worker runs: the jobs stay queued, which is the load the API and the database must carry.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.orm import sessionmaker

from app.models import FinetuneJob, GenerationJob, Tenant
from tests.service.procs import admin, create_key, free_port, service_env, start_api, wait_for
from worker.jobs import claim, claim_next, finish_owned, new_owner

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

FLOOD_UPLOADS = 50
FLOOD_GENERATIONS = 200
FLOOD_CONCURRENCY = 50
FLOOD_ACTIVE_JOBS = 120  # the flooder's override, set with the admin CLI
PHOTOS_PER_UPLOAD = 3
GENERATION = {"prompt": "a photo of a bag", "steps": 10, "width": 64, "height": 64}


def _photo(seed: int, side: int = 1024) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = np.stack([200 * x, 200 * y, 100 + 50 * np.sin(6 * x)], axis=-1)
    pixels = (base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.samples: dict[tuple[str, str], list[tuple[float, int, str]]] = defaultdict(list)

    def call(self, tenant: str, endpoint: str, send: Callable[[], httpx.Response]) -> None:
        start = time.perf_counter()
        try:
            r = send()
            status, detail = r.status_code, r.text[:200]
            if status == 429:
                assert int(r.headers["Retry-After"]) > 0
        except httpx.HTTPError as exc:
            status, detail = 599, repr(exc)  # a transport failure counts as a server error
        with self.lock:
            self.samples[(tenant, endpoint)].append((time.perf_counter() - start, status, detail))

    def table(self) -> str:
        lines = [
            f"{'tenant':<7} {'endpoint':<26} {'count':>5} {'p50 s':>7} {'p99 s':>7} "
            f"{'5xx':>4} {'429':>4}"
        ]
        for (tenant, endpoint), rows in sorted(self.samples.items()):
            times = sorted(t for t, _, _ in rows)
            p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
            lines.append(
                f"{tenant:<7} {endpoint:<26} {len(rows):>5} {statistics.median(times):>7.3f} "
                f"{p99:>7.3f} {sum(s >= 500 for _, s, _ in rows):>4} "
                f"{sum(s == 429 for _, s, _ in rows):>4}"
            )
        return "\n".join(lines)


def test_a_flooding_tenant_does_not_hurt_the_other(
    pg_url: str, redis_url: str, logs: Path, tmp_path: Path
) -> None:
    env = service_env(
        database_url=pg_url,
        broker_url=redis_url,
        data_dir=tmp_path,
        storage_dir=tmp_path / "files",
        retention_sweep_every_s=0,
    )
    flood_key, quiet_key = (create_key(env, t)["api key"] for t in ("flood", "quiet"))
    limits = admin(env, "tenants", "limits", "flood", "--active-jobs", str(FLOOD_ACTIVE_JOBS))
    assert f"{FLOOD_ACTIVE_JOBS} (override)" in limits

    port = free_port()
    api = start_api(env, logs, port)
    base = f"http://127.0.0.1:{port}"
    photos = [_photo(i) for i in range(PHOTOS_PER_UPLOAD)]
    rec = Recorder()
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the API", ready, 60, [api])
        flood = httpx.Client(
            base_url=base,
            headers={"Authorization": f"Bearer {flood_key}"},
            timeout=60,
            limits=httpx.Limits(max_connections=FLOOD_CONCURRENCY),
        )
        quiet = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {quiet_key}"}, timeout=60
        )
        files = [("images", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos)]
        form = {"instance_prompt": "a photo of sks bag"}

        def upload(client: httpx.Client) -> httpx.Response:
            return client.post("/v1/finetunes", data=form, files=files)

        done = threading.Event()

        def flooding() -> None:
            with ThreadPoolExecutor(FLOOD_CONCURRENCY) as pool:
                for _ in range(FLOOD_UPLOADS):
                    pool.submit(rec.call, "flood", "POST /v1/finetunes", lambda: upload(flood))
                for _ in range(FLOOD_GENERATIONS):
                    pool.submit(
                        rec.call,
                        "flood",
                        "POST /v1/generations",
                        lambda: flood.post("/v1/generations", json=GENERATION),
                    )
            done.set()

        flooder = threading.Thread(target=flooding)
        started = time.monotonic()
        flooder.start()
        # The quiet tenant works as a user would, one request at a time, while the flood lasts.
        while not done.is_set() and time.monotonic() - started < 50:
            rec.call("quiet", "GET /v1/adapters", lambda: quiet.get("/v1/adapters"))
            rec.call("quiet", "GET /v1/finetunes", lambda: quiet.get("/v1/finetunes"))
            rec.call(
                "quiet",
                "POST /v1/generations",
                lambda: quiet.post("/v1/generations", json=GENERATION),
            )
            rec.call("quiet", "POST /v1/finetunes", lambda: upload(quiet))
        flooder.join(timeout=60)
        assert done.is_set(), "the flood did not finish within the test's bound"
    finally:
        api.stop()
    print(f"\n{rec.table()}\n")

    quiet_statuses = {s for (t, _), rows in rec.samples.items() if t == "quiet" for _, s, _ in rows}
    assert quiet_statuses == {200, 202}, api.log()[-4000:]
    flood_rows = [row for (t, _), rows in rec.samples.items() if t == "flood" for row in rows]
    limited = [detail for _, s, detail in flood_rows if s == 429]
    assert limited and all("active jobs limit" in d for d in limited)
    assert not [row for row in flood_rows if row[1] >= 500], api.log()[-4000:]

    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            flood_id = conn.scalar(select(Tenant.id).where(Tenant.name == "flood"))
            active = sum(
                int(
                    conn.scalar(select(func.count()).select_from(m).where(m.tenant_id == flood_id))
                    or 0
                )
                for m in (FinetuneJob, GenerationJob)
            )
    finally:
        engine.dispose()
    accepted = sum(s == 202 for _, s, _ in flood_rows)
    assert active == accepted
    assert FLOOD_ACTIVE_JOBS <= active <= FLOOD_ACTIVE_JOBS + FLOOD_CONCURRENCY
    _quiet_job_starts_next(pg_url)


def _quiet_job_starts_next(pg_url: str) -> None:
    """The worker's fair pick on the registry the flood left behind. The quiet tenant keeps
    only its newest generation (it cancels the others); the flood has dozens queued before it.
    A worker that has just run one of the flood's takes the quiet tenant's next, where
    first-in-first-out would take the flood's next oldest."""
    engine = create_engine(pg_url)
    try:
        factory = sessionmaker(engine)
        with factory() as session:
            ids = dict(session.execute(select(Tenant.name, Tenant.id)).tuples().all())
            queued = GenerationJob.status == "queued"
            quiet_jobs = session.scalars(
                select(GenerationJob.id)
                .where(queued, GenerationJob.tenant_id == ids["quiet"])
                .order_by(GenerationJob.created_at)
            ).all()
            newest = quiet_jobs[-1]
            session.execute(
                update(GenerationJob)
                .where(GenerationJob.id.in_(quiet_jobs[:-1]))
                .values(status="canceled")
            )
            newest_at = select(GenerationJob.created_at).where(GenerationJob.id == newest)
            flood_first = session.scalars(
                select(GenerationJob.id)
                .where(
                    queued,
                    GenerationJob.tenant_id == ids["flood"],
                    GenerationJob.created_at < newest_at.scalar_subquery(),
                )
                .order_by(GenerationJob.created_at)
            ).all()
            session.commit()
            assert len(flood_first) >= 10, len(flood_first)
            # A worker runs the flood's oldest generation.
            owner = new_owner()
            assert claim(session, GenerationJob, flood_first[0], owner, stale_after_s=60)
            finish_owned(session, GenerationJob, flood_first[0], owner, "succeeded")
            session.commit()
            got = claim_next(session, GenerationJob, new_owner(), stale_after_s=60, hint=newest)
            session.commit()
        print(f"next claim: {got}; the flood had {len(flood_first) - 1} older generations queued")
        assert got is not None and got[0] == newest, (got, newest)
    finally:
        engine.dispose()
