"""Load test of the whole service as real processes on loopback: the API (uvicorn), two Celery
workers, PostgreSQL (a throwaway database), Redis (a private redis-server) and local storage,
or S3-compatible storage with ``--s3``.

    PYTHONPATH=. python benchmarks/load.py [--duration 60] [--drain 120] [--s3] [--json PATH]

Three tenants work at once for ``--duration`` seconds, each as two clients that never stop: one
submits fine-tunes of the built-in tiny model (a few steps, 32 px, or the smallest size
the base allows where that is larger: GET /v1/bases), one submits generations
(with the tenant's newest adapter once it has one, the base before), and each polls its job
(every ``--poll`` seconds) to a final state, then downloads what it made (the adapter file,
the images). Then submitting stops and the jobs in flight get ``--drain`` seconds to finish.

The table: per kind, jobs succeeded and jobs/min over the run (first submit to last final
state), end-to-end latency p50/p99 (submit to the poll that saw the final state, so up to one
poll interval late); per endpoint, requests, p50/p99 latency and answers other than 2xx; and
the jobs lost: submitted (202) but not final when the drain ran out, or succeeded without
their files. The exit status is 1 when any job was lost or failed.

Before the clock starts, each worker runs one fine-tune (warm-up, not counted), so the
workers' first model load is outside the numbers (``--no-warm-up`` counts it). Tenant limits
are off (the load test measures the service; tests/service/test_load.py covers the limits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in the other benchmarks (common.py)

import httpx
from alembic import command
from alembic.config import Config
from PIL import Image
from sqlalchemy import create_engine, text

from app.db import make_engine, make_sessionmaker
from app.services import keys as api_keys
from benchmarks.summary import median, percentile, write_json
from tests.service.procs import ROOT, RedisServer, Service, service_env

TENANTS = 3
FINETUNE = {"steps": 4, "resolution": 32, "seed": 1}
GENERATION = {"steps": 4, "width": 32, "height": 32}
FINAL = ("succeeded", "failed", "canceled")
KINDS = ("finetune", "generation")
PNG = b"\x89PNG\r\n\x1a\n"
# The endpoints the clients call, as the table names them (submit, poll, download).
ENDPOINTS = (
    "POST /v1/finetunes",
    "POST /v1/generations",
    "GET /v1/finetunes/{id}",
    "GET /v1/generations/{id}",
    "GET /v1/adapters/{id}/file",
    "GET /v1/generations/{id}/images/{n}",
)


@dataclass
class Job:
    kind: str
    tenant: str
    id: str
    submitted: float
    final: float | None = None
    status: str = "queued"
    files_ok: bool = False


@dataclass
class Run:
    """What the clients saw: every request's latency and status, every job they submitted."""

    poll_s: float = 1.0  # between two GETs of a job in flight
    requests: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    jobs: list[Job] = field(default_factory=list)

    async def call(
        self, endpoint: str, client: httpx.AsyncClient, method: str, url: str, **kw: Any
    ) -> httpx.Response | None:
        start = time.perf_counter()
        try:
            r = await client.request(method, url, **kw)
            status = r.status_code
        except httpx.HTTPError:
            r, status = None, 599  # a transport failure counts as a server error
        self.requests[endpoint].append((time.perf_counter() - start, status))
        return r if r is not None and r.is_success else None


def _photo(i: int) -> bytes:
    image = Image.new("RGB", (64, 64), (200, 30 + 10 * i, 30))
    image.paste((20, 20, 220), (12 + i, 10, 40 + i, 40))  # the "subject", moving a little
    out = BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


PHOTOS = [("images", (f"{i}.png", _photo(i), "image/png")) for i in range(3)]


async def _until_final(run: Run, client: httpx.AsyncClient, job: Job, drain_at: float) -> dict:
    """Poll the job until it is final or the drain runs out; its last answer."""
    url = f"/v1/{job.kind}s/{job.id}"
    state: dict[str, Any] = {}
    while time.monotonic() < drain_at:
        r = await run.call(f"GET /v1/{job.kind}s/{{id}}", client, "GET", url)
        if r is not None:
            state = r.json()
            if state["status"] in FINAL:
                job.final, job.status = time.monotonic(), state["status"]
                return state
        await asyncio.sleep(run.poll_s)
    return state


