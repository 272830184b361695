"""One worker process per GPU (docs/deployment.md "Several GPUs"), as real processes: uvicorn,
two Celery workers, PostgreSQL, Redis.

No GPU is at hand here, so both workers run with TUNEQDM_DEVICE=cpu; what is under test is
what a second process changes, not the device: the two register as two workers, a batch of
fine-tunes and generations is spread over both (each job's row names the worker that ran it),
and none ran twice (one claim each, one adapter or one set of images each).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.db import make_engine, make_sessionmaker
from app.models import Adapter, FinetuneJob, GeneratedImage, GenerationJob
from tests.service.procs import Service, create_key, service_env, wait_for
from tests.worker.conftest import photo_png

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

FINETUNES = 4
GENERATIONS = 8
FINETUNE_PARAMS = {"steps": 2, "resolution": 32, "seed": 1}
GENERATION = {"prompt": "a photo of a dog", "steps": 2, "width": 32, "height": 32}
FINAL = ("succeeded", "failed", "canceled")


def test_two_workers_share_a_batch_and_run_each_job_once(
    pg_url: str, redis_url: str, logs: Path, tmp_path: Path, tiny_model_dir: Path, quant_cache: Path
) -> None:

    storage = tmp_path / "files"
    env = service_env(
        database_url=pg_url,
        broker_url=redis_url,
        data_dir=tmp_path,
        storage_dir=storage,
        model=tiny_model_dir,
        quant_cache_dir=quant_cache,
        device="cpu",  # both "GPUs"
        torch_threads=1,
        # One generation per claim: a worker would otherwise take the whole queued batch at
        # once and the spread over the two would depend on timing.
        generation_batch_size=1,
    )
    key = create_key(env, "gpus")["api key"]
    with Service(env, logs, workers=2) as service, service.client(key, timeout=30) as client:
        service.wait_ready(key)
        bases = client.get("/v1/bases").json()["data"]
        registered = {w["worker"]: w["device"] for b in bases for w in b["workers"]}
        assert len(registered) == 2 and set(registered.values()) == {"cpu"}, registered

        photos = [("images", (f"{i}.png", photo_png(i), "image/png")) for i in range(3)]
        urls = []
        for _ in range(FINETUNES):
            form = {"instance_prompt": "a photo of sks dog", "params": json.dumps(FINETUNE_PARAMS)}
            r = client.post("/v1/finetunes", files=photos, data=form)
            assert r.status_code == 202, r.text
            urls.append(f"/v1/finetunes/{r.json()['id']}")
        for i in range(GENERATIONS):
            r = client.post("/v1/generations", json={**GENERATION, "seed": i})
            assert r.status_code == 202, r.text
            urls.append(f"/v1/generations/{r.json()['id']}")

        final: set[str] = set()

        def all_final() -> bool:
            # One GET per poll for the first job not known final: twelve GETs five times a
            # second would pass the tenant's 600 requests a minute on a slow run (429).
            for url in urls:
                if url not in final:
                    if _status(client, url) not in FINAL:
                        return False
                    final.add(url)
            return True

        wait_for("every job final", all_final, 240, service.procs)

    engine = make_engine(pg_url)
    try:
        with make_sessionmaker(engine)() as s:
            finetunes = s.scalars(select(FinetuneJob)).all()
            generations = s.scalars(select(GenerationJob)).all()
            jobs: list[FinetuneJob | GenerationJob] = [*finetunes, *generations]
            assert [j.status for j in jobs] == ["succeeded"] * len(urls)
            # One claim each: a second claim would have made it attempt 2.
            assert [j.attempts for j in jobs] == [1] * len(urls)
            # Each row names the worker process that ran it (`<host>:<pid>:<claim>`); both ran some.
            ran_by = [str(j.lease_owner).rsplit(":", 1)[0] for j in jobs]
            assert set(ran_by) == set(registered), (ran_by, registered)
            print(f"\njobs per worker: { {w: ran_by.count(w) for w in registered} }")

            adapters = s.scalars(select(Adapter)).all()
            assert sorted(a.finetune_job_id or "" for a in adapters) == sorted(
                j.id for j in finetunes
            )
            images = s.scalars(select(GeneratedImage)).all()
            assert sorted(i.generation_id for i in images) == sorted(g.id for g in generations)
            stored_keys = {a.storage_key for a in adapters} | {i.storage_key for i in images}
    finally:
        engine.dispose()
    # On disk: each adapter and image once, written by attempt 1, and nothing else of theirs.
    on_disk = {
        p.relative_to(storage).as_posix()
        for p in storage.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".png")
    }
    assert on_disk == stored_keys
    assert all("_a1." in k or "/a1/" in k for k in on_disk), on_disk


def _status(client: httpx.Client, url: str) -> str:
    return str(client.get(url).raise_for_status().json()["status"])
