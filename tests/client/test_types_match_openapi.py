"""The client's TypedDicts and the API's OpenAPI schemas cannot drift apart: the same fields,
the same required ones, the same nullability and the same JSON types, recursively."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest

import tuneqdm_client.types as client_types
from app.main import create_app
from app.settings import Settings

# Client TypedDict → the schema of the response it is.
SCHEMA_OF = {
    "Progress": "Progress",
    "Finetune": "FinetunePublic",
    "FinetunePage": "FinetunesPublic",
    "Adapter": "AdapterPublic",
    "AdapterPage": "AdaptersPublic",
    "GeneratedImage": "GeneratedImagePublic",
    "Generation": "GenerationPublic",
    "GenerationPage": "GenerationsPublic",
    "Sample": "SamplePublic",
    "SamplePage": "SamplesPublic",
    "Checkpoint": "CheckpointPublic",
    "CheckpointPage": "CheckpointsPublic",
    "Event": "EventPublic",
    "EventPage": "EventsPublic",
    "SizeRange": "SizeRangePublic",
    "BaseWorker": "BaseWorkerPublic",
    "QueuedJobs": "QueuedPublic",
    "GenerationDefaults": "GenerationDefaultsPublic",
    "FinetuneDefaults": "FinetuneDefaultsPublic",
    "Base": "BasePublic",
    "BasePage": "BasesPublic",
    "Export": "ExportPublic",
    "ExportPage": "ExportsPublic",
    "Problem": "Problem",
    "FieldError": "FieldError",
}
JSON_TYPE = {str: "string", int: "integer", float: "number", bool: "boolean"}


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder: Path = tmp_path_factory.mktemp("doc")
    app = create_app(
        Settings(data_dir=folder, database_url=f"sqlite:///{folder}/db", broker_url="memory://")
    )
    return dict(app.openapi()["components"]["schemas"])


def _options(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return schema.get("anyOf", [schema])


def _check(hint: Any, schema: dict[str, Any], schemas: dict[str, Any], where: str) -> None:
    """`hint` (a type annotation) accepts what `schema` describes."""
    hints = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    nullable = type(None) in hints
    options = _options(schema)
    assert nullable == any(o.get("type") == "null" for o in options), f"{where}: null"
    hints = tuple(h for h in hints if h is not type(None))
    options = [o for o in options if o.get("type") != "null"]
    if len(hints) != 1 or hints[0] is Any or not options:
        return  # a free-form value (dict[str, Any] data, Any)
    (h,) = hints
    option = options[0]
    if "$ref" in option:
        if typing.get_origin(h) is dict:
            return  # kept loose on purpose (links, params, webhook state)
        name = option["$ref"].rsplit("/", 1)[-1]
        assert typing.is_typeddict(h), f"{where}: {h} for {name}"
        assert SCHEMA_OF[h.__name__] == name, f"{where}: {h.__name__} is not {name}"
        return
    origin = typing.get_origin(h)
    if origin is list:
        assert option.get("type") == "array", f"{where}: list for {option}"
        _check(typing.get_args(h)[0], option.get("items", {}), schemas, f"{where}[]")
    elif origin is dict:
        assert option.get("type") == "object", f"{where}: dict for {option}"
    elif h in JSON_TYPE:
        allowed = {o.get("type") for o in options}
        if h is float:
            allowed.discard("integer")  # JSON numbers
        assert JSON_TYPE[h] in allowed, f"{where}: {h.__name__} for {options}"


@pytest.mark.parametrize(("name", "schema_name"), sorted(SCHEMA_OF.items()))
def test_each_client_type_is_its_schema(
    schemas: dict[str, Any], name: str, schema_name: str
) -> None:
    typed = getattr(client_types, name)
    schema = schemas[schema_name]
    hints = typing.get_type_hints(typed)
    assert set(hints) == set(schema["properties"]), name
    assert typed.__required_keys__ == set(schema.get("required", [])), name
    for field, hint in hints.items():
        _check(hint, schema["properties"][field], schemas, f"{name}.{field}")


def test_every_response_schema_has_a_client_type(schemas: dict[str, Any]) -> None:
    # Request bodies and their parts are the client's keyword arguments, not types.
    requests = {
        "Body_create_finetune",
        "Body_upload_adapter",
        "FinetuneParams",
        "FinetuneParamsInput",
        "GenerationCreate",
        "ExportCreate",
    }
    # Nested objects the client leaves as dicts (links, params, webhook state, checks).
    loose = {
        "AdapterLinks",
        "ExportLinks",
        "FinetuneLinks",
        "GenerationLinks",
        "WebhookPublic",
        "HealthPublic",
    }
    assert set(schemas) - requests - loose == set(SCHEMA_OF.values())
