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

from app.db import database_now
from app.models import BaseWorker, ServedBase
from app.settings import Settings


@dataclass(frozen=True)
class BaseInfo:
    """The facts of a base that requests depend on."""

    name: str
    source: str
    native_resolution: int  # UNet sample_size × VAE scale factor, in pixels
    prediction_type: str
    bits: int


@dataclass(frozen=True)
class SizeRange:
    """Accepted image sides (fine-tune resolution, generation width/height), multiples of 8."""

    default: int
    min: int
    max: int

    def describe(self) -> str:
        return f"between {self.min} and {self.max} (a multiple of 8)"


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def describe_folder(folder: str | Path, *, name: str, bits: int) -> BaseInfo | None:
    """A diffusers model folder's description from its config files, or None when `folder` is
    not a local model folder (a hub id: only a worker that downloaded it can describe it)."""
    root = Path(folder)
    unet_config = root / "unet" / "config.json"
    if not unet_config.is_file():
        return None
    unet = _read_json(unet_config)
    vae_config = root / "vae" / "config.json"
    # diffusers' VaeImageProcessor rule: one halving per VAE block after the first (8 for SD).
    blocks = len(_read_json(vae_config)["block_out_channels"]) if vae_config.is_file() else 4
    scheduler_config = root / "scheduler" / "scheduler_config.json"
    prediction = (
        _read_json(scheduler_config).get("prediction_type", "epsilon")
        if scheduler_config.is_file()
        else "epsilon"
    )
    sample_size = unet["sample_size"]
    if isinstance(sample_size, list):  # non-square UNets give [h, w]; the short side bounds
        sample_size = min(sample_size)
    return BaseInfo(
        name=name,
        source=str(folder),
        native_resolution=int(sample_size) * 2 ** (blocks - 1),
        prediction_type=str(prediction),
        bits=bits,
    )


def size_range(native: int, settings: Settings) -> SizeRange:
    """native × [MIN_SIZE_FACTOR, MAX_SIZE_FACTOR], rounded inwards to multiples of 8."""
    low = max(8, 8 * math.ceil(native * settings.min_size_factor / 8))
    high = max(low, 8 * math.floor(native * settings.max_size_factor / 8))
    return SizeRange(default=native, min=low, max=high)


def info_of(row: ServedBase) -> BaseInfo:
    return BaseInfo(
        name=row.name,
        source=row.source,
        native_resolution=row.native_resolution,
        prediction_type=row.prediction_type,
        bits=row.bits,
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
