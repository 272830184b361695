"""The bad-input catalogue: each case gets a 4xx with a message, and nothing is stored.

One test walks the whole catalogue; `snapshot` compares every table's row count and every file
under the storage root before and after each request.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session

from app.storage import LocalStorage
from tests.api.factories import TenantKey, image_bytes, make_adapter, make_tenant, snapshot
from tests.api.http import Response

PNG = image_bytes(64, 64)


def assert_problem(r: Response, status: int) -> None:
    """An RFC 9457 problem of `status`; a validation problem names each field at fault."""
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body = r.json()
    assert body["status"] == status and body["type"].startswith("urn:tuneqdm:problem:")
    assert isinstance(body["detail"], str) and body["detail"] and body["title"]
    assert set(body) <= {"type", "title", "status", "detail", "errors"}, body
    for e in body.get("errors", []):
        assert set(e) == {"field", "message"} and e["field"] and e["message"], e


def _bomb() -> bytes:
    # 2000x2000 = 4 M pixels (limit in tests: 1 M) in a few kB: a decompression bomb in miniature.
    buf = io.BytesIO()
    Image.new("1", (2000, 2000)).save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


@dataclass
class Case:
    name: str
    status: int
    expect: str  # a phrase the message must contain, so it tells the user what to fix
    files: list[tuple[str, bytes]] | None = None  # (file name, content); None = one good PNG
    form: dict[str, str] | None = None
    headers: dict[str, str] | None = None


def _files(*items: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    return list(items)


PEQA_2_INTERVALS = json.dumps({"method": "peqa", "intervals": 2})

FOUR_PROMPTS = {"validation_prompts": ["a photo of sks dog"] * 4}
EVERY_80 = {"sample_every": 80}

FINETUNE_CASES = [
    Case("no images", 422, "at least 1 photo", files=[]),
    Case("too many images", 422, "limit is 4", files=_files(*[("a.png", PNG)] * 5)),
    Case("non-image with .png name", 422, "not a readable", files=_files(("a.png", b"hello"))),
    Case("html with .jpg name", 422, "not a readable", files=_files(("a.jpg", b"<html></html>"))),
    Case("truncated image", 422, "truncated", files=_files(("a.png", PNG[: len(PNG) // 2]))),
    Case(
        "truncated jpeg", 422, "truncated", files=_files(("a.jpg", image_bytes(fmt="JPEG")[:300]))
    ),
    Case("empty file", 422, "empty", files=_files(("a.png", b""))),
    Case("gif", 422, "GIF image", files=_files(("a.gif", _gif()))),
    Case("decompression bomb", 422, "above the limit", files=_files(("a.png", _bomb()))),
    Case("file above byte limit", 413, "larger than", files=_files(("a.png", os.urandom(300_000)))),
    Case("request above byte limit", 413, "request body", files=_files(("a", os.urandom(5 << 20)))),
    Case("empty prompt", 422, "instance_prompt is empty", form={"instance_prompt": "   "}),
    Case("over-long prompt", 422, "limit of 200", form={"instance_prompt": "sks " + "a" * 300}),
    Case("over-long class prompt", 422, "limit of 200", form={"class_prompt": "a" * 201}),
    Case("NUL in prompt", 422, "NUL", form={"instance_prompt": "a sks\x00dog"}),
    Case("prompt without token", 422, "identifier token", form={"instance_prompt": "a dog"}),
    Case("token as part of a word", 422, "identifier token", form={"instance_prompt": "a sksx"}),
    Case("bad token", 422, "token must be", form={"token": "s k s"}),
    Case("unknown param", 422, "params.stepz", form={"params": '{"stepz": 10}'}),
    Case("steps out of range", 422, "params.steps", form={"params": '{"steps": 0}'}),
    Case("steps too many", 422, "params.steps", form={"params": '{"steps": 100000}'}),
    Case("resolution not /8", 422, "params.resolution", form={"params": '{"resolution": 100}'}),
    Case(
        "resolution too small",
        422,
        "params.resolution=8 must be between 16 and 64",
        form={"params": '{"resolution": 8}'},
    ),
    Case(
        "resolution too big for the base",
        422,
        "params.resolution=512 must be between 16 and 64",
        form={"params": '{"resolution": 512}'},
    ),
    Case(
        "above the compute budget",
        422,
        "TUNEQDM_MAX_FINETUNE_COST",
        form={"params": '{"steps": 5000, "batch_size": 4}'},
    ),
    Case(
        "costly progress images",
        422,
        "progress images",
        form={"params": json.dumps({"steps": 4000, "batch_size": 2, **FOUR_PROMPTS, **EVERY_80})},
    ),
    Case(
        "too many validation prompts",
        422,
        "params.validation_prompts: List should have at most 4 items",
        form={"params": json.dumps({"validation_prompts": ["sks dog"] * 5})},
    ),
    Case(
        "empty validation prompt",
        422,
        "params.validation_prompts[1] is empty",
        form={"params": json.dumps({"validation_prompts": ["sks dog", " "]})},
    ),
    Case(
        "over-long validation prompt",
        422,
        "params.validation_prompts[0] has 201 characters",
        form={"params": json.dumps({"validation_prompts": ["a" * 201]})},
    ),
    Case(
        "validation prompt not text",
        422,
        "params.validation_prompts.0",
        form={"params": json.dumps({"validation_prompts": [3]})},
    ),
    Case(
        "sample_every 0",
        422,
        "params.sample_every",
        form={"params": json.dumps({"sample_every": 0, **FOUR_PROMPTS})},
    ),
    Case(
        "sample_every without prompts",
        422,
        "sample_every needs validation_prompts",
        form={"params": '{"sample_every": 10}'},
    ),
    Case(
        "sample_every too often",
        422,
        "sample_every=1 makes 300 sets of progress images",
        form={"params": json.dumps({"sample_every": 1, **FOUR_PROMPTS})},
    ),
    Case(
        "keep_checkpoints not a bool",
        422,
        "params.keep_checkpoints",
        form={"params": '{"keep_checkpoints": "yes"}'},
    ),
    Case(
        "keep_checkpoints without prompts",
        422,
        "keep_checkpoints keeps the adapter at the progress-image steps, so it needs",
        form={"params": '{"keep_checkpoints": true}'},
    ),
    Case("bad lr", 422, "params.lr_s_out", form={"params": '{"lr_s_out": -1}'}),
    Case("unknown method", 422, "params.method", form={"params": '{"method": "lora"}'}),
    Case("peqa intervals", 422, "intervals must be 1", form={"params": PEQA_2_INTERVALS}),
    Case("params not JSON", 422, "params is not valid", form={"params": "{steps: 1"}),
    Case("params not an object", 422, "params is not valid", form={"params": "[1, 2]"}),
    Case("webhook ftp", 422, "http:// or https://", form={"webhook_url": "ftp://x.org/h"}),
    Case("webhook no host", 422, "no host", form={"webhook_url": "http:///h"}),
    Case("webhook loopback", 422, "loopback", form={"webhook_url": "http://127.0.0.1/h"}),
    Case("webhook localhost", 422, "loopback", form={"webhook_url": "http://localhost:8000/"}),
    Case("webhook private", 422, "loopback", form={"webhook_url": "https://10.1.2.3/h"}),
    Case("webhook 192.168", 422, "loopback", form={"webhook_url": "http://192.168.0.1/h"}),
    Case("webhook metadata", 422, "loopback", form={"webhook_url": "http://169.254.169.254/"}),
    Case("webhook ipv6 loop", 422, "loopback", form={"webhook_url": "http://[::1]:80/"}),
    Case("webhook mapped", 422, "loopback", form={"webhook_url": "http://[::ffff:127.0.0.1]/"}),
    Case("webhook decimal ip", 422, "loopback", form={"webhook_url": "http://2130706433/"}),
    Case("webhook short ip", 422, "loopback", form={"webhook_url": "http://127.1/"}),
    Case("webhook zero", 422, "loopback", form={"webhook_url": "http://0.0.0.0/"}),
    Case("webhook bad port", 422, "not a valid URL", form={"webhook_url": "http://a.org:99999/"}),
    Case("webhook with space", 422, "control", form={"webhook_url": "https://a.org/a b"}),
    Case("webhook creds", 422, "credentials", form={"webhook_url": "https://u:p@a.org/"}),
    Case(
        "idempotency key too long", 422, "Idempotency-Key", headers={"Idempotency-Key": "k" * 300}
    ),
]


def _post_finetune(client: TestClient, t: TenantKey, case: Case) -> Response:
    files = case.files if case.files is not None else [("good.png", PNG)]
    form = {"instance_prompt": "a photo of sks dog"} | (case.form or {})
    return client.post(
        "/v1/finetunes",
        headers=t.headers | (case.headers or {}),
        files=[("images", (name, data, "image/png")) for name, data in files] or None,
        data=form,
    )


def _generation_cases(
    own_ok: str, own_running: str, foreign: str, other_base: str
) -> list[tuple[str, int, str, dict[str, Any]]]:
    return [
        ("empty prompt", 422, "prompt", {"prompt": ""}),
        ("blank prompt", 422, "prompt is empty", {"prompt": "   "}),
        ("over-long prompt", 422, "limit of 200", {"prompt": "a" * 201}),
        ("over-long negative", 422, "limit of 200", {"negative_prompt": "a" * 201}),
        ("NUL in prompt", 422, "NUL", {"prompt": "a\u0000b"}),
        ("unknown field", 422, "Extra inputs", {"cfg": 3}),
        ("unknown adapter", 422, "does not name one of your adapters", {"adapter_id": "ad_1"}),
        ("foreign adapter", 422, "does not name one of your adapters", {"adapter_id": foreign}),
        (
            "fine-tune not succeeded",
            409,
            "wait until it has succeeded",
            {"adapter_id": own_running},
        ),
        ("adapter of another base", 409, "base model", {"adapter_id": other_base}),
        ("too many images", 422, "num_images=5", {"num_images": 5}),
        ("zero images", 422, "num_images", {"num_images": 0}),
        ("too many steps", 422, "steps=151", {"steps": 151}),
        ("width not /8", 422, "multiple of 8", {"width": 100}),
        ("width too big", 422, "width=2048", {"width": 2048}),
        ("width above the base's range", 422, "between 16 and 64", {"width": 512}),
        ("height too small", 422, "height=8", {"height": 8}),
        (
            "above the compute budget",
            422,
            "TUNEQDM_MAX_GENERATION_COST",
            {"num_images": 4, "steps": 150, "width": 64, "height": 64},
        ),
        ("guidance out of range", 422, "guidance_scale", {"guidance_scale": 31}),
        ("negative seed", 422, "seed", {"seed": -1}),
        ("unknown scheduler", 422, "scheduler", {"scheduler": "pndm"}),
        ("ok adapter, bad steps", 422, "steps", {"adapter_id": own_ok, "steps": 0}),
    ]


def test_walk_the_whole_catalogue(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    t, other = make_tenant(session), make_tenant(session)
    own_ok = make_adapter(session, storage, t.tenant).id
    own_running = make_adapter(session, storage, t.tenant, job_status="running").id
    other_base = make_adapter(session, storage, t.tenant, base_model="runwayml/sd-1.5").id
    foreign = make_adapter(session, storage, other.tenant).id
    before = snapshot(session, storage)

    def check(name: str, r: Response, status: int, expect: str) -> None:
        assert r.status_code == status, (name, r.status_code, r.text)
        assert_problem(r, status)
        detail = r.json()["detail"]
        assert expect in detail, (name, detail)
        assert snapshot(session, storage) == before, f"{name}: something was stored"

    for case in FINETUNE_CASES:
        check(case.name, _post_finetune(client, t, case), case.status, case.expect)
    for name, status, expect, body in _generation_cases(own_ok, own_running, foreign, other_base):
        r = client.post("/v1/generations", headers=t.headers, json={"prompt": "x"} | body)
        check(name, r, status, expect)
    for name, raw in [("not JSON", b"{prompt"), ("JSON list", b"[]")]:
        r = client.post(
            "/v1/generations",
            headers=t.headers | {"Content-Type": "application/json"},
            content=raw,
        )
        check(name, r, 422, "")


@pytest.mark.parametrize("case", FINETUNE_CASES, ids=lambda c: c.name)
def test_each_finetune_case(
    client: TestClient, session: Session, storage: LocalStorage, case: Case
) -> None:
    """The same catalogue one case at a time, so a failure names its case."""
    t = make_tenant(session)
    before = snapshot(session, storage)
    r = _post_finetune(client, t, case)
    assert r.status_code == case.status, r.text
    assert_problem(r, case.status)
    assert case.expect in r.json()["detail"]
    assert snapshot(session, storage) == before


def test_good_request_after_the_catalogue_still_works(client: TestClient, session: Session) -> None:
    # Guards against a catalogue that passes because every request fails for one reason.
    t = make_tenant(session)
    r = _post_finetune(client, t, Case("good", 202, ""))
    assert r.status_code == 202, r.text
