"""What the service knows about a base model: its description, the sizes it accepts, its row.

Shared by the API and the worker (no FastAPI, no torch). A base is described by the same
facts whoever reads them: the worker registers them when it starts (from the model folder's
config JSON) and again once the model is loaded (fingerprint, device, storage mode); the API
reads them from the registry, or, before any worker registered, from the model folder itself.
Every default and bound of a request derives from this description (docs/api.md "Sizes").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import families
from app.db import database_now
from app.families import family_of, guidance_of
from app.models import BaseWorker, Family, Guidance, ServedBase
from app.settings import Settings

# The side of a generated image a FLUX pipeline makes when asked none, in latent pixels:
# FluxPipeline's `default_sample_size`, a constant of the pipeline (FLUX transformer configs
# carry no sample_size), multiplied there by the VAE's scale factor (1024 px for FLUX.1).
FLUX_SAMPLE_SIZE = 128
# The model_index.json key of the side a model was trained at, where its configs do not say
# it (the built-in models/fashion-flux: 32 px); restates the core's NATIVE_RESOLUTION_KEY
# (tuneqdm_core.families.flow), which the API cannot import without torch.
NATIVE_RESOLUTION_KEY = "_native_resolution"
# Every requested side is a multiple of this (the schemas' multiple_of); a family may need more.
SIZE_STEP = 8


@dataclass(frozen=True)
class BaseInfo:
    """The facts of a base that requests depend on."""

    name: str
    source: str
    native_resolution: int  # the pipeline's default side: sample size × VAE scale factor
    prediction_type: str
    bits: int
    family: Family = "sd"
    guidance: Guidance = "cfg"
    # Sides must be multiples of this: 8 for UNets; VAE factor × 2 for FLUX (2×2 latent
    # patches packed into tokens) and for SD3 (its transformer's patch size).
    size_multiple: int = SIZE_STEP


@dataclass(frozen=True)
class SizeRange:
    """Accepted image sides (fine-tune resolution, generation width/height)."""

    default: int
    min: int
    max: int
    multiple: int = SIZE_STEP

    def describe(self) -> str:
        return f"between {self.min} and {self.max} (a multiple of {self.multiple})"

    def accepts(self, side: int) -> bool:
        return self.min <= side <= self.max and side % self.multiple == 0


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def describe_folder(folder: str | Path, *, name: str, bits: int) -> BaseInfo | None:
    """A diffusers model folder's description from its config files, or None when `folder` is
    not a local model folder (a hub id: only a worker that downloaded it can describe it)."""
    root = Path(folder)
    configs = [root / part / "config.json" for part in ("unet", "transformer")]
    denoiser_config = next((path for path in configs if path.is_file()), None)
    if denoiser_config is None:
        return None
    denoiser = _read_json(denoiser_config)
    index_file = root / "model_index.json"
    index = _read_json(index_file) if index_file.is_file() else {}
    vae_config = root / "vae" / "config.json"
    # diffusers' VaeImageProcessor rule: one halving per VAE block after the first (8 for SD).
    blocks = len(_read_json(vae_config)["block_out_channels"]) if vae_config.is_file() else 4
    scheduler_config = root / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_config) if scheduler_config.is_file() else {}
    family = family_of(index, denoiser)
    return describe_configs(
        name=name,
        source=str(folder),
        bits=bits,
        family=family,
        guidance=guidance_of(family, index, denoiser),
        index=index,
        denoiser=denoiser,
        vae_scale_factor=2 ** (blocks - 1),
        scheduler=scheduler,
    )


def describe_configs(
    *,
    name: str,
    source: str,
    bits: int,
    family: Family,
    guidance: Guidance,
    denoiser: dict[str, Any],
    vae_scale_factor: int,
    scheduler: dict[str, Any],
    index: dict[str, Any],
) -> BaseInfo:
    """A base's description from its family and guidance kind, its denoiser's (UNet's or
    transformer's) config, its VAE's scale factor and its scheduler config: the same facts
    whether read from the folder's JSON (describe_folder) or from the loaded model
    (worker/bases.py)."""
    if family == "flux":
        sample_size: Any = FLUX_SAMPLE_SIZE
        multiple = vae_scale_factor * 2
    else:
        # StableDiffusion3Pipeline's default_sample_size is its transformer's sample_size, as
        # the UNet pipelines' is their UNet's.
        sample_size = denoiser["sample_size"]
        multiple = vae_scale_factor * int(denoiser.get("patch_size", 1))
    if isinstance(sample_size, list):  # non-square UNets give [h, w]; the short side bounds
        sample_size = min(sample_size)
    if family in ("flux", "sd3"):
        prediction = "flow"  # the velocity noise − latents (tuneqdm_core.families.flow)
    else:
        prediction = str(scheduler.get("prediction_type", "epsilon"))
    native = int(sample_size) * vae_scale_factor
    if family == "flux":  # FLUX configs record no side; the index may (the built-in model's)
        native = int(index.get(NATIVE_RESOLUTION_KEY) or native)
    return BaseInfo(
        name=name,
        source=source,
        native_resolution=native,
        prediction_type=prediction,
        bits=bits,
        family=family,
        guidance=guidance,
        size_multiple=math.lcm(SIZE_STEP, multiple),
    )


def size_range(native: int, settings: Settings, multiple: int = SIZE_STEP) -> SizeRange:
    """native × [MIN_SIZE_FACTOR, MAX_SIZE_FACTOR], rounded inwards to multiples of
    `multiple` (the base's size_multiple)."""
    low = max(multiple, multiple * math.ceil(native * settings.min_size_factor / multiple))
    high = max(low, multiple * math.floor(native * settings.max_size_factor / multiple))
    return SizeRange(default=native, min=low, max=high, multiple=multiple)


def sizes_of(info: BaseInfo, settings: Settings) -> SizeRange:
    return size_range(info.native_resolution, settings, info.size_multiple)


def finetune_defaults(info: BaseInfo, sizes: SizeRange) -> dict[str, Any]:
    """What a fine-tune of this base trains with where its params omit a value."""
    return families.finetune_defaults(
        info.family, native=sizes.default, low=sizes.min, high=sizes.max, multiple=sizes.multiple
    )


def info_of(row: ServedBase) -> BaseInfo:
    return BaseInfo(
        name=row.name,
        source=row.source,
        native_resolution=row.native_resolution,
        prediction_type=row.prediction_type,
        bits=row.bits,
        family=row.family,  # type: ignore[arg-type]
        guidance=row.guidance,  # type: ignore[arg-type]
        size_multiple=row.size_multiple,
    )


def register(
    session: Session,
    info: BaseInfo,
    *,
    worker: str | None = None,
    fingerprint: str | None = None,
    device: str | None = None,
    storage_mode: str | None = None,
) -> ServedBase:
    """Insert or update the base's row (and the worker's), in the caller's transaction.

    Fields given as None keep their stored value: a worker that has not loaded its model yet
    does not erase the fingerprint an earlier load wrote. Times are the database's clock, so
    the API judges a worker's liveness without either host's skew (app.services.bases.up_since).
    """
    now = database_now(session)
    row = session.get(ServedBase, info.name)
    if row is None:
        row = ServedBase(name=info.name, created_at=now)
        session.add(row)
    row.source = info.source
    row.native_resolution = info.native_resolution
    row.prediction_type = info.prediction_type
    row.bits = info.bits
    row.family = info.family
    row.guidance = info.guidance
    row.size_multiple = info.size_multiple
    row.updated_at = now
    for field, value in (
        ("fingerprint", fingerprint),
        ("device", device),
        ("storage_mode", storage_mode),
    ):
        if value is not None:
            setattr(row, field, value)
    if worker is not None:
        seen = session.scalar(
            select(BaseWorker).where(BaseWorker.base_name == info.name, BaseWorker.worker == worker)
        )
        if seen is None:
            seen = BaseWorker(base_name=info.name, worker=worker)
            session.add(seen)
        seen.device = device or seen.device
        seen.last_seen_at = now
    return row
