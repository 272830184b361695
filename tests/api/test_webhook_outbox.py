"""The API's side of webhooks: cancel writes the delivery row in its own transaction, the job
shows its delivery state, generations take a webhook_url."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import outbox
from app.ids import new_id
from app.models import FinetuneJob, WebhookDelivery, utcnow
from app.services.finetunes import cancel_finetune
from app.storage import LocalStorage
from tests.api.factories import make_finetune, make_generation, make_tenant

HOOK = "https://hooks.example.com/tuneqdm"


def test_cancel_writes_the_delivery_with_the_canceled_state(
    client: TestClient, session: Session
) -> None:
    t = make_tenant(session)
    job = make_finetune(session, t.tenant, status="running", webhook_url=HOOK)
    r = client.post(f"/v1/finetunes/{job.id}/cancel", headers=t.headers)
    assert r.status_code == 200, r.text
    webhook = r.json()["webhook"]
    assert webhook["status"] == "pending" and webhook["attempts"] == 0
    assert webhook["event"] == "finetune.canceled" and webhook["last_error"] is None
    row = session.scalars(select(WebhookDelivery)).one()
    assert (row.job_id, row.job_kind, row.tenant_id, row.url) == (
        job.id,
        "finetune",
        t.tenant.id,
        HOOK,
    )
    assert row.id == webhook["id"] and row.id.startswith("msg_")
    assert row.payload["type"] == "finetune.canceled"
    assert row.payload["data"]["id"] == job.id and row.payload["data"]["status"] == "canceled"
    assert client.get(f"/v1/finetunes/{job.id}", headers=t.headers).json()["webhook"] == webhook

    # A job without webhook_url gets no row, and shows webhook: null.
    plain = make_finetune(session, t.tenant, status="queued")
    r = client.post(f"/v1/finetunes/{plain.id}/cancel", headers=t.headers)
    assert r.status_code == 200 and r.json()["webhook"] is None
    assert len(session.scalars(select(WebhookDelivery)).all()) == 1


def test_cancel_and_its_delivery_commit_together(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the delivery row cannot be written, the cancel does not happen either."""
    t = make_tenant(session)
    job = make_finetune(session, t.tenant, status="queued", webhook_url=HOOK)
    taken = new_id("msg")
    session.add(
        WebhookDelivery(
            id=taken,
            tenant_id=t.tenant.id,
            job_kind="finetune",
            job_id=new_id("ft"),
            url=HOOK,
            event="finetune.succeeded",
            payload={},
            status="delivered",
            attempts=1,
            next_attempt_at=utcnow(),
        )
    )
    session.commit()
    # The outbox insert reuses that row's id, so it violates the primary key.
    monkeypatch.setattr(outbox, "new_id", lambda prefix: taken)
    with pytest.raises(IntegrityError):
        cancel_finetune(session=session, tenant=t.tenant, finetune_id=job.id)
    session.rollback()
    session.expire_all()
    assert session.get(FinetuneJob, job.id).status == "queued"  # type: ignore[union-attr]


def test_generations_take_a_checked_webhook_url(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    body = {"prompt": "a red apple", "steps": 10, "webhook_url": HOOK}
    r = client.post("/v1/generations", headers=t.headers, json=body)
    assert r.status_code == 202, r.text
    assert r.json()["webhook_url"] == HOOK and r.json()["webhook"] is None
    for url, expect in (
        ("http://[64:ff9b::a00:1]/hook", "private"),
        ("https://hooks.example.com:8443/", "port 8443"),
        ("ftp://hooks.example.com/", "http"),
    ):
        r = client.post("/v1/generations", headers=t.headers, json=body | {"webhook_url": url})
        assert r.status_code == 422 and expect in r.json()["detail"], r.text
    gen = make_generation(session, storage, t.tenant)
    assert client.get(f"/v1/generations/{gen.id}", headers=t.headers).json()["webhook"] is None
