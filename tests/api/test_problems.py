"""One error shape: every error, the service's and the framework's, is an RFC 9457 problem that
never quotes what was sent, and the OpenAPI document declares it for every error status."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.main import create_app
from tests.api.conftest import make_settings
from tests.api.factories import image_bytes, make_tenant
from tests.api.test_bad_input import assert_problem

# Something a field could hold that must never come back in an error.
SECRET = "s3cr3t-Zq9xK"


def test_framework_errors_are_problems(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    assert_problem(client.get("/v1/nope"), 404)
    r = client.put("/v1/finetunes", headers=t.headers)
    assert_problem(r, 405)
    assert r.headers["allow"]
    r = client.get("/v1/adapters")
    assert_problem(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.get("/v1/adapters?limit=0", headers=t.headers)
    assert_problem(r, 422)
    assert r.json()["errors"] == [
        {"field": "limit", "message": "Input should be greater than or equal to 1"}
    ]


def test_a_file_sent_as_text_is_not_echoed(client: TestClient, session: Session) -> None:
    # A generator that types `images` as strings sends the photo as a form field: FastAPI's
    # own 422 quoted the whole value back in `input`.
    t = make_tenant(session)
    r = client.post(
        "/v1/finetunes",
        headers=t.headers,
        data={"instance_prompt": "a photo of sks dog", "images": SECRET * 100},
    )
    assert_problem(r, 422)
    assert SECRET not in r.text
    assert r.json()["errors"][0]["field"] == "images[0]"


def test_no_value_is_echoed_for_any_field(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    for body in (
        {"prompt": "x", "seed": SECRET},
        {"prompt": "x", "webhook_url": SECRET, "nonsense": SECRET},
        {"prompt": "x", "negative_prompt": [SECRET]},
    ):
        r = client.post("/v1/generations", headers=t.headers, json=body)
        assert_problem(r, 422)
        assert SECRET not in r.text, r.text


def test_non_finite_numbers_do_not_break_the_error(client: TestClient, session: Session) -> None:
    # Python's JSON reads NaN and Infinity; FastAPI's handler then failed to write them back.
    t = make_tenant(session)
    for raw in (b'{"prompt": "x", "seed": NaN}', b'{"prompt": "x", "guidance_scale": Infinity}'):
        r = client.post(
            "/v1/generations",
            headers=t.headers | {"Content-Type": "application/json"},
            content=raw,
        )
        assert_problem(r, 422)


def test_body_limit_is_a_problem(database_url: str, tmp_path: Path, session: Session) -> None:
    settings = make_settings(database_url, tmp_path, max_request_bytes=2000)
    t = make_tenant(session)
    with TestClient(create_app(settings)) as client:
        r = client.post(
            "/v1/finetunes",
            headers=t.headers,
            files=[("images", ("a.png", image_bytes(64, 64) + b"x" * 5000, "image/png"))],
            data={"instance_prompt": "a photo of sks dog"},
        )
    assert_problem(r, 413)
    assert "larger than 2000 bytes" in r.json()["detail"]


def test_every_error_status_of_every_operation_is_a_problem(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    problem = {"$ref": "#/components/schemas/Problem"}
    assert set(doc["components"]["schemas"]["Problem"]["required"]) == {
        "type",
        "title",
        "status",
        "detail",
    }
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            statuses = {int(s) for s in op["responses"]}
            assert 500 in statuses, (method, path)
            if op.get("security"):
                assert {401, 429, 503} <= statuses, (method, path)
            if op.get("requestBody"):
                assert {413, 422} <= statuses, (method, path)
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    assert response["content"] == {
                        "application/problem+json": {"schema": problem}
                    }, (method, path, status)
                elif int(status) < 300 and int(status) != 204:
                    assert response.get("content"), (method, path, status)
                    for media in response["content"].values():
                        assert media.get("schema"), (method, path, status)
    print(json.dumps(doc["components"]["schemas"]["Problem"]))
