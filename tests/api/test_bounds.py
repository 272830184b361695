"""Requests are sized and bounded by the base they run on: defaults, ranges, compute budgets,
the bases registry (GET /v1/bases), and canceling a generation."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.bases import BaseInfo, describe_folder, register
from app.models import FinetuneJob, GenerationJob
from app.settings import BUILTIN_MODEL, Settings
from app.storage import LocalStorage
from tests.api.factories import make_tenant, snapshot
from tests.api.test_finetunes import post_finetune


def _use(client: TestClient, settings: Settings, **values: Any) -> Settings:
    """The app's settings with `values` changed (validated like the environment would be)."""
    changed = Settings(**{**settings.model_dump(), **values})
    client.app.state.settings = changed  # type: ignore[attr-defined]
    return changed


def _register(session: Session, settings: Settings, native: int, **kw: Any) -> None:
    info = BaseInfo(
        name=settings.base_model,
        source="/models/other",
        native_resolution=native,
        prediction_type="v_prediction",
        bits=4,
    )
    register(session, info, **kw)
    session.commit()


def test_the_built_in_model_is_described_from_its_config_files() -> None:
    info = describe_folder(BUILTIN_MODEL, name="x", bits=4)
    # unet sample_size 16 × VAE scale factor 2 (two VAE blocks).
    assert info is not None
    assert (info.native_resolution, info.prediction_type) == (32, "epsilon")
    assert describe_folder("org/hub-model", name="x", bits=4) is None


def test_defaults_come_from_the_base_and_are_stored_resolved(
    client: TestClient, session: Session, settings: Settings
) -> None:
    t = make_tenant(session)
    r = post_finetune(client, t.headers)
    assert r.status_code == 202, r.text
    row = session.get(FinetuneJob, r.json()["id"])
    assert row is not None and row.params["resolution"] == 32
    assert row.time_limit_s == settings.finetune_time_limit_s == r.json()["time_limit_s"]

    r = client.post("/v1/generations", headers=t.headers, json={"prompt": "a bag"})
    assert r.status_code == 202, r.text
    gen = session.get(GenerationJob, r.json()["id"])
    assert gen is not None and (gen.width, gen.height) == (32, 32)
    assert gen.time_limit_s == settings.generation_time_limit_s

    # A worker registered a base with another native size: defaults and range follow it.
    _register(session, settings, 64)
    r = client.post("/v1/generations", headers=t.headers, json={"prompt": "a bag"})
    assert (r.json()["width"], r.json()["height"]) == (64, 64)
    r = post_finetune(client, t.headers, data={"params": json.dumps({"resolution": 128})})
    assert r.status_code == 202 and r.json()["params"]["resolution"] == 128
    r = client.post("/v1/generations", headers=t.headers, json={"prompt": "a", "width": 136})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("width=136 must be between 32 and 128 (a multiple of 8)")
    assert "'tuneqdm/fashion-sd' (native 64 px" in r.json()["detail"]


def test_the_range_is_configurable(
    client: TestClient, session: Session, settings: Settings
) -> None:
    _use(client, settings, min_size_factor=1.0, max_size_factor=1.5)
    t = make_tenant(session)
    ok = client.post("/v1/generations", headers=t.headers, json={"prompt": "a", "height": 48})
    assert ok.status_code == 202, ok.text
    for side in (24, 56):
        r = post_finetune(client, t.headers, data={"params": json.dumps({"resolution": side})})
        assert r.status_code == 422
        assert f"params.resolution={side} must be between 32 and 48" in r.json()["detail"]
        assert "TUNEQDM_MIN_SIZE_FACTOR" in r.json()["detail"]


