"""Requests follow their base's family and guidance kind (app/families.py): generation defaults
per family, what a family does not use refused by name (negative_prompt on FLUX.1 [dev] and
[schnell], guidance_scale on a base distilled without guidance, a scheduler the family does not
run), sides kept to the family's multiple, fine-tune defaults per family; GET /v1/bases/{name}
shows all of it. A FLUX base guided classifier-free (the built-in models/fashion-flux) takes a
negative prompt. Bases are registry rows, as a worker of each family writes them
(tests/worker/test_families.py checks what a worker writes for each tiny model)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.bases import BaseInfo, describe_folder, register
from app.db import make_engine
from app.families import FINETUNE_DEFAULTS, GENERATION_RULES
from app.models import FinetuneJob, GenerationJob, utcnow
from app.services.finetunes import parse_params
from app.storage import LocalStorage
from tests.api.conftest import alembic_config
from tests.api.factories import make_adapter, make_tenant
from tests.api.test_finetunes import post_finetune

# As workers register the public checkpoints: VAE factor 8, so sides are multiples of 16.
DEV = BaseInfo("flux-dev", "black-forest-labs/FLUX.1-dev", 1024, "flow", 8, "flux", "embedded", 16)
SCHNELL = BaseInfo(
    "flux-schnell", "black-forest-labs/FLUX.1-schnell", 1024, "flow", 8, "flux", "none", 16
)
SD35 = BaseInfo(
    "sd35", "stabilityai/stable-diffusion-3.5-medium", 1024, "flow", 8, "sd3", "cfg", 16
)
SD = "tuneqdm/fashion-sd"  # the test settings' default base (described from its folder)


# The built-in FLUX-family model, described from its folder as its worker registers it.
def _folder_info(folder: Path, name: str) -> BaseInfo:
    info = describe_folder(folder, name=name, bits=4)
    assert info is not None
    return info


FASHION_FLUX = _folder_info(
    Path(__file__).resolve().parents[2] / "models" / "fashion-flux", "tuneqdm/fashion-flux"
)


@pytest.fixture
def headers(session: Session) -> dict[str, str]:
    for info in (DEV, SCHNELL, SD35, FASHION_FLUX):
        register(session, info, worker="gpu-1:1", device="cuda:0")
    session.commit()
    return make_tenant(session).headers


def _generate(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    return client.post("/v1/generations", headers=headers, json={"prompt": "a dog", **body})


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        (DEV.name, (28, 3.5, "euler")),
        (SCHNELL.name, (4, 0.0, "euler")),
        (SD35.name, (28, 7.0, "euler")),
        (SD, (30, 7.5, "ddim")),
        (FASHION_FLUX.name, (28, 4.0, "euler")),
    ],
)
def test_generation_defaults_follow_the_family(
    client: TestClient,
    session: Session,
    headers: dict[str, str],
    base: str,
    expected: tuple[int, float, str],
) -> None:
    r = _generate(client, headers, base=base)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["steps"], body["guidance_scale"], body["scheduler"]) == expected
    row = session.get(GenerationJob, body["id"])
    assert row is not None and (row.steps, row.guidance_scale, row.scheduler) == expected
    # fashion-flux's own side (its model_index.json's _native_resolution).
    native = {SD: 32, FASHION_FLUX.name: 32}.get(base, 1024)
    assert (body["width"], body["height"]) == (native, native)


@pytest.mark.parametrize(
    ("base", "body", "field"),
    [
        (DEV.name, {"negative_prompt": "blurry"}, "negative_prompt"),
        (SCHNELL.name, {"negative_prompt": "blurry"}, "negative_prompt"),
        (SCHNELL.name, {"guidance_scale": 0.0}, "guidance_scale"),
        (DEV.name, {"scheduler": "ddim"}, "scheduler"),
        (DEV.name, {"scheduler": "heun"}, "scheduler"),
        (SD35.name, {"scheduler": "ddim"}, "scheduler"),
        (SD, {"scheduler": "heun"}, "scheduler"),
        (FASHION_FLUX.name, {"scheduler": "ddim"}, "scheduler"),
        (DEV.name, {"width": 1000}, "width"),
        (SD35.name, {"height": 520}, "height"),
    ],
)
def test_what_the_family_does_not_use_is_refused_by_name(
    client: TestClient, headers: dict[str, str], base: str, body: dict[str, Any], field: str
) -> None:
    r = _generate(client, headers, base=base, **body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert [e["field"] for e in problem["errors"]] == [field]
    assert problem["detail"].startswith(field)
    family = {SD35.name: "sd3", SD: "sd"}.get(base, "flux")
    assert f"{base!r}" in problem["detail"] and f"family {family}" in problem["detail"]


def test_what_the_family_uses_is_accepted(client: TestClient, headers: dict[str, str]) -> None:
    for base, body in (
        (DEV.name, {"guidance_scale": 2.0, "negative_prompt": "  ", "width": 1008}),
        (SD35.name, {"negative_prompt": "blurry", "scheduler": "heun", "guidance_scale": 4.5}),
        (SD35.name, {"scheduler": "dpmsolver++", "height": 512}),
        (SD, {"negative_prompt": "blurry", "scheduler": "euler", "guidance_scale": 1.0}),
        (FASHION_FLUX.name, {"negative_prompt": "blue", "guidance_scale": 6.0, "width": 48}),
    ):
        r = _generate(client, headers, base=base, steps=4, **body)
        assert r.status_code == 202, (base, r.text)


def test_an_adapter_brings_its_base_family_rules(
    client: TestClient, session: Session, storage: LocalStorage, headers: dict[str, str]
) -> None:
    tenant = make_tenant(session)
    adapter = make_adapter(session, storage, tenant.tenant, base_model=DEV.name)
    r = _generate(client, tenant.headers, adapter_id=adapter.id, negative_prompt="blurry")
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "negative_prompt"
    r = _generate(client, tenant.headers, adapter_id=adapter.id)
    assert r.status_code == 202 and r.json()["guidance_scale"] == 3.5
    # An adapter of the built-in FLUX model: classifier-free, so its negative prompt is kept.
    adapter = make_adapter(session, storage, tenant.tenant, base_model=FASHION_FLUX.name)
    r = _generate(client, tenant.headers, adapter_id=adapter.id, negative_prompt="blue")
    assert r.status_code == 202, r.text
    assert (r.json()["guidance_scale"], r.json()["negative_prompt"]) == (4.0, "blue")
    row = session.get(GenerationJob, r.json()["id"])
    assert row is not None and (row.negative_prompt, row.steps) == ("blue", 28)


def test_finetune_defaults_follow_the_family(
    client: TestClient, session: Session, headers: dict[str, str]
) -> None:
    r = post_finetune(client, headers, data={"base": DEV.name})
    assert r.status_code == 202, r.text
    row = session.get(FinetuneJob, r.json()["id"])
    # 512 px for FLUX's native 1024 px, as diffusers' DreamBooth script for FLUX trains.
    assert row is not None and row.params["resolution"] == 512
    assert r.json()["params"]["steps"] == 300
    sent = {"resolution": 1000}
    r = post_finetune(client, headers, data={"base": DEV.name, "params": json.dumps(sent)})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "params.resolution"
    assert "a multiple of 16" in r.json()["detail"] and "family flux" in r.json()["detail"]
    r = post_finetune(client, headers)  # the SD default base: its native side, as before
    assert r.status_code == 202 and r.json()["params"]["resolution"] == 32
    # A FLUX model smaller than 512 px trains at its own side (fashion-flux's 32 px).
    r = post_finetune(client, headers, data={"base": FASHION_FLUX.name})
    assert r.status_code == 202 and r.json()["params"]["resolution"] == 32


def test_the_base_shows_its_family_rules_and_defaults(
    client: TestClient, headers: dict[str, str]
) -> None:
    base = client.get(f"/v1/bases/{SCHNELL.name}", headers=headers).json()
    assert (base["family"], base["native_resolution"], base["size_multiple"]) == ("flux", 1024, 16)
    assert base["sizes"] == {"default": 1024, "min": 512, "max": 2048}
    rules = GENERATION_RULES[("flux", "none")]
    assert base["generation"] == {
        "steps": rules.steps,
        "guidance_scale": rules.guidance_scale,
        "guidance": "none",
        "guidance_meaning": rules.describe_guidance(),
        "scheduler": "euler",
        "schedulers": ["euler"],
        "negative_prompt": False,
    }
    assert base["finetune"] == {
        "steps": 300,
        "lr_s_in": 1e-2,  # FLUX's own (app/families.py FINETUNE_DEFAULTS)
        "lr_s_out": None,
        "batch_size": 1,
        "resolution": 512,
    }
    dev = client.get(f"/v1/bases/{DEV.name}", headers=headers).json()
    assert dev["generation"]["guidance"] == "embedded"
    assert "embedding" in dev["generation"]["guidance_meaning"]
    cfg = client.get(f"/v1/bases/{FASHION_FLUX.name}", headers=headers).json()
    rules = GENERATION_RULES[("flux", "cfg")]
    assert (cfg["family"], cfg["generation"]["guidance"]) == ("flux", "cfg")
    assert cfg["generation"]["guidance_meaning"] == "classifier-free guidance scale"
    assert (cfg["generation"]["steps"], cfg["generation"]["guidance_scale"]) == (28, 4.0)
    assert (rules.steps, rules.guidance_scale, cfg["generation"]["negative_prompt"]) == (
        28,
        4.0,
        True,
    )
    sd3 = client.get(f"/v1/bases/{SD35.name}", headers=headers).json()
    assert (sd3["family"], sd3["generation"]["negative_prompt"]) == ("sd3", True)
    assert set(FINETUNE_DEFAULTS) == {"sd", "sdxl", "sd3", "flux"}


def test_the_migration_serves_existing_bases_by_the_unet_rules(
    new_database: Callable[[], str],
) -> None:
    """Bases registered before migration 0017 were UNet bases: they get `sd`, `cfg` and 8
    (SDXL's family is corrected when its worker registers again); a family outside the four
    is refused by the database."""
    url = new_database()
    cfg = alembic_config(url)
    command.upgrade(cfg, "0016")
    engine = make_engine(url)
    insert = text(
        "INSERT INTO bases (name, source, native_resolution, prediction_type, bits, "
        "created_at, updated_at) VALUES ('sd15', '/m', 512, 'epsilon', 4, :now, :now)"
    )
    try:
        with engine.begin() as c:
            c.execute(insert, {"now": utcnow()})
        command.upgrade(cfg, "head")
        with engine.connect() as c:
            row = c.execute(text("SELECT family, guidance, size_multiple FROM bases")).one()
        assert tuple(row) == ("sd", "cfg", 8)
        with pytest.raises(IntegrityError), engine.begin() as c:
            c.execute(text("UPDATE bases SET family = 'sd4'"))
        command.downgrade(cfg, "0016")
        with engine.connect() as c:
            assert c.execute(text("SELECT name FROM bases")).scalar_one() == "sd15"
    finally:
        engine.dispose()


def test_a_family_override_fills_only_what_the_params_omit() -> None:
    """How a family's own fine-tune default (app/families.py `overrides`) applies: to omitted
    keys only, before what derives from it (sample_every from steps)."""
    sampled = '{"validation_prompts": ["a photo of sks dog"]}'
    params = parse_params(sampled, {"steps": 100})
    assert (params.steps, params.sample_every) == (100, 25)
    params = parse_params('{"steps": 8, "validation_prompts": ["x"]}', {"steps": 100})
    assert (params.steps, params.sample_every) == (8, 2)
    assert parse_params(None, {"lr_s_in": 0.01}).lr_s_in == 0.01
    assert parse_params(None).steps == 300
