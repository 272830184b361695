"""params.keep_checkpoints, GET /v1/finetunes/{id}/checkpoints and POST
.../checkpoints/{step}/promote: validated like every param, listed with their step's progress
images, promoted (a copy, quota checked) only once the job has finished, deleted with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from torch import nn

from app import storage as st
from app.models import Adapter, FinetuneCheckpoint, FinetuneJob, FinetuneSample
from app.services.quotas import stored_bytes
from app.storage import LocalStorage
from tests.api.factories import TenantKey, make_finetune, make_tenant
from tests.api.test_finetunes import post_finetune
from tests.core.helpers import perturbed_adapter
from tuneqdm_core import AdapterConfig, QuantConfig, quantize_, save_adapter
from worker.files import checkpoint_attempt_key

PROMPTS = ["a photo of sks dog"]


def _adapter_file(tmp_path: Path, seed: int) -> bytes:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    quantize_(model, QuantConfig(bits=8))
    adapter = perturbed_adapter(model, AdapterConfig(method="tuneqdm", intervals=1))
    path = save_adapter(adapter, tmp_path / f"{seed}.safetensors", extra={"tokens": ["sks"]})
    return path.read_bytes()


def _keep(
    session: Session, storage: LocalStorage, job: FinetuneJob, step: int, content: bytes
) -> str:
    """A checkpoint the way the worker keeps one (file of attempt 1, then its row)."""
    key = checkpoint_attempt_key(job.tenant_id, job.id, step, 1)
    storage.put(key, content)
    session.add(
        FinetuneCheckpoint(job_id=job.id, step=step, storage_key=key, size_bytes=len(content))
    )
    session.commit()
    return key


def _params(**values: object) -> dict[str, str]:
    return {"params": json.dumps({"steps": 20, **values})}


def test_keep_checkpoints_is_a_strict_bool_that_needs_validation_prompts(
    client: TestClient, session: Session
) -> None:
    t = make_tenant(session)
    for bad in ("true", 1, None):
        r = post_finetune(
            client, t.headers, data=_params(validation_prompts=PROMPTS, keep_checkpoints=bad)
        )
        assert r.status_code == 422, (bad, r.text)
        assert "params.keep_checkpoints" in r.json()["detail"], r.text
    r = post_finetune(client, t.headers, data=_params(keep_checkpoints=True))
    assert r.status_code == 422
    assert "keep_checkpoints" in r.text and "validation_prompts" in r.text, r.text

    r = post_finetune(
        client, t.headers, data=_params(validation_prompts=PROMPTS, keep_checkpoints=True)
    )
    assert r.status_code == 202, r.text
    assert r.json()["params"]["keep_checkpoints"] is True
    r = post_finetune(client, t.headers, data=_params())
    assert r.json()["params"]["keep_checkpoints"] is False


def test_checkpoints_are_listed_with_their_steps_images(
    client: TestClient, session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    t, other = make_tenant(session), make_tenant(session)
    job = make_finetune(session, t.tenant, status="running")
    url = f"/v1/finetunes/{job.id}/checkpoints"
    assert client.get(url, headers=t.headers).json() == {"data": [], "count": 0}
    content = _adapter_file(tmp_path, 0)
    for step in (10, 5):
        _keep(session, storage, job, step, content)
    key = st.finetune_sample_key(t.tenant.id, job.id, 5, 0)
    storage.put(key, b"png")
    session.add(
        FinetuneSample(
            job_id=job.id,
            step=5,
            prompt_index=0,
            prompt=PROMPTS[0],
            seed=0,
            storage_key=key,
            size_bytes=3,
        )
    )
    session.commit()

    r = client.get(url, headers=t.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 2
    assert [(c["step"], c["size_bytes"], c["samples"]) for c in body["data"]] == [
        (5, len(content), [f"/v1/finetunes/{job.id}/samples/5/0"]),
        (10, len(content), []),
    ]
    assert body["data"][0]["promote"] == f"/v1/finetunes/{job.id}/checkpoints/5/promote"
    assert client.get(url, headers=other.headers).status_code == 404
    # Counted in the stored bytes: two checkpoints and the image.
    assert stored_bytes(session, t.tenant.id) == 2 * len(content) + 3


def _promote(client: TestClient, t: TenantKey, job_id: str, step: int) -> tuple[int, Any]:
    r = client.post(f"/v1/finetunes/{job_id}/checkpoints/{step}/promote", headers=t.headers)
    assert r.headers["content-type"].startswith(
        "application/json" if r.status_code == 201 else "application/problem+json"
    ), r.text
    return r.status_code, r.json()


def test_promote_waits_for_the_end_and_needs_a_kept_step(
    client: TestClient, session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    t, other = make_tenant(session), make_tenant(session)
    job = make_finetune(session, t.tenant, status="running", name="rex")
    _keep(session, storage, job, 5, _adapter_file(tmp_path, 0))
    for status in ("queued", "running"):
        job.status = status
        session.commit()
        code, problem = _promote(client, t, job.id, 5)
        assert code == 409, problem
        assert problem["type"] == "urn:tuneqdm:problem:conflict"
        assert status in problem["detail"] and "finished" in problem["detail"]
    job.status = "failed"  # what it kept before failing can still be promoted
    session.commit()
    code, problem = _promote(client, t, job.id, 6)
    assert code == 404 and "no checkpoint at step 6" in problem["detail"], problem
    assert f"/v1/finetunes/{job.id}/checkpoints" in problem["detail"]
    assert _promote(client, other, job.id, 5)[0] == 404
    assert _promote(client, t, "ft_unknown", 5)[0] == 404
    r = client.post(f"/v1/finetunes/{job.id}/checkpoints/-1/promote", headers=t.headers)
    assert r.status_code == 422 and "step" in r.text
    session.expire_all()
    assert session.query(Adapter).filter_by(tenant_id=t.tenant.id).count() == 0


def test_a_promoted_checkpoint_is_an_adapter_of_its_own(
    client: TestClient, session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    t = make_tenant(session)
    job = make_finetune(session, t.tenant, status="succeeded", name="rex")
    early, late = _adapter_file(tmp_path, 0), _adapter_file(tmp_path, 1)
    assert early != late
    key = _keep(session, storage, job, 5, early)
    _keep(session, storage, job, 10, late)

    # Past the stored bytes limit: 429 and nothing stored.
    used = stored_bytes(session, t.tenant.id)
    t.tenant.stored_bytes_limit = used + len(early) - 1
    session.commit()
    code, problem = _promote(client, t, job.id, 5)
    assert code == 429 and "stored bytes limit" in problem["detail"], problem
    assert not storage.path(f"tenants/{t.tenant.id}/adapters").exists()
    t.tenant.stored_bytes_limit = used + len(early)
    session.commit()

    code, adapter = _promote(client, t, job.id, 5)
    assert code == 201, adapter
    assert adapter["name"] == "rex step 5" and adapter["finetune_id"] is None
    assert adapter["method"] == "tuneqdm" and adapter["bits"] == 8 and adapter["tokens"] == ["sks"]
    assert adapter["base_model"] == job.base_model and adapter["size_bytes"] == len(early)
    r = client.get(adapter["links"]["file"], headers=t.headers)
    assert r.status_code == 200 and r.content == early
    assert stored_bytes(session, t.tenant.id) == used + len(early)

    # Deleting the fine-tune deletes its checkpoints, never the promoted copy.
    job_id, tenant_id = job.id, t.tenant.id
    assert client.delete(f"/v1/finetunes/{job_id}", headers=t.headers).status_code == 204
    session.expire_all()
    assert not storage.exists(key)
    assert not storage.path(st.finetune_checkpoints_prefix(tenant_id, job_id)).exists()
    assert session.query(FinetuneCheckpoint).filter_by(job_id=job_id).count() == 0
    r = client.get(adapter["links"]["file"], headers=t.headers)
    assert r.status_code == 200 and r.content == early
