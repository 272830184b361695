"""Downloads of adapters and images from either backend: streamed through the API, or (with
TUNEQDM_DOWNLOAD_REDIRECT on S3) a 307 to a presigned URL; a file missing from the store is a
404 in both modes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app import storage as st
from app.deps import get_sender
from app.main import create_app
from app.s3_storage import S3Storage
from tests.api.conftest import make_settings
from tests.api.factories import RecordingSender, make_adapter, make_generation, make_tenant
from tests.s3server import S3Server


@pytest.fixture(params=["local", "s3"])
def files(request: pytest.FixtureRequest, workdir: Path) -> Iterator[st.Storage]:
    if request.param == "local":
        yield st.LocalStorage(workdir / "files")
        return
    server: S3Server = request.getfixturevalue("s3_server")
    s3 = S3Storage(
        bucket=server.bucket,
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
        region=server.region,
    )
    yield s3
    s3.delete_prefix("tenants")


@pytest.mark.parametrize("redirect", [False, True], ids=["stream", "redirect"])
def test_downloads_stream_or_redirect(
    files: st.Storage,
    redirect: bool,
    database_url: str,
    workdir: Path,
    session_factory: sessionmaker[Session],
    session: Session,
) -> None:
    settings = make_settings(database_url, workdir, download_redirect=redirect)
    app = create_app(settings, session_factory=session_factory, storage=files)
    app.dependency_overrides[get_sender] = RecordingSender
    t = make_tenant(session)
    adapter = make_adapter(session, files, t.tenant, content=b"adapter bytes")
    gen = make_generation(session, files, t.tenant, images=1)
    with files.open(gen.images[0].storage_key) as f:
        png = f.read()
    redirects = redirect and isinstance(files, S3Storage)  # local files always stream
    with TestClient(app, follow_redirects=False) as client:
        for url, body, media in (
            (f"/v1/adapters/{adapter.id}/file", b"adapter bytes", "application/octet-stream"),
            (f"/v1/generations/{gen.id}/images/0", png, "image/png"),
        ):
            r = client.get(url, headers=t.headers)
            if redirects:
                assert r.status_code == 307, r.text
                r = httpx.get(r.headers["location"])  # the store, without the API key
            assert r.status_code == 200 and r.content == body
            assert r.headers["content-type"] == media
        files.delete(adapter.storage_key)
        r = client.get(f"/v1/adapters/{adapter.id}/file", headers=t.headers)
        assert r.status_code == 404 and "missing from storage" in r.json()["detail"]
