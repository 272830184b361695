"""POST/GET /v1/generations and the generated PNGs."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.queue import base_queue
from app.storage import LocalStorage
from tests.api.factories import (
    RecordingSender,
    make_adapter,
    make_generation,
    make_tenant,
    snapshot,
)

DEFAULT = "tuneqdm/fashion-sd"  # make_settings names no other base


def test_create_on_base_model(
    client: TestClient, session: Session, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    r = client.post("/v1/generations", headers=t.headers, json={"prompt": "a red apple"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["id"].startswith("gen_") and body["status"] == "queued"
    assert body["adapter_id"] is None and body["images"] == []
    # The server picks a seed when none is given, so the result is reproducible later.
    assert isinstance(body["seed"], int)
    # No size given: the base's native size (the built-in model's 32 px, GET /v1/bases).
    assert (body["width"], body["height"], body["scheduler"]) == (32, 32, "ddim")
    assert sender.sent == [("tuneqdm.generate", body["id"], base_queue("generate", DEFAULT))]


def test_create_with_adapter(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    payload = {
        "adapter_id": adapter.id,
        "prompt": "a photo of sks dog on the beach",
        "negative_prompt": "blurry",
        "num_images": 2,
        "steps": 20,
        "guidance_scale": 5.0,
        "seed": 123,
        "width": 48,
        "height": 64,
        "scheduler": "dpmsolver++",
    }
    r = client.post("/v1/generations", headers=t.headers, json=payload)
    assert r.status_code == 202, r.text
    body = r.json()
    for k, v in payload.items():
        assert body[k] == v
    got = client.get(f"/v1/generations/{body['id']}", headers=t.headers).json()
    assert got["id"] == body["id"] and got["links"]["adapter"] == f"/v1/adapters/{adapter.id}"


def test_images_with_seeds_and_png(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    gen = make_generation(session, storage, t.tenant, images=2)
    body = client.get(f"/v1/generations/{gen.id}", headers=t.headers).json()
    assert body["status"] == "succeeded"
    assert body["images"] == [
        {"index": 0, "seed": 42, "base": False, "url": f"/v1/generations/{gen.id}/images/0"},
        {"index": 1, "seed": 43, "base": False, "url": f"/v1/generations/{gen.id}/images/1"},
    ]
    r = client.get(f"/v1/generations/{gen.id}/images/1", headers=t.headers)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG")
    r = client.get(f"/v1/generations/{gen.id}/images/2", headers=t.headers)
    assert r.status_code == 404 and "has no image 2" in r.json()["detail"]


def test_image_not_ready_yet(client: TestClient, session: Session, storage: LocalStorage) -> None:
    t = make_tenant(session)
    gen = make_generation(session, storage, t.tenant, images=0)
    r = client.get(f"/v1/generations/{gen.id}/images/0", headers=t.headers)
    assert r.status_code == 404 and "status queued" in r.json()["detail"]


def test_enqueue_failure_leaves_no_row(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    before = snapshot(session, storage)
    sender.fail = True
    r = client.post("/v1/generations", headers=t.headers, json={"prompt": "x"})
    assert r.status_code == 503 and "retry" in r.json()["detail"]
    assert snapshot(session, storage) == before


def test_list_paginates_filters_and_keeps_tenants_apart(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t, other = make_tenant(session), make_tenant(session)
    done = [make_generation(session, storage, t.tenant, images=1) for _ in range(2)]
    queued = [make_generation(session, storage, t.tenant) for _ in range(3)]
    make_generation(session, storage, other.tenant, images=1)

    pages = [
        client.get(f"/v1/generations?limit=2&offset={o}", headers=t.headers).json()
        for o in (0, 2, 4)
    ]
    assert {p["count"] for p in pages} == {5}
    ids = [g["id"] for p in pages for g in p["data"]]
    assert sorted(ids) == sorted(g.id for g in done + queued)

    ok = client.get("/v1/generations?status=succeeded", headers=t.headers).json()
    assert ok["count"] == 2 and {g["status"] for g in ok["data"]} == {"succeeded"}
    assert ok["data"][0]["images"][0]["url"].endswith("/images/0")
    r = client.get("/v1/generations?status=bogus", headers=t.headers)
    assert r.status_code == 422
    assert client.get("/v1/generations").status_code == 401