async def _finetune(
    run: Run, client: httpx.AsyncClient, tenant: str, adapters: list[str], drain_at: float
) -> bool:
    """Submit one fine-tune, poll it, download its adapter; False if the submit failed."""
    form = {"instance_prompt": "a photo of sks dog", "params": json.dumps(FINETUNE)}
    submitted = time.monotonic()
    r = await run.call(
        "POST /v1/finetunes", client, "POST", "/v1/finetunes", data=form, files=PHOTOS
    )
    if r is None:
        return False
    job = Job("finetune", tenant, r.json()["id"], submitted)
    run.jobs.append(job)
    state = await _until_final(run, client, job, drain_at)
    if job.status == "succeeded":
        url = f"/v1/adapters/{state['adapter_id']}/file"
        got = await run.call("GET /v1/adapters/{id}/file", client, "GET", url)
        job.files_ok = got is not None and len(got.content) > 0
        adapters.append(state["adapter_id"])
    return True


async def _generation(
    run: Run, client: httpx.AsyncClient, tenant: str, adapters: list[str], drain_at: float
) -> bool:
    """Submit one generation (with the tenant's newest adapter, if any), poll it, download
    its images; False if the submit failed."""
    body: dict[str, Any] = {**GENERATION, "prompt": "a photo of sks dog", "seed": len(run.jobs)}
    if adapters:
        body["adapter_id"] = adapters[-1]
    submitted = time.monotonic()
    r = await run.call("POST /v1/generations", client, "POST", "/v1/generations", json=body)
    if r is None:
        return False
    job = Job("generation", tenant, r.json()["id"], submitted)
    run.jobs.append(job)
    state = await _until_final(run, client, job, drain_at)
    if job.status == "succeeded":
        pngs = [
            await run.call("GET /v1/generations/{id}/images/{n}", client, "GET", image["url"])
            for image in state["images"]
        ]
        job.files_ok = bool(pngs) and all(p is not None and p.content[:8] == PNG for p in pngs)
    return True


async def _user(
    job: Callable[[Run, httpx.AsyncClient, str, list[str], float], Awaitable[bool]],
    run: Run,
    client: httpx.AsyncClient,
    tenant: str,
    adapters: list[str],
    times: tuple[float, float],
) -> None:
    """A client that submits its next job as soon as the last one is done, until `stop_at`."""
    stop_at, drain_at = times
    while time.monotonic() < stop_at:
        if not await job(run, client, tenant, adapters, drain_at):
            await asyncio.sleep(1)  # refused (counted in the table); try again shortly


async def _load(
    base_url: str, keys: dict[str, str], duration: float, drain: float, poll_s: float
) -> Run:
    run = Run(poll_s=poll_s)
    start = time.monotonic()
    times = (start + duration, start + duration + drain)
    clients = {
        t: httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {k}"}, timeout=60
        )
        for t, k in keys.items()
    }
    try:
        users = []
        for tenant, client in clients.items():
            adapters: list[str] = []
            users.append(_user(_finetune, run, client, tenant, adapters, times))
            users.append(_user(_generation, run, client, tenant, adapters, times))
        await asyncio.gather(*users)
    finally:
        for client in clients.values():
            await client.aclose()
    return run


async def _warm_up(base_url: str, key: str, workers: int) -> None:
    """One fine-tune per worker (each worker takes one message at a time), waited for."""
    run = Run()
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:
        drain_at = time.monotonic() + 600
        await asyncio.gather(
            *(_finetune(run, client, "warm-up", [], drain_at) for _ in range(workers))
        )
    if not all(j.status == "succeeded" for j in run.jobs) or len(run.jobs) != workers:
        raise SystemExit(f"warm-up failed: {[(j.id, j.status) for j in run.jobs]}")


