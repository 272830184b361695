"""People's data: DELETE of fine-tunes and generations, photos deleted when a fine-tune ends,
expiry of generations, `tuneqdm-admin tenants purge`. Each test checks files and rows."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app import cli
from app import storage as st
from app.models import (
    Adapter,
    ApiKey,
    FinetuneImage,
    FinetuneJob,
    GeneratedImage,
    GenerationJob,
    Tenant,
    utcnow,
)
from app.services import retention
from app.settings import Settings, get_settings
from app.storage import LocalStorage
from tests.api.conftest import make_settings
from tests.api.factories import (
    TenantKey,
    image_bytes,
    make_adapter,
    make_generation,
    make_tenant,
    snapshot,
)


def _upload(client: TestClient, t: TenantKey, n: int = 3) -> str:
    r = client.post(
        "/v1/finetunes",
        headers=t.headers,
        data={"instance_prompt": "a photo of sks dog"},
        files=[("images", (f"{i}.png", image_bytes(color="red"), "image/png")) for i in range(n)],
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _count(session: Session, model: type, *where: Any) -> int:
    session.expire_all()
    stmt: Any = select(func.count()).select_from(model).where(*where)
    return int(session.scalar(stmt) or 0)


def _files_under(storage: LocalStorage, prefix: str) -> list[Path]:
    root = storage.path(prefix)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_delete_queued_finetune_removes_photos_and_rows(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    job_id = _upload(client, t)
    prefix = st.finetune_prefix(t.tenant.id, job_id)
    assert len(_files_under(storage, prefix)) == 3

    r = client.delete(f"/v1/finetunes/{job_id}", headers=t.headers)
    assert r.status_code == 204, r.text
    assert _files_under(storage, prefix) == [] and not storage.path(prefix).exists()
    assert _count(session, FinetuneJob, FinetuneJob.id == job_id) == 0
    assert _count(session, FinetuneImage, FinetuneImage.job_id == job_id) == 0
    assert client.get(f"/v1/finetunes/{job_id}", headers=t.headers).status_code == 404
    assert client.delete(f"/v1/finetunes/{job_id}", headers=t.headers).status_code == 404


def test_delete_running_finetune_cancels_it_and_a_late_checkpoint_goes_too(
    client: TestClient,
    session: Session,
    session_factory: sessionmaker[Session],
    storage: LocalStorage,
    settings: Settings,
) -> None:
    t = make_tenant(session)
    job_id = _upload(client, t)
    job = session.get(FinetuneJob, job_id)
    assert job is not None
    job.status, job.lease_owner, job.heartbeat_at = "running", "w1", utcnow()
    session.commit()

    assert client.delete(f"/v1/finetunes/{job_id}", headers=t.headers).status_code == 204
    assert _count(session, FinetuneJob, FinetuneJob.id == job_id) == 0
    # The worker, still running, writes a checkpoint, then learns the job is gone: its hook
    # removes what it wrote.
    late = st.check_key(f"{st.finetune_prefix(t.tenant.id, job_id)}/checkpoint/state")
    storage.put(late, b"checkpoint bytes")
    retention.finetune_ended(session_factory, storage, settings, t.tenant.id, job_id)
    assert not storage.path(st.finetune_prefix(t.tenant.id, job_id)).exists()


def test_delete_finetune_keeps_the_adapter_unless_asked(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    kept = make_adapter(session, storage, t.tenant)
    assert kept.finetune_job_id is not None
    r = client.delete(f"/v1/finetunes/{kept.finetune_job_id}", headers=t.headers)
    assert r.status_code == 204
    body = client.get(f"/v1/adapters/{kept.id}", headers=t.headers).json()
    assert body["id"] == kept.id and storage.exists(kept.storage_key)

    gone = make_adapter(session, storage, t.tenant)
    adapter_id, key, job_id = gone.id, gone.storage_key, gone.finetune_job_id
    r = client.delete(f"/v1/finetunes/{job_id}?delete_adapter=true", headers=t.headers)
    assert r.status_code == 204
    assert _count(session, Adapter, Adapter.id == adapter_id) == 0
    assert not storage.exists(key)
    assert _count(session, FinetuneJob, FinetuneJob.id == job_id) == 0


def test_delete_generation_removes_images_and_rows(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    other = make_tenant(session)
    gen = make_generation(session, storage, t.tenant, images=2)
    gen_id = gen.id
    prefix = st.generation_prefix(t.tenant.id, gen.id)
    assert len(_files_under(storage, prefix)) == 2

    # Another tenant cannot delete it (and cannot tell it exists).
    assert client.delete(f"/v1/generations/{gen.id}", headers=other.headers).status_code == 404
    assert client.delete(f"/v1/generations/{gen.id}", headers=t.headers).status_code == 204
    assert not storage.path(prefix).exists()
    assert _count(session, GenerationJob, GenerationJob.id == gen_id) == 0
    assert _count(session, GeneratedImage, GeneratedImage.generation_id == gen_id) == 0


def test_delete_queued_generation_cancels_it(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    gen_id = make_generation(session, storage, t.tenant).id  # queued
    assert client.delete(f"/v1/generations/{gen_id}", headers=t.headers).status_code == 204
    assert _count(session, GenerationJob) == 0
    # A worker that still finishes it afterwards throws its images away.
    key = st.generated_image_key(t.tenant.id, gen_id, 0)
    storage.put(key, image_bytes())
    retention.discard_generation_files(storage, t.tenant.id, gen_id)
    assert not storage.path(st.generation_prefix(t.tenant.id, gen_id)).exists()


def test_cancel_of_a_queued_finetune_deletes_its_photos_now(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    job_id = _upload(client, t)
    body = client.post(f"/v1/finetunes/{job_id}/cancel", headers=t.headers).json()
    assert body["status"] == "canceled"
    assert body["photos_deleted_at"] is not None and body["num_images"] == 3
    assert not storage.path(st.finetune_prefix(t.tenant.id, job_id)).exists()
    assert _count(session, FinetuneImage, FinetuneImage.job_id == job_id) == 0


@pytest.fixture
def keep_for_an_hour(
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    storage: LocalStorage,
) -> Iterator[tuple[TestClient, Settings]]:
    from app.deps import get_sender
    from app.main import create_app
    from tests.api.factories import RecordingSender

    settings = make_settings(
        database_url, workdir, photo_retention_s=3600, generation_retention_s=3600
    )
    app = create_app(settings, session_factory=session_factory, storage=storage)
    app.dependency_overrides[get_sender] = RecordingSender
    with TestClient(app) as client:
        yield client, settings


def test_retention_keeps_photos_then_the_sweep_deletes_what_is_due(
    keep_for_an_hour: tuple[TestClient, Settings],
    session: Session,
    session_factory: sessionmaker[Session],
    storage: LocalStorage,
) -> None:
    client, settings = keep_for_an_hour
    t = make_tenant(session)
    ended = _upload(client, t)
    active = _upload(client, t)
    assert client.post(f"/v1/finetunes/{ended}/cancel", headers=t.headers).status_code == 200
    assert len(_files_under(storage, st.finetune_prefix(t.tenant.id, ended))) == 3  # kept
    old_gen = make_generation(session, storage, t.tenant, images=1)
    new_gen = make_generation(session, storage, t.tenant, images=1)
    old_gen.finished_at = utcnow() - timedelta(hours=2)
    session.commit()
    old_id, new_key = old_gen.id, new_gen.images[0].storage_key

    # Within the hour: only the generation that ended two hours ago is due.
    done = retention.sweep(sessions=session_factory, storage=storage, settings=settings)
    assert (done.photos, done.generations) == (0, 1)
    assert _count(session, GenerationJob, GenerationJob.id == old_id) == 0
    assert not storage.path(st.generation_prefix(t.tenant.id, old_id)).exists()
    assert storage.exists(new_key)

    later = utcnow() + timedelta(hours=1, minutes=1)
    done = retention.sweep(sessions=session_factory, storage=storage, settings=settings, now=later)
    assert (done.photos, done.generations) == (1, 1)
    assert not storage.path(st.finetune_prefix(t.tenant.id, ended)).exists()
    assert _count(session, FinetuneImage, FinetuneImage.job_id == ended) == 0
    # The queued job keeps its photos: the worker still needs them.
    assert len(_files_under(storage, st.finetune_prefix(t.tenant.id, active))) == 3
    assert _count(session, GenerationJob) == 0


def test_stored_photos_are_downscaled_jpegs(
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    storage: LocalStorage,
    session: Session,
) -> None:
    from app.deps import get_sender
    from app.main import create_app
    from tests.api.factories import RecordingSender

    # The built-in base (native 32 px) trains at most at 64 px, so photos are stored with a
    # short side of 128.
    settings = make_settings(database_url, workdir)
    app = create_app(settings, session_factory=session_factory, storage=storage)
    app.dependency_overrides[get_sender] = RecordingSender
    t = make_tenant(session)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    Image.new("RGB", (600, 400), "green").save(buf, format="JPEG", exif=exif)
    with TestClient(app) as client:
        r = client.post(
            "/v1/finetunes",
            headers=t.headers,
            data={"instance_prompt": "a photo of sks dog", "params": '{"resolution": 64}'},
            files=[("images", ("a.jpg", buf.getvalue(), "image/jpeg"))],
        )
    assert r.status_code == 202, r.text
    row = session.scalars(select(FinetuneImage)).one()
    assert row.storage_key.endswith(".jpg")
    with Image.open(storage.path(row.storage_key)) as img:
        assert img.format == "JPEG" and img.size == (128, 192)  # portrait, short side 128
    assert (row.width, row.height) == (128, 192)
    assert row.size_bytes == storage.path(row.storage_key).stat().st_size


@pytest.fixture
def cli_env(database_url: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TUNEQDM_DATABASE_URL", database_url)
    monkeypatch.setenv("TUNEQDM_STORAGE_DIR", str(workdir / "files"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_purge_removes_every_row_and_file_of_a_tenant(
    cli_env: None,
    client: TestClient,
    session: Session,
    storage: LocalStorage,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = make_tenant(session, "doomed")
    other = make_tenant(session, "stays")
    for who in (t, other):
        _upload(client, who)
        adapter = make_adapter(session, storage, who.tenant)
        make_generation(session, storage, who.tenant, images=2, adapter_id=adapter.id)
    before_other = snapshot(session, storage)
    doomed_id = t.tenant.id

    assert cli.main(["tenants", "purge", "doomed"]) == 2  # needs --yes
    assert "--yes" in capsys.readouterr().err
    assert _count(session, Tenant, Tenant.id == doomed_id) == 1

    assert cli.main(["tenants", "purge", "doomed", "--yes"]) == 0
    assert "purged tenant doomed" in capsys.readouterr().out
    assert not storage.path(st.tenant_prefix(doomed_id)).exists()
    for model in (FinetuneJob, Adapter, GenerationJob, ApiKey):
        assert _count(session, model, model.tenant_id == doomed_id) == 0
    assert _count(session, Tenant, Tenant.id == doomed_id) == 0
    assert _count(session, FinetuneImage) == 3 and _count(session, GeneratedImage) == 2
    assert client.get("/v1/adapters", headers=t.headers).status_code == 401
    # The other tenant keeps everything it had.
    after = snapshot(session, storage)
    assert after.files == {f for f in before_other.files if f"/{doomed_id}/" not in f}
    assert client.get("/v1/adapters", headers=other.headers).json()["count"] == 1
    assert any(r.getMessage() == "tenant.purge" for r in caplog.records)
    assert cli.main(["tenants", "purge", "nobody", "--yes"]) == 1


def test_the_api_process_runs_the_sweep_on_its_timer(
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    storage: LocalStorage,
    session: Session,
) -> None:
    from app.main import create_app

    t = make_tenant(session)
    gen = make_generation(session, storage, t.tenant, images=1)
    gen.finished_at = utcnow() - timedelta(hours=2)
    session.commit()
    gen_id = gen.id
    settings = make_settings(
        database_url, workdir, generation_retention_s=3600, retention_sweep_every_s=0.1
    )
    app = create_app(settings, session_factory=session_factory, storage=storage)
    with TestClient(app):
        # The sweep runs in the app's lifespan, as it does under uvicorn (embedded and compose).
        for _ in range(100):
            if _count(session, GenerationJob, GenerationJob.id == gen_id) == 0:
                break
            time.sleep(0.1)
    assert _count(session, GenerationJob, GenerationJob.id == gen_id) == 0
    assert not storage.path(st.generation_prefix(t.tenant.id, gen_id)).exists()
