"""Two bases in one deployment, with real processes: uvicorn, one Celery worker per base, Redis,
PostgreSQL. Both bases are the tiny model folder, served under two names at 4 and 8 bits.

While only base A's worker runs, a fine-tune of base B waits (GET /v1/bases shows it queued and
no worker of B up) and A's worker claims the younger fine-tune of A instead; once B's worker
starts, B's runs there. Generations
with an adapter of either base run on that base's worker (the workers' logs name the jobs they
claimed; the adapters carry their base's fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.bases import describe_folder, register
from app.db import make_engine, make_sessionmaker
from app.models import Adapter, FinetuneJob, ServedBase
from tests.service.procs import (
    Proc,
    create_key,
    free_port,
    post_finetune,
    service_env,
    start_api,
    start_worker,
    wait_final,
    wait_for,
)

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

A, B = "tiny-a", "tiny-b"


def _claimed(proc: Proc, kind: str, job_id: str) -> bool:
    return any(
        f"{kind} " in line and job_id in line and "claimed" in line
        for line in proc.log().splitlines()
    )


def test_each_base_runs_on_its_own_worker(
    pg_url: str, logs: Path, tiny_model_dir: Path, tiny_settings: dict[str, object]
) -> None:

    common: dict[str, Any] = {
        **tiny_settings,
        "torch_threads": 1,
        "heartbeat_s": 1,
        "sweep_every_s": 2,
    }
    env_a = service_env(**common, base_model=A, bits=4)  # the API's default base too
    env_b = service_env(**common, base_model=B, bits=8)
    key = create_key(env_a, "bases")["api key"]
    # B is known before its worker starts, as `python -m worker.embedded` registers its base.
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        info = describe_folder(tiny_model_dir, name=B, bits=8)
        assert info is not None
        register(s, info)
        s.commit()

    port = free_port()
    api = start_api(env_a, logs, port)
    worker_a = start_worker(env_a, logs, "worker-a")
    procs = [api, worker_a]
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}
        )

        def bases() -> dict[str, dict[str, Any]]:
            return {b["name"]: b for b in client.get("/v1/bases").raise_for_status().json()["data"]}

        def api_and_a_up() -> bool:
            try:
                return bases().get(A, {}).get("workers_up") == 1
            except httpx.TransportError:
                return False

        wait_for("the API and worker A", api_and_a_up, 120, procs)

        def finetune(base: str | None) -> str:
            params = {"steps": 2, "resolution": 32, "seed": 1}
            r = post_finetune(client, params, photos=2, **({"base": base} if base else {}))
            assert r.status_code == 202, r.text
            assert r.json()["base_model"] == (base or A)
            return str(r.json()["id"])

        def finished(url: str) -> dict[str, Any]:
            return wait_final(client, url, 240, procs)

        ft_b = finetune(B)  # first: a claim blind to bases would take the oldest job, this one
        ft_a = finetune(None)
        wait_for("worker A's claim", lambda: _claimed(worker_a, "fine-tune", ft_a), 120, procs)
        # B's job waits for B's worker: A's worker claimed the younger job of its own base.
        listed = bases()
        assert listed[B]["workers_up"] == 0 and listed[B]["queued"]["finetune"] == 1
        assert listed[A]["queued"]["finetune"] == 0
        assert (listed[A]["bits"], listed[B]["bits"]) == (4, 8)
        assert client.get(f"/v1/finetunes/{ft_b}").json()["status"] == "queued"

        worker_b = start_worker(env_b, logs, "worker-b")
        procs.append(worker_b)
        assert finished(f"/v1/finetunes/{ft_a}")["status"] == "succeeded"
        assert finished(f"/v1/finetunes/{ft_b}")["status"] == "succeeded"
        assert _claimed(worker_b, "fine-tune", ft_b) and not _claimed(worker_a, "fine-tune", ft_b)
        assert not _claimed(worker_b, "fine-tune", ft_a)

        with sessions() as s:
            adapters = {
                job.base_model: s.scalars(
                    select(Adapter).where(Adapter.finetune_job_id == job.id)
                ).one()
                for job in s.scalars(select(FinetuneJob).where(FinetuneJob.id.in_([ft_a, ft_b])))
            }
            prints = {row.name: row.fingerprint for row in s.scalars(select(ServedBase))}
        # Each adapter was trained on its base's quantized model (4 and 8 bits differ).
        assert {b: a.base_model for b, a in adapters.items()} == {A: A, B: B}
        assert (
            adapters[A].base_fingerprint == prints[A] != prints[B] == adapters[B].base_fingerprint
        )
        assert (adapters[A].bits, adapters[B].bits) == (4, 8)

        gens = {}
        for base in (B, A):
            r = client.post(
                "/v1/generations",
                json={"adapter_id": adapters[base].id, "prompt": "sks dog", "steps": 2, "seed": 3},
            )
            assert r.status_code == 202, r.text
            assert r.json()["base_model"] == base
            gens[base] = r.json()["id"]
        for gen_id in gens.values():
            assert finished(f"/v1/generations/{gen_id}")["status"] == "succeeded"
        assert _claimed(worker_b, "generations", gens[B]) and _claimed(
            worker_a, "generations", gens[A]
        )
        assert not _claimed(worker_a, "generations", gens[B])
        assert not _claimed(worker_b, "generations", gens[A])

        listed = bases()
        for base in (A, B):
            assert listed[base]["workers_up"] == 1, listed[base]
            assert listed[base]["queued"] == {"finetune": 0, "generation": 0}
            assert listed[base]["storage_mode"] == "packed"
            assert listed[base]["native_resolution"] == info.native_resolution
    finally:
        for proc in procs:
            proc.stop()
        engine.dispose()
