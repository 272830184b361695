"""Logs: JSON lines with the request id (also in the X-Request-ID header), no SQL parameters,
no prompts, an audit line for key creation/revocation and deletions."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import make_engine
from app.logs import JsonFormatter, new_request_id
from app.models import Tenant
from app.services import keys
from app.storage import LocalStorage
from tests.api.factories import image_bytes, make_adapter, make_generation, make_tenant

SECRET_PROMPT = "a photo of sks zebracorn-7f3a"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged during the test, formatted as the service formats it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(handler)
    root.setLevel(old_level)


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_request_id_is_returned_and_in_every_line(
    client: TestClient, session: Session, json_log: io.StringIO
) -> None:
    t = make_tenant(session)
    r = client.get("/v1/adapters", headers={**t.headers, "X-Request-ID": "client-id.42"})
    assert r.headers["X-Request-ID"] == "client-id.42"
    access = [line for line in _lines(json_log) if line["logger"] == "tuneqdm.access"]
    assert access[-1]["request_id"] == "client-id.42" and access[-1]["status"] == 200
    assert access[-1]["path"] == "/v1/adapters"

    generated = client.get("/healthz").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # An id that could forge log text is replaced, not echoed.
    r = client.get("/healthz", headers={"X-Request-ID": "x" * 65})
    assert r.headers["X-Request-ID"] != "x" * 65
    assert new_request_id('a"b') != 'a"b' and new_request_id("ok-1") == "ok-1"
    # Errors carry the id too.
    assert client.get("/v1/adapters").headers["X-Request-ID"]


def test_prompts_and_photos_are_not_logged(
    client: TestClient, session: Session, json_log: io.StringIO
) -> None:
    t = make_tenant(session)
    photo = image_bytes()
    r = client.post(
        "/v1/finetunes",
        headers=t.headers,
        data={"instance_prompt": SECRET_PROMPT},
        files=[("images", ("me.png", photo, "image/png"))],
    )
    assert r.status_code == 202
    r = client.post(
        "/v1/generations",
        headers=t.headers,
        json={"prompt": SECRET_PROMPT, "steps": 10, "width": 64, "height": 64},
    )
    assert r.status_code == 202
    text = json_log.getvalue()
    assert text and "zebracorn" not in text and "me.png" not in text and t.key not in text


def test_sql_parameters_never_reach_the_exception_text(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(Tenant).values(id="tn_a", name="secret-name-1"))
        with pytest.raises(IntegrityError) as err, engine.begin() as conn:
            conn.execute(insert(Tenant).values(id="tn_a", name="secret-name-1"))
        assert "secret-name-1" not in str(err.value)
        assert "hidden" in str(err.value)
        with engine.begin() as conn:
            conn.execute(delete(Tenant))
    finally:
        engine.dispose()


def test_audit_lines_for_keys_and_deletions(
    client: TestClient, session: Session, storage: LocalStorage, json_log: io.StringIO
) -> None:
    t = make_tenant(session)
    keys.revoke_key(session=session, key_id=t.key_id)
    session.commit()
    t2 = make_tenant(session)
    adapter = make_adapter(session, storage, t2.tenant)
    gen = make_generation(session, storage, t2.tenant, images=1)
    assert client.delete(f"/v1/adapters/{adapter.id}", headers=t2.headers).status_code == 204
    assert client.delete(f"/v1/generations/{gen.id}", headers=t2.headers).status_code == 204
    job_id = adapter.finetune_job_id
    assert client.delete(f"/v1/finetunes/{job_id}", headers=t2.headers).status_code == 204
    audits = [line for line in _lines(json_log) if line["logger"] == "tuneqdm.audit"]
    events = [
        (
            line["audit"],
            line.get("key_id")
            or line.get("adapter_id")
            or line.get("generation_id")
            or line.get("finetune_id"),
        )
        for line in audits
    ]
    assert events == [
        ("key.create", t.key_id),
        ("key.revoke", t.key_id),
        ("key.create", t2.key_id),
        ("adapter.delete", adapter.id),
        ("generation.delete", gen.id),
        ("finetune.delete", job_id),
    ]
    deletions = [line for line in audits if line["audit"] != "key.create"]
    assert all(line["request_id"] != "-" for line in deletions[1:])
    assert all(line["tenant_id"] for line in audits)


def test_a_500_carries_the_request_id_in_its_header_and_log_line(
    client: TestClient, json_log: io.StringIO
) -> None:
    app = client.app

    @app.get("/boom")  # type: ignore[attr-defined]
    def boom() -> None:
        raise RuntimeError("bug")

    r = TestClient(app, raise_server_exceptions=False).get(
        "/boom", headers={"X-Request-ID": "trace-500"}
    )
    assert r.status_code == 500 and r.headers["X-Request-ID"] == "trace-500"
    errors = [line for line in _lines(json_log) if line["message"] == "unhandled error"]
    assert errors and errors[-1]["request_id"] == "trace-500"
    access = [line for line in _lines(json_log) if line["logger"] == "tuneqdm.access"]
    assert access[-1]["status"] == 500 and access[-1]["request_id"] == "trace-500"