def report(run: Run, meta: dict[str, Any]) -> dict[str, Any]:
    finals = [j.final for j in run.jobs if j.final is not None]
    start = min((j.submitted for j in run.jobs), default=0.0)
    minutes = (max(finals, default=start) - start) / 60 or float("nan")
    kinds: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        jobs = [j for j in run.jobs if j.kind == kind]
        done = [j for j in jobs if j.status == "succeeded" and j.files_ok]
        e2e = [j.final - j.submitted for j in done if j.final is not None]
        kinds[kind] = {
            "submitted": len(jobs),
            "succeeded": len(done),
            "failed": sum(j.status in ("failed", "canceled") for j in jobs),
            "lost": sum(
                j.final is None or (j.status == "succeeded" and not j.files_ok) for j in jobs
            ),
            "jobs_per_min": len(done) / minutes,
            "e2e_p50_s": median(e2e) if e2e else None,
            "e2e_p99_s": percentile(e2e, 99) if e2e else None,
        }
    endpoints = {
        name: {
            "count": len(rows),
            "p50_ms": 1000 * median([t for t, _ in rows]),
            "p99_ms": 1000 * percentile([t for t, _ in rows], 99),
            "non_2xx": sum(not 200 <= s < 300 for _, s in rows),
        }
        for name in ENDPOINTS
        if (rows := run.requests.get(name))
    }
    lost = sum(k["lost"] for k in kinds.values())
    failed = sum(k["failed"] for k in kinds.values())
    return {
        **meta,
        "minutes": minutes,
        "kinds": kinds,
        "endpoints": endpoints,
        "lost": lost,
        "failed": failed,
    }


