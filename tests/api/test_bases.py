"""Several bases in one deployment, as the API sees them: a request names its base (or follows
its adapter's), is sized by it, goes to that base's queue, and an unknown base is a 422 that
names the known ones; GET /v1/bases shows each base's workers and queued jobs."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from sqlalchemy.orm import Session

from app.bases import BaseInfo, register
from app.db import make_engine
from app.models import BaseWorker, FinetuneJob, GenerationJob, utcnow
from app.queue import FINETUNE_QUEUE, GENERATE_QUEUE, base_queue, queue_safe
from app.settings import Settings
from app.storage import LocalStorage
from tests.api.conftest import alembic_config
from tests.api.factories import (
    RecordingSender,
    make_adapter,
    make_finetune,
    make_tenant,
    snapshot,
)
from tests.api.test_finetunes import post_finetune

DEFAULT = "tuneqdm/fashion-sd"  # TUNEQDM_BASE_MODEL of the test settings (4 bits, 32 px)
OTHER = "sd21-8bit"


def _register_other(session: Session, worker: str | None = "gpu-2:7") -> None:
    info = BaseInfo(
        name=OTHER, source="/models/sd21", native_resolution=64, prediction_type="epsilon", bits=8
    )
    register(session, info, worker=worker, device="cuda:0", storage_mode="resident")
    session.commit()


def test_queue_names_are_safe_and_never_shared() -> None:
    assert base_queue(FINETUNE_QUEUE, "sd15") == "finetune.sd15"
    assert base_queue(GENERATE_QUEUE, OTHER) == "generate.sd21-8bit"
    names = ["a/b", "a-b", "A-b", "a.b", "a,b", "x" * 255, "x" * 254 + "y"]
    safe = [queue_safe(n) for n in names]
    assert len(set(safe)) == len(names)
    for s in safe:
        assert s and len(s) <= 90 and set(s) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def test_a_finetune_names_its_base(
    client: TestClient, session: Session, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    _register_other(session)
    r = post_finetune(client, t.headers, data={"base": OTHER})
    assert r.status_code == 202, r.text
    body = r.json()
    # Sized and bit-width'd by its base, not by the default one.
    assert body["base_model"] == OTHER
    assert (body["params"]["bits"], body["params"]["resolution"]) == (8, 64)
    assert sender.sent[-1] == ("tuneqdm.finetune", body["id"], "finetune.sd21-8bit")

    r = post_finetune(client, t.headers)  # no base: the default
    assert r.status_code == 202, r.text
    assert (r.json()["base_model"], r.json()["params"]["bits"]) == (DEFAULT, 4)
    assert sender.sent[-1][2] == base_queue(FINETUNE_QUEUE, DEFAULT)


def test_unknown_base_or_bits_of_another_base_is_422_leaving_nothing(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    _register_other(session)
    before = snapshot(session, storage)
    r = post_finetune(client, t.headers, data={"base": "sd-nope"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "'sd-nope' is not served" in detail
    assert f"'{OTHER}'" in detail and f"'{DEFAULT}'" in detail

    r = post_finetune(client, t.headers, data={"base": OTHER, "params": json.dumps({"bits": 4})})
    assert r.status_code == 422
    assert "served at 8 bits" in r.json()["detail"] and "bits=8" in r.json()["detail"]

    r = client.post("/v1/generations", headers=t.headers, json={"prompt": "a", "base": "sd-nope"})
    assert r.status_code == 422 and f"'{OTHER}'" in r.json()["detail"]
    assert snapshot(session, storage) == before and sender.sent == []


def test_a_generation_follows_its_adapters_base(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    _register_other(session)
    adapter = make_adapter(session, storage, t.tenant, base_model=OTHER)
    r = client.post(
        "/v1/generations", headers=t.headers, json={"prompt": "sks", "adapter_id": adapter.id}
    )
    assert r.status_code == 202, r.text
    body = r.json()
    # Its base's native size and queue.
    assert (body["base_model"], body["width"], body["height"]) == (OTHER, 64, 64)
    assert sender.sent[-1] == ("tuneqdm.generate", body["id"], "generate.sd21-8bit")
    # The base's bounds: 128 is twice its native 64, 136 is above.
    r = client.post(
        "/v1/generations",
        headers=t.headers,
        json={"prompt": "sks", "adapter_id": adapter.id, "width": 136, "steps": 2},
    )
    assert r.status_code == 422 and f"for base '{OTHER}'" in r.json()["detail"]

    # An adapter decides its base; naming another one is a contradiction.
    before = snapshot(session, storage)
    r = client.post(
        "/v1/generations",
        headers=t.headers,
        json={"prompt": "sks", "adapter_id": adapter.id, "base": DEFAULT},
    )
    assert r.status_code == 422 and f"trained on base '{OTHER}'" in r.json()["detail"]
    # Without an adapter a generation may name a base; its export goes to that base too.
    r = client.post("/v1/generations", headers=t.headers, json={"prompt": "a", "base": OTHER})
    assert r.status_code == 202 and r.json()["base_model"] == OTHER
    r = client.post(
        f"/v1/adapters/{adapter.id}/exports", headers=t.headers, json={"format": "lora", "rank": 8}
    )
    assert r.status_code == 202, r.text
    assert sender.sent[-1][2] == "generate.sd21-8bit"
    assert snapshot(session, storage).rows["generation_jobs"] == before.rows["generation_jobs"] + 1


def test_an_adapter_of_a_base_no_longer_served_is_409(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant, base_model="retired-base")
    r = client.post(
        "/v1/generations", headers=t.headers, json={"prompt": "sks", "adapter_id": adapter.id}
    )
    assert r.status_code == 409 and "'retired-base', which this service" in r.json()["detail"]
    assert sender.sent == []


def test_bases_list_workers_up_and_queued_jobs(
    client: TestClient, session: Session, settings: Settings, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    _register_other(session, worker="gpu-2:7")
    _register_other(session, worker="gpu-3:8")
    register(
        session,
        BaseInfo(DEFAULT, "/models/fashion-sd", 32, "epsilon", 4),
        worker="gpu-1:5",
        storage_mode="packed",
    )
    session.commit()
    # One worker of OTHER stopped long ago: listed, but not up.
    gone = utcnow() - timedelta(seconds=3 * settings.base_seen_every_s + 5)
    session.execute(
        update(BaseWorker).where(BaseWorker.worker == "gpu-3:8").values(last_seen_at=gone)
    )
    session.commit()
    for _ in range(2):
        make_finetune(session, t.tenant, status="queued", base_model=OTHER)
    make_finetune(session, t.tenant, status="running", base_model=OTHER)
    make_finetune(session, t.tenant, status="queued")
    adapter = make_adapter(session, storage, t.tenant, base_model=OTHER)
    r = client.post(
        "/v1/generations", headers=t.headers, json={"prompt": "sks", "adapter_id": adapter.id}
    )
    assert r.status_code == 202, r.text

    listed = client.get("/v1/bases", headers=t.headers).json()
    by_name = {b["name"]: b for b in listed["data"]}
    assert listed["count"] == 2 and set(by_name) == {DEFAULT, OTHER}
    other, default = by_name[OTHER], by_name[DEFAULT]
    assert (other["bits"], other["native_resolution"], other["storage_mode"]) == (8, 64, "resident")
    assert (default["bits"], default["native_resolution"], default["storage_mode"]) == (
        4,
        32,
        "packed",
    )
    assert (other["default"], default["default"]) == (False, True)
    assert other["workers_up"] == 1 and default["workers_up"] == 1
    assert {w["worker"]: w["up"] for w in other["workers"]} == {"gpu-2:7": True, "gpu-3:8": False}
    assert other["queued"] == {"finetune": 2, "generation": 1}
    assert default["queued"] == {"finetune": 1, "generation": 0}
    assert client.get(f"/v1/bases/{OTHER}", headers=t.headers).json()["queued"] == other["queued"]
    # (the adapter's own fine-tune is the fourth, succeeded)
    rows = session.query(FinetuneJob).filter_by(base_model=OTHER).count()
    assert rows == 4 and session.query(GenerationJob).filter_by(base_model=OTHER).count() == 1


def test_the_migration_gives_existing_finetunes_a_base(new_database: Callable[[], str]) -> None:
    """Before several bases a deployment served one: a fine-tune gets its adapter's base, one
    without an adapter the default base (TUNEQDM_BASE_MODEL as the migration runs)."""
    url = new_database()
    cfg = alembic_config(url)
    command.upgrade(cfg, "0014-1")
    engine = make_engine(url)
    now = utcnow()
    try:
        with engine.begin() as c:
            c.execute(
                text("INSERT INTO tenants (id, name, created_at) VALUES ('tn_1', 'a', :now)"),
                {"now": now},
            )
            for job_id in ("ft_1", "ft_2"):
                c.execute(
                    text(
                        "INSERT INTO finetune_jobs (id, tenant_id, status, instance_prompt, "
                        "token, params, progress_step, progress_total, created_at, updated_at) "
                        "VALUES (:id, 'tn_1', 'succeeded', 'sks', 'sks', '{}', 0, 1, :now, :now)"
                    ),
                    {"id": job_id, "now": now},
                )
            c.execute(
                text(
                    "INSERT INTO adapters (id, tenant_id, finetune_job_id, method, bits, "
                    "intervals, tokens, size_bytes, base_model, base_fingerprint, storage_key, "
                    "created_at) VALUES ('ad_1', 'tn_1', 'ft_1', 'tuneqdm', 8, 1, '[]', 1, "
                    f"'{OTHER}', 'f', 'k', :now)"
                ),
                {"now": now},
            )
        command.upgrade(cfg, "head")
        with engine.connect() as c:
            result = c.execute(text("SELECT id, base_model FROM finetune_jobs"))
            rows = {str(job_id): str(base) for job_id, base in result}
        assert rows == {"ft_1": OTHER, "ft_2": DEFAULT}
    finally:
        engine.dispose()
