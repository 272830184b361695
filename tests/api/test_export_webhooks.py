"""Webhooks of exports at the API: POST .../exports takes webhook_url and webhook_events (the
running and final states); bad ones are 422s naming the field and store nothing; the download's
query form takes neither; a request sharing an export may not name another webhook (409)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import AdapterExport
from app.storage import LocalStorage
from tests.api.factories import RecordingSender, make_adapter, make_tenant
from tests.api.test_bad_input import assert_problem

HOOK = "https://hooks.example.com/tuneqdm"


def test_an_export_stores_and_shows_its_webhook(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    url = f"/v1/adapters/{make_adapter(session, storage, t.tenant).id}/exports"
    body = {"format": "merged", "webhook_url": HOOK, "webhook_events": ["succeeded", "running"]}
    r = client.post(url, json=body, headers=t.headers)
    assert r.status_code == 202, r.text
    assert (r.json()["webhook_url"], r.json()["webhook_events"]) == (HOOK, ["running", "succeeded"])
    row = session.get(AdapterExport, r.json()["id"])
    assert row is not None and row.webhook_events == ["running", "succeeded"]
    # The same request again shares it; another webhook is a conflict naming the field.
    assert client.post(url, json=body, headers=t.headers).status_code == 200
    r = client.post(url, json={"format": "merged"}, headers=t.headers)
    assert r.status_code == 200 and r.json()["webhook_url"] == HOOK
    r = client.post(url, json={"format": "merged", "webhook_url": HOOK + "/b"}, headers=t.headers)
    assert_problem(r, 409)
    assert r.json()["detail"].startswith("webhook_url: ")
    assert "only the request that queued it sets its webhook" in r.json()["detail"]
    r = client.post(url, json={"format": "lora", "rank": 4}, headers=t.headers)
    assert r.json()["webhook_url"] is None
    assert r.json()["webhook_events"] == ["succeeded", "failed", "canceled"]


def test_bad_export_webhooks_are_named_and_nothing_is_stored(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    url = f"/v1/adapters/{adapter.id}/exports"
    body = {"format": "merged", "webhook_url": HOOK}
    for event in ("progress", "samples"):
        r = client.post(url, json=body | {"webhook_events": ["running", event]}, headers=t.headers)
        assert_problem(r, 422)
        assert f"an export has no {event!r} event" in r.json()["detail"]
        assert r.json()["errors"][0]["field"] == "webhook_events[1]"
    r = client.post(url, json=body | {"webhook_events": ["finished"]}, headers=t.headers)
    assert_problem(r, 422)
    assert "unknown event 'finished'" in r.json()["detail"]
    assert r.json()["errors"][0]["field"] == "webhook_events[0]"
    r = client.post(
        url, json={"format": "merged", "webhook_events": ["running"]}, headers=t.headers
    )
    assert_problem(r, 422)
    assert "needs a webhook_url" in r.json()["detail"]
    assert r.json()["errors"][0]["field"] == "webhook_events"
    # The same address checks as a fine-tune's.
    r = client.post(
        url, json={"format": "merged", "webhook_url": "http://127.0.0.1/hook"}, headers=t.headers
    )
    assert_problem(r, 422)
    assert "webhook_url" in r.json()["detail"]
    assert session.scalar(select(func.count()).select_from(AdapterExport)) == 0
    assert sender.sent == []

    # The download's query form names a variant only.
    r = client.get(
        f"/v1/adapters/{adapter.id}/export?format=merged&webhook_url={HOOK}", headers=t.headers
    )
    assert r.status_code == 422 and "webhook_url" in str(r.json()), r.text
