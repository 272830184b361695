"""`webhook_events` at submit: unknown events and events a kind does not have are 422s naming
them; the choice is stored in a fixed order and shown, the default being the final states."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import FinetuneJob, GenerationJob
from app.storage import LocalStorage
from tests.api.factories import image_bytes, make_tenant, snapshot
from tests.api.test_bad_input import assert_problem

HOOK = "https://hooks.example.com/tuneqdm"
PNG = image_bytes(64, 64)


def _finetune(client: TestClient, headers: dict[str, str], **data: object):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/finetunes",
        headers=headers,
        files=[("images", ("a.png", PNG, "image/png"))],
        data={"instance_prompt": "a photo of sks dog", **data},
    )


def test_a_finetune_stores_the_events_it_asks_for(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    r = _finetune(
        client, t.headers, webhook_url=HOOK, webhook_events=["succeeded", "progress", "running"]
    )
    assert r.status_code == 202, r.text
    assert r.json()["webhook_events"] == ["running", "progress", "succeeded"]
    job = session.get(FinetuneJob, r.json()["id"])
    assert job is not None and job.webhook_events == ["running", "progress", "succeeded"]
    r = _finetune(client, t.headers, webhook_url=HOOK)
    assert r.json()["webhook_events"] == ["succeeded", "failed", "canceled"]
    assert session.get(FinetuneJob, r.json()["id"]).webhook_events is None  # type: ignore[union-attr]


def test_bad_finetune_events_are_named_and_nothing_is_stored(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    before = snapshot(session, storage)
    r = _finetune(client, t.headers, webhook_url=HOOK, webhook_events=["running", "finished"])
    assert_problem(r, 422)
    assert "'finished'" in r.json()["detail"]
    assert r.json()["errors"][0]["field"] == "webhook_events[1]"
    r = _finetune(client, t.headers, webhook_events=["running"])
    assert_problem(r, 422)
    assert "webhook_url" in r.json()["detail"]
    assert snapshot(session, storage) == before


def test_generations_take_only_their_own_events(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    body = {"prompt": "a red apple", "steps": 10, "webhook_url": HOOK}
    for event in ("samples", "progress"):
        r = client.post(
            "/v1/generations", headers=t.headers, json=body | {"webhook_events": [event]}
        )
        assert_problem(r, 422)
        assert f"no {event!r} event" in r.json()["detail"]
        assert r.json()["errors"][0]["field"] == "webhook_events[0]"
    r = client.post("/v1/generations", headers=t.headers, json=body | {"webhook_events": ["x"]})
    assert_problem(r, 422)
    assert "unknown event 'x'" in r.json()["detail"]
    assert session.query(GenerationJob).count() == 0
    r = client.post(
        "/v1/generations",
        headers=t.headers,
        json=body | {"webhook_events": ["failed", "running", "running"]},
    )
    assert r.status_code == 202, r.text
    assert r.json()["webhook_events"] == ["running", "failed"]
