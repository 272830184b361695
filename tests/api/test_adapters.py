"""GET/DELETE /v1/adapters and the adapter file download."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Adapter, FinetuneJob
from app.storage import LocalStorage
from tests.api.factories import make_adapter, make_tenant


def test_list_and_get(client: TestClient, session: Session, storage: LocalStorage) -> None:
    t = make_tenant(session)
    adapters = [make_adapter(session, storage, t.tenant) for _ in range(3)]

    listing = client.get("/v1/adapters?limit=2", headers=t.headers).json()
    assert listing["count"] == 3 and len(listing["data"]) == 2

    body = client.get(f"/v1/adapters/{adapters[0].id}", headers=t.headers).json()
    assert body["id"] == adapters[0].id
    assert body["method"] == "tuneqdm" and body["bits"] == 8 and body["intervals"] == 2
    assert body["tokens"] == ["sks"] and body["base_model"] == "tuneqdm/fashion-sd"
    assert body["size_bytes"] == len(b"fake safetensors bytes")
    assert body["finetune_id"] == adapters[0].finetune_job_id
    assert body["links"]["file"] == f"/v1/adapters/{adapters[0].id}/file"
    assert body["created_at"].endswith("Z") or "+00:00" in body["created_at"]


def test_download_file(client: TestClient, session: Session, storage: LocalStorage) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant, content=b"\x00safetensors\n\xff" * 20_000)
    r = client.get(f"/v1/adapters/{adapter.id}/file", headers=t.headers)
    assert r.status_code == 200
    assert r.content == b"\x00safetensors\n\xff" * 20_000
    assert r.headers["content-type"] == "application/octet-stream"
    assert f"{adapter.id}.safetensors" in r.headers["content-disposition"]


def test_delete_removes_row_and_file(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    adapter_id, job_id = adapter.id, adapter.finetune_job_id
    path = storage.path(adapter.storage_key)
    assert path.is_file()

    assert client.delete(f"/v1/adapters/{adapter_id}", headers=t.headers).status_code == 204
    assert not path.exists()
    session.expire_all()
    assert session.get(Adapter, adapter_id) is None
    # The fine-tune job stays, without its adapter.
    assert session.get(FinetuneJob, job_id) is not None
    assert client.get(f"/v1/finetunes/{job_id}", headers=t.headers).json()["adapter_id"] is None
    assert client.get(f"/v1/adapters/{adapter_id}", headers=t.headers).status_code == 404
    assert client.delete(f"/v1/adapters/{adapter_id}", headers=t.headers).status_code == 404


def test_missing_file_is_404_not_500(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    storage.delete(adapter.storage_key)
    r = client.get(f"/v1/adapters/{adapter.id}/file", headers=t.headers)
    assert r.status_code == 404 and "missing from storage" in r.json()["detail"]