def test_budgets_refuse_with_the_limit_and_setting_and_store_nothing(
    client: TestClient, session: Session, storage: LocalStorage, settings: Settings
) -> None:
    _use(client, settings, max_finetune_cost=800, max_generation_cost=120)
    t = make_tenant(session)
    # At the limit: 400 steps × batch 1 × 2 (prior preservation) = 800.
    at_limit = {"class_prompt": "a photo of a dog", "params": json.dumps({"steps": 400})}
    assert post_finetune(client, t.headers, data=at_limit).status_code == 202
    before = snapshot(session, storage)
    over = {**at_limit, "params": json.dumps({"steps": 400, "resolution": 40})}
    r = post_finetune(client, t.headers, data=over)
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "this fine-tune costs 1250 (steps 400 × batch_size 1 × 2 for prior preservation × "
        "40² / 32² pixels), above the limit of 800 (TUNEQDM_MAX_FINETUNE_COST); lower steps, "
        "batch_size or resolution"
    )
    assert snapshot(session, storage) == before
    # Without a class prompt there is no prior term (and no class images).
    no_prior = {"params": json.dumps({"steps": 800})}
    assert post_finetune(client, t.headers, data=no_prior).status_code == 202

    body = {"prompt": "a", "num_images": 4, "steps": 30}
    assert client.post("/v1/generations", headers=t.headers, json=body).status_code == 202
    before = snapshot(session, storage)
    r = client.post("/v1/generations", headers=t.headers, json={**body, "width": 40})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "this generation costs 150 (num_images 4 × steps 30 × 40×32 / 32² pixels), above the "
        "limit of 120 (TUNEQDM_MAX_GENERATION_COST); lower num_images, steps, width or height"
    )
    assert snapshot(session, storage) == before


def test_a_base_only_workers_can_read_is_refused_until_one_registers(
    client: TestClient, session: Session, settings: Settings
) -> None:
    changed = _use(client, settings, model="org/hub-only-model")
    t = make_tenant(session)
    r = client.post("/v1/generations", headers=t.headers, json={"prompt": "a"})
    assert r.status_code == 503
    assert "no worker has registered base model 'tuneqdm/fashion-sd'" in r.json()["detail"]
    _register(session, changed, 48)
    r = client.post("/v1/generations", headers=t.headers, json={"prompt": "a"})
    assert r.status_code == 202 and r.json()["width"] == 48


def test_bases_endpoint_lists_the_registry(
    client: TestClient, session: Session, settings: Settings
) -> None:
    t = make_tenant(session)
    assert client.get("/v1/bases").status_code == 401
    assert client.get("/v1/bases", headers=t.headers).json() == {"data": [], "count": 0}
    _register(session, settings, 32)
    _register(
        session,
        settings,
        32,
        worker="gpu-1:42",
        fingerprint="f" * 64,
        device="cuda:0",
        storage_mode="packed",
    )
    listed = client.get("/v1/bases", headers=t.headers).json()
    assert listed["count"] == 1
    base = listed["data"][0]
    assert base["name"] == "tuneqdm/fashion-sd" and base["native_resolution"] == 32
    assert base["sizes"] == {"default": 32, "min": 16, "max": 64}
    assert (base["bits"], base["prediction_type"], base["storage_mode"]) == (
        4,
        "v_prediction",
        "packed",
    )
    assert base["fingerprint"] == "f" * 64 and base["device"] == "cuda:0"
    assert [(w["worker"], w["device"]) for w in base["workers"]] == [("gpu-1:42", "cuda:0")]
    # A later registration without a fingerprint (a restarted worker before its first load)
    # keeps the one already known.
    _register(session, settings, 32, worker="gpu-1:43")
    one = client.get("/v1/bases/tuneqdm/fashion-sd", headers=t.headers).json()
    assert one["fingerprint"] == "f" * 64
    assert [w["worker"] for w in one["workers"]] == ["gpu-1:42", "gpu-1:43"]
    r = client.get("/v1/bases/nope", headers=t.headers)
    assert r.status_code == 404 and "GET /v1/bases" in r.json()["detail"]


@pytest.mark.parametrize("status", ["queued", "running"])
def test_cancel_a_generation(client: TestClient, session: Session, status: str) -> None:
    t, other = make_tenant(session), make_tenant(session)
    gen_id = client.post("/v1/generations", headers=t.headers, json={"prompt": "a"}).json()["id"]
    row = session.get(GenerationJob, gen_id)
    assert row is not None
    row.status = status
    session.commit()
    assert client.post(f"/v1/generations/{gen_id}/cancel", headers=other.headers).status_code == 404
    r = client.post(f"/v1/generations/{gen_id}/cancel", headers=t.headers)
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["finished_at"] is not None
    assert r.json()["links"]["cancel"] is None  # offered only while it can be canceled
    again = client.post(f"/v1/generations/{gen_id}/cancel", headers=t.headers)
    assert again.status_code == 409 and "already canceled" in again.json()["detail"]
