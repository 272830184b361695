"""What a job is doing (`phase`, `waiting_reason`) and generations with `compare_base`, through
the HTTP API; the workers that write the phases are tested in tests/service/test_phases.py."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.bases import BaseInfo, register
from app.models import FinetuneJob, GenerationJob
from app.storage import LocalStorage
from tests.api.factories import (
    RecordingSender,
    make_adapter,
    make_finetune,
    make_generation,
    make_tenant,
)

DEFAULT = "tuneqdm/fashion-sd"  # TUNEQDM_BASE_MODEL of the test settings (4 bits, 32 px)


def _set(
    session: Session, model: type[FinetuneJob] | type[GenerationJob], job_id: str, **values: object
) -> None:
    session.execute(update(model).where(model.id == job_id).values(**values))
    session.commit()


def test_a_queued_job_waits_for_a_worker_and_says_why(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    queued = make_finetune(session, t.tenant, status="queued")
    body = client.get(f"/v1/finetunes/{queued.id}", headers=t.headers).json()
    assert body["phase"] == "waiting for a worker"
    # No worker has registered the base yet (GET /v1/bases lists none).
    assert body["waiting_reason"] == (
        f"no worker of base {DEFAULT!r} is up (GET /v1/bases); the job starts when one is"
    )
    gen = client.post("/v1/generations", headers=t.headers, json={"prompt": "a red apple"})
    assert gen.status_code == 202, gen.text
    assert gen.json()["phase"] == "waiting for a worker"
    assert "no worker of base" in gen.json()["waiting_reason"]

    # One worker up and nothing running: it is free, it takes the job at its next claim.
    info = BaseInfo(DEFAULT, "/models/fashion-sd", 32, "epsilon", 4)
    register(session, info, worker="gpu-1:1")
    session.commit()
    listed = client.get("/v1/finetunes", headers=t.headers).json()["data"]
    assert [(j["phase"], j["waiting_reason"]) for j in listed] == [
        (
            "waiting for a worker",
            f"a worker of base {DEFAULT!r} is free and takes the job at its next claim",
        )
    ]
    # As many jobs of the base running as workers up: they are busy.
    make_finetune(session, t.tenant, status="running", phase="training")
    body = client.get(f"/v1/finetunes/{queued.id}", headers=t.headers).json()
    assert body["waiting_reason"] == f"its worker is busy with other jobs of base {DEFAULT!r}"
    register(session, info, worker="gpu-2:1")
    session.commit()
    make_generation(session, storage, t.tenant, status="running")
    again = client.get(f"/v1/generations/{gen.json()['id']}", headers=t.headers).json()
    assert again["waiting_reason"] == f"its 2 workers are busy with other jobs of base {DEFAULT!r}"
    # Another base's running jobs do not count.
    make_finetune(session, t.tenant, status="running", base_model="other")
    make_finetune(session, t.tenant, status="running", base_model="other")
    assert (
        client.get(f"/v1/generations/{gen.json()['id']}", headers=t.headers).json()[
            "waiting_reason"
        ]
        == f"its 2 workers are busy with other jobs of base {DEFAULT!r}"
    )


def test_a_running_job_shows_its_workers_phase_and_a_final_one_none(
    client: TestClient, session: Session
) -> None:
    t = make_tenant(session)
    job = make_finetune(session, t.tenant, status="running", phase="training")
    body = client.get(f"/v1/finetunes/{job.id}", headers=t.headers).json()
    assert (body["phase"], body["waiting_reason"]) == ("training", None)
    _set(session, FinetuneJob, job.id, phase="progress images")
    assert client.get(f"/v1/finetunes/{job.id}", headers=t.headers).json()["phase"] == (
        "progress images"
    )
    # Canceled by the API while the worker was saving: the row may keep the worker's last
    # phase, the API shows none.
    _set(session, FinetuneJob, job.id, status="canceled", phase="saving")
    body = client.get(f"/v1/finetunes/{job.id}", headers=t.headers).json()
    assert (body["status"], body["phase"], body["waiting_reason"]) == ("canceled", None, None)


def test_compare_base_needs_an_adapter_and_counts_twice(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    no_adapter = client.post(
        "/v1/generations", headers=t.headers, json={"prompt": "a", "compare_base": True}
    )
    assert no_adapter.status_code == 422
    assert "compare_base=true" in no_adapter.json()["detail"]
    assert "adapter_id" in no_adapter.json()["detail"]
    adapter = make_adapter(session, storage, t.tenant)
    body = {"adapter_id": adapter.id, "prompt": "a photo of sks dog", "compare_base": True}
    # TUNEQDM_MAX_NUM_IMAGES is 4: 3 images on each side make 6.
    many = client.post("/v1/generations", headers=t.headers, json={**body, "num_images": 3})
    assert many.status_code == 422
    assert many.json()["detail"] == (
        "num_images=3 × 2 for compare_base is above the limit of 4 images (TUNEQDM_MAX_NUM_IMAGES)"
    )
    ok = client.post("/v1/generations", headers=t.headers, json={**body, "num_images": 2})
    assert ok.status_code == 202, ok.text
    assert ok.json()["compare_base"] is True and ok.json()["images"] == []
    plain = client.post("/v1/generations", headers=t.headers, json={**body, "compare_base": False})
    assert plain.json()["compare_base"] is False
    wrong_type = client.post(
        "/v1/generations", headers=t.headers, json={**body, "compare_base": "yes"}
    )
    assert wrong_type.status_code == 422 and "compare_base" in wrong_type.text


def test_compare_base_doubles_the_compute_budget(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    """A generation of cost 600 alone fits TUNEQDM_MAX_GENERATION_COST (1000); with the base's
    images beside it, it costs 1200."""
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    body = {
        "adapter_id": adapter.id,
        "prompt": "a",
        "num_images": 1,
        "steps": 150,
        "width": 64,
        "height": 64,
    }
    alone = client.post("/v1/generations", headers=t.headers, json=body)
    assert alone.status_code == 202, alone.text
    both = client.post("/v1/generations", headers=t.headers, json={**body, "compare_base": True})
    assert both.status_code == 422
    assert "costs 1200 (num_images 1 × 2 for compare_base × steps 150" in both.json()["detail"]
    assert "TUNEQDM_MAX_GENERATION_COST" in both.json()["detail"]
