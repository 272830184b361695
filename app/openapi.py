"""The OpenAPI document, completed so that client generators get every type right.

FastAPI's document leaves out what generated clients need: the problem body of each error
status, the statuses any request can get (401, 413, 422, 429, 500, 503), uploads as binary
strings (it writes `contentMediaType`, which generators read as text) and the schema of a JSON
part of a multipart form. `install` finishes the document once, the first time it is asked for.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app import problems

REF = "#/components/schemas/{model}"
# Marks a multipart form field that carries a JSON document of a model's schema (json_part).
JSON_PART = "x-json-part"

# What any operation can answer, besides what its route declares.
_SECURED = {
    401: "Missing, unknown or revoked API key.",
    429: "A per-tenant limit is reached; Retry-After says when to try again.",
    503: "The database or the task queue is not reachable; retry after Retry-After.",
}
_WITH_INPUT = {422: "Invalid input; `errors` names each field at fault."}
_WITH_BODY = {413: "The request body or a file is above its byte limit."}
_ANY = {500: "An internal error; it has been logged (see X-Request-ID)."}


def json_part(model: type[BaseModel]) -> dict[str, Any]:
    """`json_schema_extra` of a Form field whose text is a JSON document of `model`: the
    document declares the part as that schema, sent as application/json."""
    return {JSON_PART: model.__name__}


def install(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Serve the completed document; `models` are the schemas JSON parts refer to."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            complete(doc, models)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]


def _add_schema(doc: dict[str, Any], model: type[BaseModel], name: str | None = None) -> str:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schema = model.model_json_schema(ref_template=REF, mode="validation")
    for sub, sub_schema in schema.pop("$defs", {}).items():
        schemas.setdefault(sub, sub_schema)
    name = name or model.__name__
    schema["title"] = name  # generators name their classes by title
    schemas[name] = schema
    return name


def complete(doc: dict[str, Any], models: list[type[BaseModel]]) -> None:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    problem = {"$ref": REF.format(model=_add_schema(doc, problems.Problem))}
    by_name = {m.__name__: m for m in models}
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            _multipart(doc, op, by_name)
            _errors(op, problem)
            _files(op)


def _files(op: dict[str, Any]) -> None:
    # A file download (image/png, application/octet-stream) without a schema: binary.
    for response in op.get("responses", {}).values():
        for media_type, media in response.get("content", {}).items():
            if "json" not in media_type and not media.get("schema"):
                media["schema"] = {"type": "string", "format": "binary"}


def _errors(op: dict[str, Any], problem: dict[str, Any]) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    extra: dict[int, str] = dict(_ANY)
    if op.get("security"):
        extra |= _SECURED
    if op.get("parameters") or op.get("requestBody"):
        extra |= _WITH_INPUT
    if op.get("requestBody"):
        extra |= _WITH_BODY
    for code, description in extra.items():
        responses.setdefault(str(code), {"description": description})
    for key, response in responses.items():
        if key.isdigit() and int(key) >= 400:
            response["content"] = {problems.MEDIA_TYPE: {"schema": problem}}


def _multipart(doc: dict[str, Any], op: dict[str, Any], models: dict[str, type[BaseModel]]) -> None:
    media = op.get("requestBody", {}).get("content", {}).get("multipart/form-data")
    if media is None:
        return
    schemas = doc["components"]["schemas"]
    ref: str = media["schema"].get("$ref", "")
    form = schemas[ref.rsplit("/", 1)[-1]] if ref else media["schema"]
    encoding: dict[str, Any] = {}
    for name, prop in form.get("properties", {}).items():
        if JSON_PART in prop:
            model = models[prop[JSON_PART]]
            # The request schema of the model (FastAPI names its response one FinetuneParams).
            target = _add_schema(doc, model, f"{model.__name__}Input")
            # A bare $ref: generators drop a property whose $ref has siblings.
            form["properties"][name] = {"$ref": REF.format(model=target)}
            encoding[name] = {"contentType": "application/json"}
        elif _is_files(prop):
            form["properties"][name] = {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": prop.get("description", ""),
            }
        elif _is_file(prop):
            # Optional or not, a file part is a binary string (absent when not sent).
            form["properties"][name] = {
                "type": "string",
                "format": "binary",
                "description": prop.get("description", ""),
            }
    if encoding:
        media["encoding"] = encoding


def _is_file(prop: dict[str, Any]) -> bool:
    options = prop.get("anyOf", [prop])
    return any(o.get("contentMediaType") == "application/octet-stream" for o in options)


def _is_files(prop: dict[str, Any]) -> bool:
    options = prop.get("anyOf", [prop])
    return any(
        o.get("type") == "array"
        and o.get("items", {}).get("contentMediaType") == "application/octet-stream"
        for o in options
    )
