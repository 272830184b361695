"""Bounded jobs with the real processes (uvicorn, a Celery worker, PostgreSQL, Redis), over HTTP:
a runaway fine-tune stopped by its time limit, cancel during class-image generation, cancel
during a generation (alone, and in a batch shared with another tenant's generation). Each test
checks that every job reaches a final state with exactly the files its state implies, and that
the worker is free for the next job afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db import make_engine, make_sessionmaker
from app.services import keys
from tests.service.procs import Proc, free_port, service_env, start_api, start_worker, wait_for
from tests.worker.conftest import photo_png

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

FINAL = ("succeeded", "failed", "canceled")


@dataclass
class Service:
    api: httpx.Client
    other: httpx.Client  # a second tenant
    procs: list[Proc]
    files: Path

    def post_finetune(self, params: dict[str, Any], **form: str) -> str:
        r = self.api.post(
            "/v1/finetunes",
            files=[("images", (f"{i}.png", photo_png(i), "image/png")) for i in range(3)],
            data={"instance_prompt": "a photo of sks dog", "params": json.dumps(params), **form},
        )
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def generate(self, client: httpx.Client, **body: Any) -> str:
        r = client.post("/v1/generations", json={"prompt": "a photo of a bag", **body})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def state(self, url: str, client: httpx.Client | None = None) -> dict[str, Any]:
        body: dict[str, Any] = (client or self.api).get(url).raise_for_status().json()
        return body

    def wait(self, url: str, what: Any, client: httpx.Client | None = None) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def check() -> bool:
            seen.update(self.state(url, client))
            return bool(what(seen))

        wait_for(f"{url} {getattr(what, '__name__', '')}", check, 300, self.procs)
        return seen

    def final(self, url: str, client: httpx.Client | None = None) -> dict[str, Any]:
        return self.wait(url, lambda s: s["status"] in FINAL, client)

    def stored(self) -> list[str]:
        return sorted(str(p.relative_to(self.files)) for p in self.files.rglob("*") if p.is_file())


@contextmanager
def service(
    pg_url: str, redis_url: str, logs: Path, tmp_path: Path, model: Path, **settings: Any
) -> Iterator[Service]:
    values: dict[str, Any] = {
        "database_url": pg_url,
        "broker_url": redis_url,
        "data_dir": tmp_path,
        "model": model,
        "quant_cache_dir": tmp_path / "cache",
        "torch_threads": 1,
        "heartbeat_s": 0.5,
        **settings,
    }
    engine = make_engine(pg_url)
    with make_sessionmaker(engine)() as s:
        tokens = []
        for name in ("acme", "globex"):
            tenant = keys.get_or_create_tenant(session=s, name=name)
            tokens.append(keys.create_key(session=s, tenant=tenant)[1])
        s.commit()
    engine.dispose()
    env = service_env(**values)
    port = free_port()
    procs = [start_api(env, logs, port), start_worker(env, logs, "bounds")]
    base = f"http://127.0.0.1:{port}"
    clients = [
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {t}"}, timeout=30)
        for t in tokens
    ]

    def ready() -> bool:
        try:
            return clients[0].get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for("the API", ready, 60, procs)
        yield Service(clients[0], clients[1], procs, tmp_path / "files")
    finally:
        for client in clients:
            client.close()
        for proc in procs:
            proc.stop()


def _inputs_only(files: list[str]) -> bool:
    return all("/inputs/" in f for f in files)


def test_a_runaway_fine_tune_is_stopped_by_its_time_limit(
    pg_url: str, redis_url: str, logs: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    with service(pg_url, redis_url, logs, tmp_path, tiny_model_dir, finetune_time_limit_s=8) as svc:
        # At the compute budget (2500 steps × 4 pixels of the native size = 10000): accepted,
        # but far longer than its 8 s.
        runaway = svc.post_finetune({"steps": 2500, "resolution": 64, "checkpoint_every": 5})
        after = svc.post_finetune({"steps": 2, "seed": 1})
        job = svc.final(f"/v1/finetunes/{runaway}")
        assert job["status"] == "failed", job
        assert job["error"] == (
            "the fine-tune ran past its time limit of 8 s and was stopped "
            "(TUNEQDM_FINETUNE_TIME_LIMIT_S); submit it again with fewer steps"
        )
        assert job["progress"]["step"] < 2500 and job["adapter_id"] is None
        # The worker is free again: the job queued behind the runaway one runs.
        nxt = svc.final(f"/v1/finetunes/{after}")
        assert nxt["status"] == "succeeded", nxt
        # Files: the photos of both jobs and the one adapter; no checkpoint is left.
        stored = svc.stored()
        adapters = [f for f in stored if "/adapters/" in f]
        assert adapters and all(nxt["adapter_id"] in f for f in adapters), stored
        assert _inputs_only([f for f in stored if f not in adapters]), stored
        assert "passed its time limit" in svc.procs[1].log()
        # The worker registered its base: native size from the config files, the fingerprint
        # once it had loaded the model, and itself as a worker serving it.
        bases = svc.state("/v1/bases")["data"]
        assert [b["native_resolution"] for b in bases] == [32], bases
        assert bases[0]["sizes"] == {"default": 32, "min": 16, "max": 64}
        assert bases[0]["fingerprint"] and bases[0]["storage_mode"] == "packed", bases
        assert len(bases[0]["workers"]) == 1 and bases[0]["workers"][0]["device"] == "cpu"


def test_cancel_during_class_image_generation(
    pg_url: str, redis_url: str, logs: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    with service(pg_url, redis_url, logs, tmp_path, tiny_model_dir) as svc:
        job_id = svc.post_finetune(
            {"steps": 10, "num_class_images": 400}, class_prompt="a photo of a dog"
        )
        cache = tmp_path / "cache" / "class-images"
        wait_for(
            "the first chunk of class images",
            lambda: len(list(cache.glob("class-*/*.png"))) >= 4,
            300,
            svc.procs,
        )
        r = svc.api.post(f"/v1/finetunes/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
        # The worker stops within one UNet call (after its next heartbeat) and takes the next
        # job: a generation queued after the cancel finishes.
        gen = svc.final(f"/v1/generations/{svc.generate(svc.api, steps=2)}")
        assert gen["status"] == "succeeded", gen
        job = svc.state(f"/v1/finetunes/{job_id}")
        assert job["status"] == "canceled" and job["progress"]["step"] == 0
        assert job["adapter_id"] is None
        made = len(list(cache.glob("class-*/*.png")))
        assert 4 <= made < 400 and not list(cache.glob("class-*/.*"))
        log = svc.procs[1].log()
        assert f"fine-tune {job_id} stopped at step 0" in log
        # Files: the photos and the generation's image; no checkpoint, no adapter.
        stored = svc.stored()
        image = [f for f in stored if "/generations/" in f]
        assert len(image) == 1 and _inputs_only([f for f in stored if f not in image]), stored


def test_cancel_during_a_generation_alone_and_in_a_shared_batch(
    pg_url: str, redis_url: str, logs: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    with service(pg_url, redis_url, logs, tmp_path, tiny_model_dir) as svc:
        # Alone: 150 steps at twice the native size; cancel while it runs.
        lone = svc.generate(svc.api, steps=150, width=64, height=64)
        svc.wait(f"/v1/generations/{lone}", lambda s: s["status"] == "running")
        # Meanwhile mine and another tenant's queue behind it; they can share one loop (same
        # steps and size, another size than the lone one), so the first to run claims both.
        size = {"steps": 100, "width": 32, "height": 32}
        mine = svc.generate(svc.api, seed=1, **size)
        theirs = svc.generate(svc.other, seed=2, **size)
        assert svc.api.post(f"/v1/generations/{lone}/cancel").status_code == 200

        svc.wait(f"/v1/generations/{mine}", lambda s: s["status"] == "running")
        svc.wait(f"/v1/generations/{theirs}", lambda s: s["status"] != "queued", svc.other)
        assert svc.api.post(f"/v1/generations/{mine}/cancel").status_code == 200

        done = svc.final(f"/v1/generations/{theirs}", svc.other)
        assert done["status"] == "succeeded" and len(done["images"]) == 1, done
        for gen_id in (lone, mine):
            gen = svc.state(f"/v1/generations/{gen_id}")
            assert gen["status"] == "canceled" and gen["images"] == [], gen
        again = svc.api.post(f"/v1/generations/{mine}/cancel")
        assert again.status_code == 409
        log = svc.procs[1].log()
        assert f"generation {lone} stopped" in log or f"'{lone}'] stopped" in log, log[-3000:]
        assert "succeeded (batch of 2)" in log, log[-3000:]
        # Files: only the other tenant's image.
        stored = svc.stored()
        assert len(stored) == 1 and theirs in stored[0], stored
