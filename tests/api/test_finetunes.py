"""POST/GET /v1/finetunes, listing, cancel, idempotency and the enqueue after commit."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import FinetuneImage, FinetuneJob, utcnow
from app.queue import base_queue
from app.storage import LocalStorage
from tests.api.factories import (
    RecordingSender,
    image_bytes,
    make_adapter,
    make_finetune,
    make_tenant,
    snapshot,
)
from tests.api.http import Response

DEFAULT = "tuneqdm/fashion-sd"  # make_settings names no other base


def post_finetune(
    client: TestClient,
    headers: dict[str, str],
    *,
    n: int = 2,
    data: dict[str, str] | None = None,
    extra_headers: dict[str, str] | None = None,
) -> Response:
    jpeg = image_bytes(fmt="JPEG")
    files = [("images", (f"../../etc/passwd{i}.jpg", jpeg, "image/jpeg")) for i in range(n)]
    form = {"instance_prompt": "a photo of sks dog"} | (data or {})
    return client.post(
        "/v1/finetunes", headers=headers | (extra_headers or {}), files=files, data=form
    )


def test_create_stores_images_commits_row_then_enqueues(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    r = post_finetune(
        client,
        t.headers,
        n=3,
        data={
            "class_prompt": "a photo of a dog",
            "name": "rex",
            "params": json.dumps({"steps": 50, "seed": 7}),
            "webhook_url": "https://hooks.example.com/tuneqdm",
        },
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["id"].startswith("ft_") and body["status"] == "queued"
    assert body["links"]["self"] == f"/v1/finetunes/{body['id']}"
    assert body["num_images"] == 3 and body["progress"] == {"step": 0, "total": 50}
    assert body["params"]["intervals"] == 1 and body["params"]["method"] == "tuneqdm"
    assert body["webhook_url"] == "https://hooks.example.com/tuneqdm"
    assert sender.sent == [("tuneqdm.finetune", body["id"], base_queue("finetune", DEFAULT))]
    assert body["base_model"] == DEFAULT and body["params"]["bits"] == 4

    rows = list(session.scalars(select(FinetuneImage).order_by(FinetuneImage.index)))
    assert [row.index for row in rows] == [0, 1, 2]
    for row in rows:
        # Server-made keys only; the uploaded "../../etc/passwd0.jpg" names are not used.
        assert row.storage_key.startswith(f"tenants/{t.tenant.id}/finetunes/{body['id']}/")
        assert "passwd" not in row.storage_key
        with Image.open(storage.path(row.storage_key)) as img:
            assert img.format == "JPEG" and img.size == (64, 64)


def test_get_and_progress(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    job = make_finetune(session, t.tenant, status="running", loss=0.25)
    job.progress_step, job.progress_total = 10, 40
    job.started_at = utcnow() - timedelta(seconds=20)
    session.commit()

    body = client.get(f"/v1/finetunes/{job.id}", headers=t.headers).json()
    assert body["status"] == "running" and body["loss"] == 0.25
    assert body["progress"] == {"step": 10, "total": 40}
    assert 50 <= body["eta_seconds"] <= 70  # 2 s/step for the 30 steps left


def test_adapter_link_once_succeeded(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    body = client.get(f"/v1/finetunes/{adapter.finetune_job_id}", headers=t.headers).json()
    assert body["adapter_id"] == adapter.id
    assert body["links"]["adapter"] == f"/v1/adapters/{adapter.id}"


def test_list_paginates_and_filters(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    for status in ["queued", "queued", "running", "failed", "succeeded"]:
        make_finetune(session, t.tenant, status=status)

    page1 = client.get("/v1/finetunes?limit=2", headers=t.headers).json()
    page2 = client.get("/v1/finetunes?limit=2&offset=2", headers=t.headers).json()
    page3 = client.get("/v1/finetunes?limit=2&offset=4", headers=t.headers).json()
    assert page1["count"] == page2["count"] == 5
    ids = [j["id"] for p in (page1, page2, page3) for j in p["data"]]
    assert len(ids) == len(set(ids)) == 5

    queued = client.get("/v1/finetunes?status=queued", headers=t.headers).json()
    assert queued["count"] == 2 and {j["status"] for j in queued["data"]} == {"queued"}
    assert client.get("/v1/finetunes?status=bogus", headers=t.headers).status_code == 422


def test_cancel(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    queued = make_finetune(session, t.tenant, status="queued")
    running = make_finetune(session, t.tenant, status="running")
    done = make_finetune(session, t.tenant, status="succeeded")

    for job in (queued, running):
        r = client.post(f"/v1/finetunes/{job.id}/cancel", headers=t.headers)
        assert r.status_code == 200 and r.json()["status"] == "canceled"
        assert r.json()["finished_at"] is not None

    again = client.post(f"/v1/finetunes/{queued.id}/cancel", headers=t.headers)
    assert again.status_code == 409 and "already canceled" in again.json()["detail"]
    r = client.post(f"/v1/finetunes/{done.id}/cancel", headers=t.headers)
    assert r.status_code == 409 and "already succeeded" in r.json()["detail"]


def test_idempotency_key_returns_the_same_job(
    client: TestClient, session: Session, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    key = {"Idempotency-Key": "order-42"}
    first = post_finetune(client, t.headers, extra_headers=key)
    second = post_finetune(client, t.headers, extra_headers=key)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert len(sender.sent) == 1
    assert len(list(session.scalars(select(FinetuneJob)))) == 1

    # The same key from another tenant is another tenant's business.
    other = make_tenant(session)
    third = post_finetune(client, other.headers, extra_headers=key)
    assert third.json()["id"] != first.json()["id"]


def test_params_defaults_per_method(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    r = post_finetune(client, t.headers, data={"params": json.dumps({"method": "peqa"})})
    assert r.status_code == 202, r.text
    assert r.json()["params"]["intervals"] == 1
    # resolution: the base's native size (the built-in model's 32 px), stored resolved.
    assert r.json()["params"]["steps"] == 300 and r.json()["params"]["resolution"] == 32


def test_enqueue_failure_leaves_nothing(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    before = snapshot(session, storage)
    sender.fail = True
    r = post_finetune(client, t.headers)
    assert r.status_code == 503 and "nothing was stored" in r.json()["detail"]
    assert snapshot(session, storage) == before


def test_identifier_token_can_be_renamed_or_not_required(
    client: TestClient, session: Session
) -> None:
    t = make_tenant(session)
    r = post_finetune(
        client, t.headers, data={"instance_prompt": "a photo of zwx cat", "token": "zwx"}
    )
    assert r.status_code == 202, r.text
    client.app.state.settings.require_identifier_token = False  # type: ignore[attr-defined]
    r = post_finetune(client, t.headers, data={"instance_prompt": "a photo of my cat"})
    assert r.status_code == 202, r.text


def test_private_webhook_allowed_by_setting(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    client.app.state.settings.allow_private_webhooks = True  # type: ignore[attr-defined]
    client.app.state.settings.webhook_ports = [9000]  # type: ignore[attr-defined]
    r = post_finetune(client, t.headers, data={"webhook_url": "http://127.0.0.1:9000/hook"})
    assert r.status_code == 202, r.text


def test_exif_rotation_is_applied_before_reencoding(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write it
    buf = io.BytesIO()
    Image.new("RGB", (64, 32)).save(buf, format="JPEG", exif=exif)
    r = client.post(
        "/v1/finetunes",
        headers=t.headers,
        files=[("images", ("p.jpg", buf.getvalue(), "image/jpeg"))],
        data={"instance_prompt": "a photo of sks dog"},
    )
    assert r.status_code == 202, r.text
    row = session.scalars(select(FinetuneImage)).one()
    assert (row.width, row.height) == (32, 64)
    with Image.open(storage.path(row.storage_key)) as img:
        assert img.size == (32, 64)


def test_idempotency_race_loser_returns_winner_and_removes_its_files(
    client: TestClient,
    session: Session,
    storage: LocalStorage,
    sender: RecordingSender,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two requests with one key pass the lookup together; the unique constraint decides."""
    from app.services import finetunes

    t = make_tenant(session)
    key = {"Idempotency-Key": "race"}
    first = post_finetune(client, t.headers, extra_headers=key).json()
    before = snapshot(session, storage)

    real_lookup = finetunes._replay
    calls: list[object] = []

    def lookup(*args: object, **kwargs: object) -> object:
        # The first lookup misses, as it would for a request running alongside the winner.
        calls.append(args)
        return None if len(calls) == 1 else real_lookup(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(finetunes, "_replay", lookup)
    second = post_finetune(client, t.headers, extra_headers=key)
    assert second.status_code == 202 and second.json()["id"] == first["id"]
    assert len(calls) == 2  # the miss, then the lookup after the unique constraint fired
    assert snapshot(session, storage) == before  # the loser's files are gone
    assert len(sender.sent) == 1
