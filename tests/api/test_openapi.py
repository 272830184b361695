"""The OpenAPI document and the interactive docs are served and list every endpoint."""

from __future__ import annotations

from fastapi.testclient import TestClient

ENDPOINTS = {
    ("post", "/v1/finetunes"),
    ("get", "/v1/finetunes"),
    ("get", "/v1/finetunes/{finetune_id}"),
    ("post", "/v1/finetunes/{finetune_id}/cancel"),
    ("get", "/v1/finetunes/{finetune_id}/samples"),
    ("get", "/v1/finetunes/{finetune_id}/samples/{step}/{prompt_index}"),
    ("get", "/v1/finetunes/{finetune_id}/events"),
    ("get", "/v1/finetunes/{finetune_id}/checkpoints"),
    ("post", "/v1/finetunes/{finetune_id}/checkpoints/{step}/promote"),
    ("delete", "/v1/finetunes/{finetune_id}"),
    ("get", "/v1/adapters"),
    ("post", "/v1/adapters"),
    ("get", "/v1/adapters/{adapter_id}"),
    ("get", "/v1/adapters/{adapter_id}/file"),
    ("delete", "/v1/adapters/{adapter_id}"),
    ("post", "/v1/adapters/{adapter_id}/exports"),
    ("get", "/v1/adapters/{adapter_id}/exports"),
    ("post", "/v1/adapters/{adapter_id}/exports/{export_id}/cancel"),
    ("get", "/v1/adapters/{adapter_id}/export"),
    ("post", "/v1/generations"),
    ("get", "/v1/generations"),
    ("get", "/v1/generations/{generation_id}"),
    ("delete", "/v1/generations/{generation_id}"),
    ("get", "/v1/generations/{generation_id}/images/{n}"),
    ("post", "/v1/generations/{generation_id}/cancel"),
    ("get", "/v1/bases"),
    ("get", "/v1/bases/{name}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
}


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    served = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == ENDPOINTS
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 200


def test_operation_ids_are_the_handler_names(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    ids = {(m, p): op["operationId"] for p, ops in doc["paths"].items() for m, op in ops.items()}
    assert ids[("post", "/v1/finetunes")] == "create_finetune"
    assert ids[("get", "/v1/finetunes/{finetune_id}")] == "get_finetune"
    assert ids[("get", "/v1/generations")] == "list_generations"
    assert ids[("delete", "/v1/adapters/{adapter_id}")] == "delete_adapter"
    # Names, not FastAPI's default "<name>_<path>_<method>"; each one unique.
    assert all("_v1_" not in i and not i.endswith(("_get", "_post")) for i in ids.values())
    assert len(set(ids.values())) == len(ids)


def test_unknown_route_answers_a_problem(client: TestClient) -> None:
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert r.json() == {
        "type": "urn:tuneqdm:problem:not-found",
        "title": "Not Found",
        "status": 404,
        "detail": "no such endpoint; the OpenAPI document at /openapi.json lists them",
    }
