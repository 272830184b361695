"""The OpenAPI document and the interactive docs are served and list every endpoint."""

from __future__ import annotations

from fastapi.testclient import TestClient

ENDPOINTS = {
    ("post", "/v1/finetunes"),
    ("get", "/v1/finetunes"),
    ("get", "/v1/finetunes/{finetune_id}"),
    ("post", "/v1/finetunes/{finetune_id}/cancel"),
    ("delete", "/v1/finetunes/{finetune_id}"),
    ("get", "/v1/adapters"),
    ("get", "/v1/adapters/{adapter_id}"),
    ("get", "/v1/adapters/{adapter_id}/file"),
    ("delete", "/v1/adapters/{adapter_id}"),
    ("post", "/v1/generations"),
    ("get", "/v1/generations/{generation_id}"),
    ("delete", "/v1/generations/{generation_id}"),
    ("get", "/v1/generations/{generation_id}/images/{n}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
}


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    served = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == ENDPOINTS
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 200


def test_unknown_route_answers_json(client: TestClient) -> None:
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