def table(result: dict[str, Any]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"{result['duration_s']:.0f} s of load, {result['tenants']} tenants, "
        f"{result['workers']} workers, {result['storage']} storage; "
        f"first submit to last final state: {result['minutes']:.2f} min",
        "",
        "| kind | submitted | succeeded | failed | lost | jobs/min | e2e p50 s | e2e p99 s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, k in result["kinds"].items():
        e2e = f"{num(k['e2e_p50_s'], '.2f')} | {num(k['e2e_p99_s'], '.2f')}"
        lines.append(
            f"| {kind} | {k['submitted']} | {k['succeeded']} | {k['failed']} | {k['lost']} | "
            f"{k['jobs_per_min']:.1f} | {e2e} |"
        )
    lines += [
        "",
        "| endpoint | requests | p50 ms | p99 ms | non-2xx |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, e in result["endpoints"].items():
        lines.append(
            f"| {name} | {e['count']} | {e['p50_ms']:.1f} | {e['p99_ms']:.1f} | {e['non_2xx']} |"
        )
    lines += ["", f"jobs lost: {result['lost']}   jobs failed: {result['failed']}"]
    return "\n".join(lines)


@contextlib.contextmanager
def throwaway_database(server: str) -> Iterator[str]:
    """A new, migrated database on the PostgreSQL server of the maintenance URL `server`,
    dropped afterwards."""
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    name = f"tuneqdm_load_{uuid.uuid4().hex[:12]}"
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            config = Config(str(ROOT / "alembic.ini"))
            config.attributes["database_url"] = url
            command.upgrade(config, "head")
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def create_keys(database: str, tenants: list[str]) -> dict[str, str]:
    """An API key per tenant, as `tuneqdm-admin keys create` makes them (in this process: the
    CLI would start a Python process per key)."""
    engine = make_engine(database)
    try:
        with make_sessionmaker(engine)() as session:
            made = {}
            for name in tenants:
                tenant = api_keys.get_or_create_tenant(session=session, name=name)
                made[name] = api_keys.create_key(session=session, tenant=tenant)[1]
            session.commit()
        return made
    finally:
        engine.dispose()


def s3_settings(workdir: Path, stack: contextlib.ExitStack) -> dict[str, object]:
    """A local S3-compatible server (tests/s3server.py) and the settings that point at it."""
    from tests.s3server import start_s3_server

    server = stack.enter_context(start_s3_server(workdir / "s3"))
    return {
        "storage_backend": "s3",
        "s3_endpoint_url": server.endpoint_url,
        "s3_bucket": server.bucket,
        "s3_access_key_id": server.access_key_id,
        "s3_secret_access_key": server.secret_access_key,
        "s3_region": server.region,
    }


def _fit_sizes(base_url: str, key: str) -> None:
    """Jobs at 32 px, or at the base's smallest size where its range starts higher (a FLUX or
    SD3 folder: GET /v1/bases gives the range its own config implies, never assumed here)."""
    bases = httpx.get(
        f"{base_url}/v1/bases", headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).raise_for_status()
    [base] = bases.json()["data"]
    side = max(32, int(base["sizes"]["min"]))
    FINETUNE["resolution"] = side
    GENERATION.update(width=side, height=side)
    if side != 32:
        _say(f"{base['name']} ({base['family']}): jobs at {side} px, its smallest size")


def _tiny_model(workdir: Path) -> Path:
    # Imported here: torch and diffusers take seconds to load, and --model needs neither.
    from tuneqdm_core.builtin.tiny import save_tiny_pipeline

    return save_tiny_pipeline(workdir / "tiny-sd")


_T0 = time.monotonic()


def _say(what: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {what}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60, help="seconds of submitting")
    parser.add_argument("--drain", type=float, default=120, help="seconds for jobs in flight")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--poll", type=float, default=1.0, help="seconds between two GETs of a job in flight"
    )
    parser.add_argument("--s3", action="store_true", help="S3-compatible storage, not local")
    parser.add_argument(
        "--postgres",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="maintenance database URL of the PostgreSQL server (a throwaway database is made)",
    )
    parser.add_argument(
        "--model", type=Path, help="a model folder (default: the built-in tiny model, made anew)"
    )
    parser.add_argument("--quant-cache", type=Path, help="quantized-model cache to reuse")
    parser.add_argument(
        "--no-warm-up", action="store_true", help="count each worker's first model load too"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--json", metavar="PATH", help="write all numbers here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="tuneqdm-load-"))
    logs = workdir / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        _say("database")
        database = stack.enter_context(throwaway_database(args.postgres))
        _say("redis, storage, model")
        redis = RedisServer(logs)
        stack.callback(redis.stop)
        storage = s3_settings(workdir, stack) if args.s3 else {"storage_dir": workdir / "files"}
        env = service_env(
            database_url=database,
            broker_url=redis.url,
            data_dir=workdir,
            model=args.model or _tiny_model(workdir),
            quant_cache_dir=args.quant_cache or workdir / "cache",
            torch_threads=1,
            tenant_rpm=0,
            retention_sweep_every_s=0,
            **storage,
        )
        _say("keys")
        keys = create_keys(database, [f"tenant{i}" for i in range(TENANTS)] + ["warm-up"])
        warm_key = keys.pop("warm-up")
        _say(f"API and {args.workers} workers")
        service = stack.enter_context(Service(env, logs, workers=args.workers))
        service.wait_ready(warm_key)
        _fit_sizes(service.base_url, warm_key)
        if not args.no_warm_up:
            _say("warm-up: one fine-tune per worker")
            asyncio.run(_warm_up(service.base_url, warm_key, args.workers))
        _say(f"load: {args.duration:.0f} s, then up to {args.drain:.0f} s of drain")
        run = asyncio.run(_load(service.base_url, keys, args.duration, args.drain, args.poll))
        _say("stopping")
        service.stop()
        _say("stopped")
        meta = {
            "duration_s": args.duration,
            "drain_s": args.drain,
            "tenants": TENANTS,
            "workers": args.workers,
            "storage": "s3" if args.s3 else "local",
            "warm_up": not args.no_warm_up,
            "poll_s": args.poll,
            "command": " ".join(["python", "benchmarks/load.py", *sys.argv[1:]]),
        }
        # The machine's own load, for reading the numbers (other work shares the cores).
        meta["load_average_1min"] = os.getloadavg()[0]
        result = report(run, meta)
    print(table(result))
    if args.keep:
        print(f"logs: {logs}")
    write_json(args.json, result)
    return 1 if result["lost"] or result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
