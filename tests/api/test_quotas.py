"""Per-tenant limits (429 with Retry-After and the limit's name), shared by API replicas,
overridable with `tuneqdm-admin tenants limits`; no connection held during image work; a pool
timeout answers 503 with Retry-After."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app import cli
from app.db import make_engine, make_sessionmaker
from app.deps import get_sender
from app.errors import TooManyRequests
from app.main import create_app
from app.services import finetunes as finetune_svc
from app.services.quotas import count_request, stored_bytes
from app.settings import get_settings
from app.storage import LocalStorage
from tests.api.conftest import make_settings
from tests.api.factories import (
    RecordingSender,
    image_bytes,
    make_adapter,
    make_finetune,
    make_generation,
    make_tenant,
    snapshot,
)

GENERATION = {"prompt": "a photo of a dog", "steps": 10, "width": 64, "height": 64}


def _app(
    database_url: str,
    workdir: Path,
    sessions: sessionmaker[Session],
    storage: LocalStorage,
    **overrides: object,
) -> FastAPI:
    app = create_app(
        make_settings(database_url, workdir, **overrides), session_factory=sessions, storage=storage
    )
    app.dependency_overrides[get_sender] = RecordingSender
    return app


def _upload(client: TestClient, headers: dict[str, str], n: int = 2) -> int:
    r = client.post(
        "/v1/finetunes",
        headers=headers,
        data={"instance_prompt": "a photo of sks dog"},
        files=[("images", (f"{i}.png", image_bytes(), "image/png")) for i in range(n)],
    )
    return int(r.status_code)


def test_requests_per_minute_are_counted_across_replicas(
    database_url: str,
    workdir: Path,
    engine: Engine,
    session: Session,
    storage: LocalStorage,
) -> None:
    t = make_tenant(session)
    other = make_tenant(session)
    # Two API replicas: each its own engine (connection pool), one database.
    replicas = [
        _app(
            database_url,
            workdir,
            make_sessionmaker(make_engine(database_url)),
            storage,
            tenant_rpm=4,
        )
        for _ in range(2)
    ]
    with TestClient(replicas[0]) as a, TestClient(replicas[1]) as b:
        codes = [(a if i % 2 else b).get("/v1/adapters", headers=t.headers) for i in range(5)]
        assert [r.status_code for r in codes] == [200, 200, 200, 200, 429]
        limited = codes[-1]
        assert "requests per minute" in limited.json()["detail"]
        assert 1 <= int(limited.headers["Retry-After"]) <= 61
        # Another tenant has its own count.
        assert a.get("/v1/adapters", headers=other.headers).status_code == 200


def test_the_minute_window_rolls_over(session: Session, database_url: str, workdir: Path) -> None:
    settings = make_settings(database_url, workdir, tenant_rpm=1)
    t = make_tenant(session)
    minute = 29_000_000 * 60.0
    count_request(session=session, tenant=t.tenant, settings=settings, now=minute + 1)
    with pytest.raises(TooManyRequests) as over:
        count_request(session=session, tenant=t.tenant, settings=settings, now=minute + 50)
    assert over.value.retry_after_s == 11
    session.rollback()
    count_request(session=session, tenant=t.tenant, settings=settings, now=minute + 61)
    session.commit()


def test_active_jobs_limit(
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    session: Session,
    storage: LocalStorage,
) -> None:
    t = make_tenant(session)
    make_finetune(session, t.tenant, status="running")
    make_generation(session, storage, t.tenant)  # queued
    make_finetune(session, t.tenant, status="succeeded")  # ended: not counted
    app = _app(database_url, workdir, session_factory, storage, tenant_active_jobs=2)
    before = snapshot(session, storage)
    with TestClient(app) as client:
        r = client.post("/v1/generations", headers=t.headers, json=GENERATION)
        assert r.status_code == 429
        assert "active jobs limit" in r.json()["detail"] and "limit is 2" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) > 0
        assert _upload(client, t.headers) == 429
    assert snapshot(session, storage) == before  # nothing stored


def test_stored_bytes_limit_counts_photos_adapters_and_images(
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    session: Session,
    storage: LocalStorage,
) -> None:
    t = make_tenant(session)
    with TestClient(_app(database_url, workdir, session_factory, storage)) as client:
        assert _upload(client, t.headers, n=1) == 202
    photo = stored_bytes(session, t.tenant.id)
    assert photo > 0
    make_adapter(session, storage, t.tenant, content=b"a" * 1000)
    gen = make_generation(session, storage, t.tenant, images=1)
    gen.images[0].size_bytes = 500
    session.commit()
    used = stored_bytes(session, t.tenant.id)
    assert used == photo + 1000 + 500

    # Room for less than one more photo of the same size.
    app = _app(
        database_url, workdir, session_factory, storage, tenant_stored_bytes=used + photo - 1
    )
    before = snapshot(session, storage)
    with TestClient(app) as client:
        r = client.post(
            "/v1/finetunes",
            headers=t.headers,
            data={"instance_prompt": "a photo of sks dog"},
            files=[("images", ("a.png", image_bytes(), "image/png"))],
        )
        assert r.status_code == 429 and "stored bytes limit" in r.json()["detail"]
        assert f"this tenant stores {used} bytes" in r.json()["detail"]
    assert snapshot(session, storage) == before


def test_cli_overrides_a_tenants_limits(
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    session: Session,
    storage: LocalStorage,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TUNEQDM_DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        t = make_tenant(session, "flooder")
        calm = make_tenant(session, "calm")
        assert cli.main(["tenants", "limits", "flooder", "--rpm", "2", "--active-jobs", "0"]) == 0
        out = capsys.readouterr().out
        assert "rpm:           2 (override)" in out and "unlimited (override)" in out
        assert any(r.getMessage() == "tenant.limits" for r in caplog.records)
        app = _app(database_url, workdir, session_factory, storage)  # default rpm 600
        with TestClient(app) as client:
            codes = [client.get("/v1/adapters", headers=t.headers).status_code for _ in range(3)]
            assert codes == [200, 200, 429]
            assert client.get("/v1/adapters", headers=calm.headers).status_code == 200
        assert cli.main(["tenants", "limits", "flooder", "--rpm", "default"]) == 0
        assert "rpm:           600 (setting)" in capsys.readouterr().out
        assert cli.main(["tenants", "limits", "nobody", "--rpm", "1"]) == 1
        assert cli.main(["tenants", "list"]) == 0
        assert "flooder" in capsys.readouterr().out
    finally:
        get_settings.cache_clear()


@pytest.fixture
def tiny_pool(database_url: str) -> Iterator[Engine]:
    # One connection and a short wait: holding it anywhere makes other requests visible.
    engine = make_engine(database_url, pool_size=1, max_overflow=0, pool_timeout_s=0.5)
    yield engine
    engine.dispose()


def test_no_connection_is_held_while_photos_are_decoded(
    database_url: str,
    workdir: Path,
    tiny_pool: Engine,
    session: Session,
    storage: LocalStorage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = make_tenant(session)
    held: list[int] = []
    check = finetune_svc.check_upload

    def spy(*args: object, **kwargs: object) -> object:
        held.append(tiny_pool.pool.checkedout())  # type: ignore[attr-defined]
        return check(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(finetune_svc, "check_upload", spy)
    app = _app(database_url, workdir, make_sessionmaker(tiny_pool), storage)
    with TestClient(app) as client:
        assert _upload(client, t.headers, n=3) == 202
    assert held == [0, 0, 0]


def test_pool_timeout_answers_503_with_retry_after(
    database_url: str, workdir: Path, tiny_pool: Engine, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    app = _app(database_url, workdir, make_sessionmaker(tiny_pool), storage)
    with TestClient(app) as client, tiny_pool.connect():
        r = client.get("/v1/adapters", headers=t.headers)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "5" and "busy" in r.json()["detail"]
    with TestClient(app) as client:
        assert client.get("/v1/adapters", headers=t.headers).status_code == 200


def test_a_repeated_request_gets_its_job_even_at_the_limit(
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    session: Session,
    storage: LocalStorage,
) -> None:
    t = make_tenant(session)
    app = _app(database_url, workdir, session_factory, storage, tenant_active_jobs=1)
    headers = {**t.headers, "Idempotency-Key": "once"}
    with TestClient(app) as client:
        first = client.post(
            "/v1/finetunes",
            headers=headers,
            data={"instance_prompt": "a photo of sks dog"},
            files=[("images", ("a.png", image_bytes(), "image/png"))],
        )
        again = client.post(
            "/v1/finetunes",
            headers=headers,
            data={"instance_prompt": "a photo of sks dog"},
            files=[("images", ("a.png", image_bytes(), "image/png"))],
        )
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        assert _upload(client, t.headers) == 429  # a new job is over the limit


def test_exports_count_in_stored_bytes_and_their_variants_are_capped(
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    session: Session,
    storage: LocalStorage,
) -> None:
    """A finished export's file counts in the tenant's stored bytes (a merged SD 1.x export is
    a whole UNet); a tenant at its export limit is refused a new variant with 429 naming the
    limit, and one at its byte limit is refused any export."""
    from app.models import AdapterExport

    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant, content=b"a" * 1000)
    before = stored_bytes(session, t.tenant.id)
    app = _app(database_url, workdir, session_factory, storage, tenant_exports=2)
    url = f"/v1/adapters/{adapter.id}/exports"
    with TestClient(app) as client:
        for rank in (1, 2):
            r = client.post(url, headers=t.headers, json={"format": "lora", "rank": rank})
            assert r.status_code == 202, r.text
        r = client.post(url, headers=t.headers, json={"format": "lora", "rank": 3})
        assert r.status_code == 429, r.text
        assert "exports limit reached" in r.json()["detail"]
        assert "TUNEQDM_TENANT_EXPORTS" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) > 0
        # Asking again for a variant it has is not a new one.
        again = client.post(url, headers=t.headers, json={"format": "lora", "rank": 1})
        assert again.status_code == 200
    first = session.scalars(select(AdapterExport).where(AdapterExport.rank == 1)).one()
    first.status, first.storage_key, first.size_bytes = "succeeded", "exports/x", 15_000_000
    session.commit()
    assert stored_bytes(session, t.tenant.id) == before + 15_000_000

    full = _app(
        database_url, workdir, session_factory, storage, tenant_stored_bytes=before + 15_000_000
    )
    with TestClient(full) as client:
        r = client.post(url, headers=t.headers, json={"format": "merged"})
        assert r.status_code == 429 and "stored bytes limit" in r.json()["detail"]
    assert session.scalar(select(func.count()).select_from(AdapterExport)) == 2
