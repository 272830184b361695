"""The export task in-process: an export row → a LoRA / merged UNet file that diffusers loads,
a row that says it succeeded (or why it failed), nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

from app import storage as st
from app.models import Adapter, AdapterExport, Tenant
from app.schemas import ExportCreate
from app.services.adapters import delete_adapter
from app.services.exports import create_export
from tests.api.factories import RecordingSender, make_adapter
from tests.core.helpers import perturbed_adapter
from tuneqdm_core import AdapterConfig, save_adapter, set_route, use_adapter
from tuneqdm_core.export import METADATA_KEY
from worker.context import Context
from worker.exports import run_export


def _adapter_row(
    ctx: Context, tenant: Tenant, tmp_path: Path, base_model: str | None = None
) -> str:
    """A trained-looking adapter (perturbed scales) for the worker's base, stored like the
    worker stores a fine-tune's."""
    torch.manual_seed(0)
    adapter = perturbed_adapter(ctx.runtime.base.unet, AdapterConfig(intervals=2))
    tmp = tmp_path / "made.safetensors"
    save_adapter(adapter, tmp)
    with ctx.sessions() as session:
        row = make_adapter(
            session,
            ctx.storage,
            session.merge(tenant),
            base_model=base_model or ctx.settings.base_model,
            content=tmp.read_bytes(),
        )
        return row.id


def _ask(ctx: Context, tenant: Tenant, adapter_id: str, **data: object) -> str:
    with ctx.sessions() as session:
        row, queued = create_export(
            session=session,
            sender=RecordingSender(),
            settings=ctx.settings,
            tenant=session.merge(tenant),
            adapter_id=adapter_id,
            data=ExportCreate(**data),  # type: ignore[arg-type]
        )
        assert queued
        return row.id


def _row(ctx: Context, export_id: str) -> AdapterExport:
    with ctx.sessions() as session:
        row = session.get(AdapterExport, export_id)
        assert row is not None
        return row


@torch.no_grad()
def _outputs(unet: torch.nn.Module, adapter: object | None, t: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    embeds = torch.randn(1, 77, 32, generator=generator)
    if adapter is not None:
        use_adapter(unet, adapter, [t])  # type: ignore[arg-type]
    try:
        return unet(x, t, encoder_hidden_states=embeds).sample
    finally:
        if adapter is not None:
            set_route(unet, None)


def test_lora_and_merged_exports_load_into_a_float_pipeline(
    ctx: Context, tenant: Tenant, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter_id = _adapter_row(ctx, tenant, tmp_path)
    with ctx.sessions() as session:
        stored = session.get(Adapter, adapter_id)
        assert stored is not None
        adapter = ctx.runtime.adapter(adapter_id, ctx.storage.path(stored.storage_key))
    want = _outputs(ctx.runtime.base.unet, adapter, 100)

    lora_id = _ask(ctx, tenant, adapter_id, format="lora", rank=128, interval="0")
    assert run_export(lora_id, ctx) == "succeeded"
    row = _row(ctx, lora_id)
    path = ctx.storage.path(st.export_key(tenant.id, lora_id))
    assert (row.status, row.storage_key, row.error) == (
        "succeeded",
        path.relative_to(ctx.storage.root).as_posix(),
        None,
    )
    assert row.size_bytes == path.stat().st_size and row.relative_error == 0.0
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[METADATA_KEY])
    assert metadata["tokens"] == ["sks"] and metadata["rank"] == 128
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(path)
    got = _outputs(pipe.unet, None, 100)
    assert float((got - want).norm() / want.norm()) < 1e-5  # full rank: exact
    # A second delivery of the message does nothing.
    assert run_export(lora_id, ctx) == "skipped (succeeded)"

    merged_id = _ask(ctx, tenant, adapter_id, format="merged", interval="0")
    assert run_export(merged_id, ctx) == "succeeded"
    merged_path = ctx.storage.path(st.export_key(tenant.id, merged_id))
    unet = UNet2DConditionModel.from_single_file(
        str(merged_path), config=str(tiny_model_dir), subfolder="unet"
    )
    with safe_open(str(merged_path), framework="pt") as handle:  # the service merges to fp16
        assert handle.get_tensor("conv_in.weight").dtype == torch.float16
    got = _outputs(unet.float(), None, 100)
    assert float((got - want).norm() / want.norm()) < 1e-2

    # Deleting the adapter takes its exports with it.
    with ctx.sessions() as session:
        delete_adapter(
            session=session,
            storage=ctx.storage,
            tenant=session.merge(tenant),
            adapter_id=adapter_id,
        )
    assert not path.exists() and not merged_path.exists()


def test_an_export_of_another_bases_adapter_is_left_to_that_bases_workers(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    adapter_id = _adapter_row(ctx, tenant, tmp_path, base_model="someone/else")
    export_id = _ask(ctx, tenant, adapter_id, format="lora", rank=4)
    assert run_export(export_id, ctx) == "skipped (held by another worker)"
    row = _row(ctx, export_id)
    assert (row.status, row.attempts, row.base_model) == ("queued", 0, "someone/else")
    assert not ctx.storage.path(st.export_key(tenant.id, export_id)).exists()


def test_an_export_of_a_deleted_adapter_is_skipped(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    adapter_id = _adapter_row(ctx, tenant, tmp_path)
    export_id = _ask(ctx, tenant, adapter_id, format="merged")
    with ctx.sessions() as session:
        delete_adapter(
            session=session,
            storage=ctx.storage,
            tenant=session.merge(tenant),
            adapter_id=adapter_id,
        )
    assert run_export(export_id, ctx) == "missing"
    assert not (ctx.storage.root / "tenants" / tenant.id / "exports").exists()
