"""POST /v1/adapters/{id}/exports, GET .../exports and GET .../export: asking a worker for a
LoRA or a merged UNet, and downloading it once made (the worker side: tests/worker/)."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app import storage as st
from app.models import AdapterExport, utcnow
from app.queue import EXPORT_TASK, GENERATE_QUEUE, base_queue
from app.storage import LocalStorage
from tests.api.factories import RecordingSender, make_adapter, make_tenant


def _finish(session: Session, storage: LocalStorage, export_id: str, content: bytes) -> None:
    """What the worker does when an export succeeds."""
    row = session.get(AdapterExport, export_id)
    assert row is not None
    key = st.export_key(row.tenant_id, row.id)
    storage.put(key, content)
    row.status, row.storage_key, row.size_bytes = "succeeded", key, len(content)
    session.commit()


def test_ask_poll_download(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    url = f"/v1/adapters/{adapter.id}"
    download = f"{url}/export?format=lora&rank=16"

    r = client.get(download, headers=t.headers)
    assert r.status_code == 404 and f"POST /v1/adapters/{adapter.id}/exports" in r.json()["detail"]

    r = client.post(f"{url}/exports", json={"format": "lora", "rank": 16}, headers=t.headers)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["format"], body["rank"], body["interval"], body["status"]) == (
        "lora",
        16,
        "mean",
        "queued",
    )
    assert body["links"]["file"] == f"{url}/export?format=lora&interval=mean&rank=16"
    assert sender.sent == [
        (EXPORT_TASK, body["id"], base_queue(GENERATE_QUEUE, adapter.base_model))
    ]

    # Asking again for the same variant is the same export, not a second job; while it is
    # queued its message is sent once more (the first may be lost with a broker restarted
    # empty; a message too many finds nothing to claim).
    again = client.post(f"{url}/exports", json={"format": "lora", "rank": 16}, headers=t.headers)
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert again.json()["attempts"] == 0
    assert (
        sender.sent
        == [(EXPORT_TASK, body["id"], base_queue(GENERATE_QUEUE, adapter.base_model))] * 2
    )

    r = client.get(download, headers=t.headers)
    assert r.status_code == 409 and "is queued" in r.json()["detail"]

    _finish(session, storage, body["id"], b"lora bytes" * 1000)
    r = client.get(body["links"]["file"], headers=t.headers)
    assert r.status_code == 200 and r.content == b"lora bytes" * 1000
    assert f"{adapter.id}-lora-r16-mean.safetensors" in r.headers["content-disposition"]

    merged = client.post(f"{url}/exports", json={"format": "merged"}, headers=t.headers).json()
    listing = client.get(f"{url}/exports", headers=t.headers).json()
    assert listing["count"] == 2
    assert [(e["id"], e["status"]) for e in listing["data"]] == [
        (body["id"], "succeeded"),
        (merged["id"], "queued"),
    ]


def test_a_failed_export_says_why_and_runs_again_when_asked(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    url = f"/v1/adapters/{adapter.id}"
    first = client.post(f"{url}/exports", json={"format": "merged"}, headers=t.headers).json()
    row = session.get(AdapterExport, first["id"])
    assert row is not None
    row.status, row.error = "failed", "the GPU ran out of memory while running the export"
    session.commit()

    r = client.get(f"{url}/export?format=merged", headers=t.headers)
    assert r.status_code == 409 and "ran out of memory" in r.json()["detail"]
    again = client.post(f"{url}/exports", json={"format": "merged"}, headers=t.headers)
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    assert again.json()["status"] == "queued" and again.json()["error"] is None
    assert [object_id for _, object_id, _ in sender.sent] == [first["id"], first["id"]]

    # Running: its worker's, whatever its age (a dead worker's stale lease is given back by
    # the workers' sweep, worker/jobs.py), so asking again sends nothing.
    session.expire_all()
    row = session.get(AdapterExport, first["id"])
    assert row is not None
    row.status = "running"
    row.updated_at = utcnow() - timedelta(hours=1)
    session.commit()
    running = client.post(f"{url}/exports", json={"format": "merged"}, headers=t.headers)
    assert running.status_code == 200 and running.json()["status"] == "running"
    assert len(sender.sent) == 2


def test_an_export_can_be_canceled_and_asked_for_again(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    other = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    url = f"/v1/adapters/{adapter.id}"
    made = client.post(f"{url}/exports", json={"format": "merged"}, headers=t.headers).json()
    cancel = f"{url}/exports/{made['id']}/cancel"
    assert client.post(cancel, headers=other.headers).status_code == 404
    assert client.post(f"{url}/exports/exp_nope/cancel", headers=t.headers).status_code == 404
    r = client.post(cancel, headers=t.headers)
    assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
    assert r.json()["finished_at"] is not None
    r = client.post(cancel, headers=t.headers)
    assert r.status_code == 409 and "already canceled" in r.json()["detail"]
    listing = client.get(f"{url}/exports", headers=t.headers).json()["data"]
    assert [(e["status"], e["attempts"]) for e in listing] == [("canceled", 0)]
    r = client.get(f"{url}/export?format=merged", headers=t.headers)
    assert r.status_code == 409 and "is canceled" in r.json()["detail"]
    again = client.post(f"{url}/exports", json={"format": "merged"}, headers=t.headers)
    assert again.status_code == 202 and again.json()["status"] == "queued"
    assert len(sender.sent) == 2


def test_bad_requests_say_what_to_fix_and_store_nothing(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    other = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)  # 2 intervals
    url = f"/v1/adapters/{adapter.id}/exports"
    cases = [
        ({"format": "lora"}, "format=lora needs either rank (e.g. 16) or max_relative_error"),
        ({"format": "lora-kohya", "rank": 4, "max_relative_error": 0.05}, "not both"),
        ({"format": "merged", "rank": 4}, "apply to LoRA formats only"),
        ({"format": "merged-checkpoint", "max_relative_error": 0.1}, "LoRA formats only"),
        ({"format": "lora", "max_relative_error": 1.5}, "max_relative_error"),
        ({"format": "lora", "rank": 129}, "above this service's largest export rank (128"),
        ({"format": "lora", "rank": 4, "interval": "2"}, "this adapter has 2 interval(s)"),
        ({"format": "lora", "rank": 4, "interval": "last"}, "interval must be 'mean' or an"),
        ({"format": "onnx"}, "format"),
        ({"format": "lora", "rank": 0}, "rank"),
    ]
    for payload, message in cases:
        r = client.post(url, json=payload, headers=t.headers)
        assert r.status_code == 422, payload
        assert message in str(r.json()["detail"]), (payload, r.json())
    r = client.post(url, json={"format": "merged"}, headers=other.headers)
    assert r.status_code == 404
    r = client.get(f"/v1/adapters/{adapter.id}/export?format=lora", headers=t.headers)
    assert r.status_code == 422 and "needs either rank" in str(r.json()["detail"])

    sender.fail = True
    r = client.post(url, json={"format": "merged"}, headers=t.headers)
    assert r.status_code == 503 and "nothing was stored" in r.json()["detail"]
    assert session.scalar(select(func.count()).select_from(AdapterExport)) == 0
    assert sender.sent == []


def test_deleting_the_adapter_deletes_its_exports(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    url = f"/v1/adapters/{adapter.id}"
    made = client.post(f"{url}/exports", json={"format": "lora", "rank": 2}, headers=t.headers)
    _finish(session, storage, made.json()["id"], b"x")
    key = st.export_key(t.tenant.id, made.json()["id"])
    assert storage.exists(key)

    assert client.delete(url, headers=t.headers).status_code == 204
    assert not storage.exists(key)
    session.expire_all()
    assert session.scalar(select(func.count()).select_from(AdapterExport)) == 0
    assert client.get(f"{url}/exports", headers=t.headers).status_code == 404


def test_a_lora_by_max_relative_error_and_the_warning_of_a_lossy_rank(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    url = f"/v1/adapters/{adapter.id}"
    r = client.post(
        f"{url}/exports", json={"format": "lora", "max_relative_error": 0.05}, headers=t.headers
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["rank"], body["max_relative_error"], body["warnings"]) == (None, 0.05, [])
    assert (
        body["links"]["file"] == f"{url}/export?format=lora&interval=mean&max_relative_error=0.05"
    )
    # Another bound is another export; the same bound the same one.
    other = client.post(
        f"{url}/exports", json={"format": "lora", "max_relative_error": 0.1}, headers=t.headers
    )
    assert other.status_code == 202 and other.json()["id"] != body["id"]

    lossy = client.post(f"{url}/exports", json={"format": "lora", "rank": 16}, headers=t.headers)
    session.execute(
        update(AdapterExport)
        .where(AdapterExport.id == lossy.json()["id"])
        .values(status="succeeded", relative_error=0.81)
    )
    session.commit()
    listed = {e["id"]: e for e in client.get(f"{url}/exports", headers=t.headers).json()["data"]}
    warning = listed[lossy.json()["id"]]["warnings"]
    assert len(warning) == 1 and "relative error of 0.810" in warning[0]
    assert listed[body["id"]]["warnings"] == []


def test_every_format_is_stored(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    """The format column and its CHECK constraint take every format the API accepts (the
    kohya and merged-checkpoint formats were refused by the database at insert)."""
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    url = f"/v1/adapters/{adapter.id}"
    asked: list[dict[str, object]] = [
        {"format": "lora", "rank": 4},
        {"format": "lora-kohya", "rank": 4},
        {"format": "lora-kohya", "max_relative_error": 0.05},
        {"format": "merged"},
        {"format": "merged-checkpoint"},
    ]
    for body in asked:
        r = client.post(f"{url}/exports", json=body, headers=t.headers)
        assert r.status_code == 202, (body, r.text)
        assert r.json()["format"] == body["format"]
    stored = session.scalars(
        select(AdapterExport.format).where(AdapterExport.adapter_id == adapter.id)
    ).all()
    assert sorted(stored) == sorted(str(b["format"]) for b in asked)
