"""Input that slipped past validation: non-finite numbers, lax types, undecodable form text,
an image too large for PIL to open. Each gets a 422 that names what to fix, and stores nothing."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.storage import LocalStorage
from tests.api.factories import image_bytes, make_adapter, make_tenant, snapshot

GENERATION = {"prompt": "a photo of a dog", "steps": 10, "width": 64, "height": 64}


@pytest.mark.parametrize(
    ("field", "literal"),
    [
        ("guidance_scale", "NaN"),
        ("guidance_scale", "Infinity"),
        ("guidance_scale", "-Infinity"),
        ("steps", "NaN"),
        ("seed", "Infinity"),
    ],
)
def test_a_non_finite_number_is_a_422_naming_the_field(
    client: TestClient, session: Session, storage: LocalStorage, field: str, literal: str
) -> None:
    """Python's JSON reader accepts NaN and Infinity; the 422 quoting them failed to render
    (JSON has no such numbers) and became a 500."""
    t = make_tenant(session)
    body = json.dumps(GENERATION)[:-1] + f', "{field}": {literal}}}'
    before = snapshot(session, storage)
    r = client.post(
        "/v1/generations",
        content=body,
        headers={**t.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == [field]
    assert snapshot(session, storage) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", True), ("steps", "3"), ("guidance_scale", "7.5"), ("num_images", "2")],
)
def test_a_boolean_or_a_string_is_not_a_number_in_a_json_body(
    client: TestClient, session: Session, storage: LocalStorage, field: str, value: object
) -> None:
    t = make_tenant(session)
    before = snapshot(session, storage)
    r = client.post("/v1/generations", json={**GENERATION, field: value}, headers=t.headers)
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == [field]
    assert snapshot(session, storage) == before


def test_a_string_rank_is_refused_in_the_export_body_but_read_from_a_query(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t = make_tenant(session)
    adapter = make_adapter(session, storage, t.tenant)
    url = f"/v1/adapters/{adapter.id}"
    r = client.post(f"{url}/exports", json={"format": "lora", "rank": "16"}, headers=t.headers)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "rank", r.text
    r = client.post(f"{url}/exports", json={"format": "lora", "rank": True}, headers=t.headers)
    assert r.status_code == 422, r.text
    # In a query string every value is text: there "16" is the number.
    r = client.get(f"{url}/export?format=lora&rank=16", headers=t.headers)
    assert r.status_code == 404 and "create it with POST" in r.json()["detail"], r.text


def _finetune(
    client: TestClient, headers: dict[str, str], **form: str | bytes
) -> dict[str, object]:
    r = client.post(
        "/v1/finetunes",
        headers=headers,
        data={"instance_prompt": "a photo of sks dog", **form},
        files=[("images", ("a.png", image_bytes(), "image/png"))],
    )
    assert r.status_code == 422, r.text
    return dict(r.json())


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"steps": True}, "params.steps"),
        ({"steps": "3"}, "params.steps"),
        ({"batch_size": 1.0}, "params.batch_size"),
        ({"lr_s_in": "0.001"}, "params.lr_s_in"),
        ({"gradient_checkpointing": 1}, "params.gradient_checkpointing"),
    ],
)
def test_finetune_params_have_strict_types(
    client: TestClient, session: Session, storage: LocalStorage, params: object, field: str
) -> None:
    """`steps: true` trained 1 step and `"3"` trained 3."""
    t = make_tenant(session)
    before = snapshot(session, storage)
    problem = _finetune(client, t.headers, params=json.dumps(params))
    assert field in str(problem["errors"]), problem
    assert snapshot(session, storage) == before


@pytest.mark.parametrize("field", ["instance_prompt", "class_prompt", "name"])
def test_invalid_utf8_in_a_form_field_is_a_422_naming_it(
    client: TestClient, session: Session, storage: LocalStorage, field: str
) -> None:
    """Starlette read undecodable form text as Latin-1, so "caf\\xe9" was stored as "café"
    from a Latin-1 client and worse from others; now it is refused."""
    t = make_tenant(session)
    before = snapshot(session, storage)
    value = b"a photo of sks caf\xe9 \xff\xfe dog"
    errors = _finetune(client, t.headers, **{field: value})["errors"]
    assert isinstance(errors, list) and [e["field"] for e in errors] == [field], errors
    assert "not valid utf-8 text" in errors[0]["message"]
    assert snapshot(session, storage) == before


def test_valid_utf8_form_text_is_kept_as_sent(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    r = client.post(
        "/v1/finetunes",
        headers=t.headers,
        data={"instance_prompt": "a photo of sks café dog ☕".encode(), "name": "Zoë"},
        files=[("images", ("a.png", image_bytes(), "image/png"))],
    )
    assert r.status_code == 202, r.text
    assert r.json()["instance_prompt"] == "a photo of sks café dog ☕"
    assert r.json()["name"] == "Zoë"


def _huge_png(width: int, height: int) -> bytes:
    """A valid PNG header of `width` x `height` with an empty image stream: a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_a_30000_by_30000_png_is_refused_naming_the_pixel_limit(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    """PIL refuses to open an image above twice its own limit before our check sees the size;
    that was reported as "not a readable PNG"."""
    t = make_tenant(session)
    before = snapshot(session, storage)
    r = client.post(
        "/v1/finetunes",
        headers=t.headers,
        data={"instance_prompt": "a photo of sks dog"},
        files=[("images", ("a.png", _huge_png(30000, 30000), "image/png"))],
    )
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "900000000 pixels" in detail and "above the limit of 1000000 pixels" in detail, detail
    assert snapshot(session, storage) == before


def test_the_web_page_has_a_content_security_policy_and_every_response_nosniff(
    client: TestClient, session: Session
) -> None:
    """The page held the API key with no CSP: an injected script could have sent it anywhere."""
    page = client.get("/")
    assert page.status_code == 200
    csp = dict(
        part.strip().split(" ", 1) for part in page.headers["Content-Security-Policy"].split(";")
    )
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'"
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    t = make_tenant(session)
    for r in (
        page,
        client.get("/static/app.js"),
        client.get("/v1/bases", headers=t.headers),
        client.get("/v1/bases"),  # 401
        client.get("/v1/finetunes/ft_missing", headers=t.headers),  # 404
        client.post("/v1/generations", json={"steps": True}, headers=t.headers),  # 422
    ):
        assert r.headers["X-Content-Type-Options"] == "nosniff", (r.request.url, r.status_code)
