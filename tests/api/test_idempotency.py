"""Idempotency-Key: bound to the request's fingerprint, expiring, on fine-tunes and generations,
and one job for concurrent requests with one key (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.errors import Conflict
from app.models import FinetuneJob, GenerationJob, utcnow
from app.schemas import GenerationCreate
from app.services.finetunes import FinetuneForm, Upload, create_finetune
from app.services.generations import create_generation
from app.settings import Settings
from app.storage import LocalStorage
from tests.api.factories import RecordingSender, image_bytes, make_tenant, snapshot
from tests.api.http import Response


def _post(
    client: TestClient,
    headers: dict[str, str],
    key: str,
    *,
    data: dict[str, str] | None = None,
    photos: tuple[str, ...] = ("red", "blue"),
) -> Response:
    files = [
        ("images", (f"{i}.png", image_bytes(color=c), "image/png")) for i, c in enumerate(photos)
    ]
    form = {"instance_prompt": "a photo of sks dog", "params": '{"steps": 10}'} | (data or {})
    return client.post(
        "/v1/finetunes", headers=headers | {"Idempotency-Key": key}, files=files, data=form
    )


def test_same_key_other_request_answers_409_and_stores_nothing(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    first = _post(client, t.headers, "k1")
    assert first.status_code == 202, first.text
    # The same request again (JSON spacing and key order do not count): the same job.
    again = _post(client, t.headers, "k1", data={"params": '{ "steps" : 10 }'})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    before = snapshot(session, storage)
    for change in (
        {"data": {"instance_prompt": "a photo of sks cat"}},
        {"data": {"params": '{"steps": 5000}'}},
        {"data": {"class_prompt": "a photo of a dog"}},
        {"photos": ("red", "green")},
        {"photos": ("red",)},
    ):
        r = _post(client, t.headers, "k1", **change)
        assert r.status_code == 409, (change, r.text)
        detail = r.json()["detail"]
        assert "different request" in detail and first.json()["id"] in detail, detail
        assert "new key" in detail
    assert snapshot(session, storage) == before
    assert len(sender.sent) == 1


def test_keys_expire(client: TestClient, session: Session, settings: Settings) -> None:
    t = make_tenant(session)
    first = _post(client, t.headers, "daily").json()
    # A day later the key is free again, for the same request or another one.
    session.execute(
        update(FinetuneJob)
        .where(FinetuneJob.id == first["id"])
        .values(created_at=utcnow() - timedelta(seconds=settings.idempotency_ttl_s + 60))
    )
    session.commit()
    second = _post(client, t.headers, "daily", data={"instance_prompt": "a photo of sks cat"})
    assert second.status_code == 202 and second.json()["id"] != first["id"]
    third = _post(client, t.headers, "daily", data={"instance_prompt": "a photo of sks cat"})
    assert third.json()["id"] == second.json()["id"]
    session.expire_all()
    old = session.get(FinetuneJob, first["id"])
    assert old is not None and old.idempotency_key is None  # the old job stays, keyless


def test_generations_take_a_key(
    client: TestClient, session: Session, sender: RecordingSender, settings: Settings
) -> None:
    t = make_tenant(session)
    headers = t.headers | {"Idempotency-Key": "gen-1"}
    body = {"prompt": "a red apple", "steps": 10}
    first = client.post("/v1/generations", headers=headers, json=body)
    assert first.status_code == 202, first.text
    # Omitting a default or sending it is the same request.
    same = client.post("/v1/generations", headers=headers, json=body | {"num_images": 1})
    assert same.status_code == 202 and same.json()["id"] == first.json()["id"]
    other = client.post("/v1/generations", headers=headers, json=body | {"steps": 20})
    assert other.status_code == 409 and "different request" in other.json()["detail"]
    assert len(sender.sent) == 1
    # Another tenant's identical key is its own.
    u = make_tenant(session)
    theirs = client.post(
        "/v1/generations", headers=u.headers | {"Idempotency-Key": "gen-1"}, json=body
    )
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
    bad = client.post(
        "/v1/generations", headers=t.headers | {"Idempotency-Key": "x" * 300}, json=body
    )
    assert bad.status_code == 422 and "Idempotency-Key" in bad.json()["detail"]


def _race(calls: list[Callable[[], str]]) -> list[Any]:
    """One thread per call, released together; returns their job ids or exceptions."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_concurrent_requests_with_one_key_make_one_job(
    session_factory: sessionmaker[Session],
    session: Session,
    settings: Settings,
    storage: LocalStorage,
) -> None:
    t = make_tenant(session)
    sender = RecordingSender()

    def generation(prompt: str, key: str = "same") -> Callable[[], str]:
        def call() -> str:
            with session_factory() as s:
                return create_generation(
                    session=s,
                    sender=sender,
                    settings=settings,
                    tenant=s.merge(t.tenant),
                    data=GenerationCreate(prompt=prompt, steps=10),
                    idempotency_key=key,
                ).id

        return call

    ids = _race([generation("a red apple")] * 4)
    assert all(isinstance(i, str) for i in ids), ids
    assert len(set(ids)) == 1
    count = session.scalar(select(func.count()).select_from(GenerationJob))
    assert count == 1 and len(sender.sent) == 1

    def finetune() -> str:
        with session_factory() as s:
            return create_finetune(
                session=s,
                storage=storage,
                sender=sender,
                settings=settings,
                tenant=s.merge(t.tenant),
                form=FinetuneForm(
                    instance_prompt="a photo of sks dog", params="{}", idempotency_key="same"
                ),
                uploads=[Upload("a.png", io.BytesIO(image_bytes()))],
            ).id

    ids = _race([finetune] * 4)
    assert all(isinstance(i, str) for i in ids), ids
    assert len(set(ids)) == 1
    assert session.scalar(select(func.count()).select_from(FinetuneJob)) == 1
    # Only the winner's photo is stored; the losers removed theirs.
    assert len([p for p in storage.root.rglob("*") if p.is_file()]) == 1

    # Concurrent requests with one key but two bodies: one job; the requests with its body
    # get it, the others 409.
    results = _race([generation("a green pear", "mixed"), generation("a blue plum", "mixed")] * 2)
    winners = {r for r in results if isinstance(r, str)}
    assert len(winners) == 1, results
    job = session.get(GenerationJob, winners.pop())
    assert job is not None
    for i, result in enumerate(results):
        mine = "a green pear" if i % 2 == 0 else "a blue plum"
        if mine == job.prompt:
            assert result == job.id
        else:
            assert isinstance(result, Conflict), result
