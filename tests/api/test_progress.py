"""GET /v1/finetunes/{id}/samples and /events: the progress images and the event log, read
through the tenant's own job; the event cursor neither repeats nor skips an event."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session

from app.events import record_event
from app.models import EVENT_TYPES, FinetuneEvent, FinetuneSample
from app.schemas import EventType
from app.settings import Settings
from app.storage import LocalStorage, finetune_sample_key
from tests.api.factories import TenantKey, image_bytes, make_finetune, make_tenant
from tests.api.test_finetunes import post_finetune


def _use(client: TestClient, settings: Settings, **values: Any) -> None:
    client.app.state.settings = Settings(**{**settings.model_dump(), **values})  # type: ignore[attr-defined]


def test_event_types_are_one_list() -> None:
    assert EventType.__args__ == EVENT_TYPES  # type: ignore[attr-defined]


def test_submitted_params_and_the_queued_event(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    params = {"steps": 40, "validation_prompts": [" a photo of sks dog ", "sks dog, oil"]}
    r = post_finetune(client, t.headers, data={"params": json.dumps(params)})
    assert r.status_code == 202, r.text
    body = r.json()
    # Stored stripped, with the default sample_every resolved (a quarter of the steps).
    assert body["params"]["validation_prompts"] == ["a photo of sks dog", "sks dog, oil"]
    assert body["params"]["sample_every"] == 10
    r = client.get(f"/v1/finetunes/{body['id']}/events", headers=t.headers)
    assert r.status_code == 200, r.text
    assert [e["type"] for e in r.json()["data"]] == ["queued"]
    assert r.json()["has_more"] is False
    assert client.get(f"/v1/finetunes/{body['id']}/samples", headers=t.headers).json() == {
        "data": [],
        "count": 0,
    }


def test_event_pages_are_stable_without_repeats_or_gaps(
    client: TestClient, session: Session, settings: Settings
) -> None:
    t = make_tenant(session)
    other = make_tenant(session)
    job = make_finetune(session, t.tenant, status="running")
    for step in range(1, 8):
        record_event(session, job.id, "progress", step=step, total=9, loss=0.1)
        session.commit()
    _use(client, settings, max_page_size=3)
    url = f"/v1/finetunes/{job.id}/events"

    def pages(cursor: str | None) -> tuple[list[int], str]:
        seen: list[int] = []
        while True:
            query = {"limit": 1000} | ({"cursor": cursor} if cursor else {})
            r = client.get(url, headers=t.headers, params=query)
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["data"]) <= 3  # limit is bounded by TUNEQDM_MAX_PAGE_SIZE
            seen += [e["data"]["step"] for e in body["data"]]
            cursor = body["next_cursor"]
            if not body["has_more"]:
                return seen, body["next_cursor"]

    first, cursor = pages(None)
    assert first == [1, 2, 3, 4, 5, 6, 7]
    again, _ = pages(None)
    assert again == first  # the same pages when read again
    # Polling with the last cursor returns only what happened since, then nothing.
    for step in (8, 9):
        record_event(session, job.id, "progress", step=step, total=9, loss=0.1)
        session.commit()
    newer, cursor = pages(cursor)
    assert newer == [8, 9]
    r = client.get(url, headers=t.headers, params={"cursor": cursor})
    assert r.json()["data"] == [] and r.json()["next_cursor"] == cursor

    # Another tenant: 404 for the job, whatever the cursor.
    assert client.get(url, headers=other.headers).status_code == 404
    assert client.get(url, headers=other.headers, params={"cursor": cursor}).status_code == 404
    for bad in ("not-a-cursor", "ZXYx", "-1"):
        r = client.get(url, headers=t.headers, params={"cursor": bad})
        assert r.status_code == 422 and "cursor" in r.text, (bad, r.text)


def test_samples_list_and_png_are_tenant_scoped(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    other = make_tenant(session)
    job = make_finetune(session, t.tenant, status="running")
    for step in (5, 10):
        for i, prompt in enumerate(["sks dog", "sks dog, oil"]):
            key = finetune_sample_key(t.tenant.id, job.id, step, i)
            data = image_bytes(32, 32, color="blue" if i else "red")
            storage.put(key, data)
            session.add(
                FinetuneSample(
                    job_id=job.id,
                    step=step,
                    prompt_index=i,
                    prompt=prompt,
                    seed=i,
                    storage_key=key,
                    size_bytes=len(data),
                )
            )
    session.commit()
    r = client.get(f"/v1/finetunes/{job.id}/samples", headers=t.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 4
    assert [(s["step"], s["prompt_index"], s["seed"]) for s in body["data"]] == [
        (5, 0, 0),
        (5, 1, 1),
        (10, 0, 0),
        (10, 1, 1),
    ]
    url = body["data"][3]["url"]
    assert url == f"/v1/finetunes/{job.id}/samples/10/1"
    r = client.get(url, headers=t.headers)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).getpixel((0, 0)) == (0, 0, 255)
    assert client.get(url, headers=other.headers).status_code == 404
    assert client.get(f"/v1/finetunes/{job.id}/samples", headers=other.headers).status_code == 404
    r = client.get(f"/v1/finetunes/{job.id}/samples/7/0", headers=t.headers)
    assert r.status_code == 404 and "no progress image" in r.text

    # Deleting the fine-tune deletes its progress images and events.
    job_id = job.id
    record_event(session, job_id, "samples", step=10, prompt_indexes=[0, 1])
    session.commit()
    assert client.delete(f"/v1/finetunes/{job_id}", headers=t.headers).status_code == 204
    session.expire_all()
    assert session.query(FinetuneSample).filter_by(job_id=job_id).count() == 0
    assert session.query(FinetuneEvent).filter_by(job_id=job_id).count() == 0
    assert not (storage.root / "tenants" / t.tenant.id / "samples").exists()


def test_an_event_cursor_is_bound_to_its_tenant_and_job_and_reveals_no_global_id(
    client: TestClient, session: Session, settings: Settings
) -> None:
    """A cursor held the service-wide event id (base64 of "ev1:<id>"), told how busy the whole
    service was, and was accepted on any job; now it is signed for its (tenant, job)."""
    t, other = make_tenant(session), make_tenant(session)
    a = make_finetune(session, t.tenant, status="running")
    b = make_finetune(session, t.tenant, status="running")
    foreign = make_finetune(session, other.tenant, status="running")
    for job in (foreign, b, a):
        for step in range(1, 4):
            record_event(session, job.id, "progress", step=step, total=9, loss=0.1)
        session.commit()

    def page(job_id: str, key: TenantKey, cursor: str | None = None) -> Any:
        query = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        return client.get(f"/v1/finetunes/{job_id}/events", headers=key.headers, params=query)

    first = page(a.id, t).json()
    cursor = first["next_cursor"]
    ids = [e.id for e in session.query(FinetuneEvent).order_by(FinetuneEvent.id)]
    decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    assert f"ev1:{ids[-2]}".encode() not in decoded
    # Whatever else happens in the service, the cursor after a's first two events is the same.
    for step in range(50):
        record_event(session, b.id, "progress", step=step, total=99, loss=0.1)
    session.commit()
    assert page(a.id, t).json()["next_cursor"] == cursor
    assert [e["data"]["step"] for e in page(a.id, t, cursor).json()["data"]] == [3]
    # Job B of the same tenant, and another tenant's job with that tenant's own key.
    for job_id, key in ((b.id, t), (foreign.id, other)):
        r = page(job_id, key, cursor)
        assert r.status_code == 422, r.text
        assert "not valid for this fine-tune" in r.json()["detail"]
    # A cursor of the other tenant's job, on this tenant's job.
    theirs = page(foreign.id, other).json()["next_cursor"]
    assert page(a.id, t, theirs).status_code == 422
    # Tampered: the count changed, the signature kept.
    raw = bytearray(decoded)
    raw[7] ^= 1
    forged = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    assert page(a.id, t, forged).status_code == 422
    # The old format, pointing at a global id.
    old = base64.urlsafe_b64encode(f"ev1:{ids[0]}".encode()).decode().rstrip("=")
    assert page(a.id, t, old).status_code == 422
