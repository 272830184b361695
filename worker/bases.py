"""A worker tells the registry which base it serves (app/bases.py, GET /v1/bases).

At start, from the model folder's config JSON (no torch, no model load: the API can size
requests before the first job loads the model); once the model is loaded, with what only the
loaded model knows (fingerprint, device, storage mode); and every TUNEQDM_BASE_SEEN_EVERY_S
its last_seen_at, so an operator sees which workers are alive. Registration failures are
logged and retried on the next beat: they never stop the worker from serving jobs.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from app.bases import BaseInfo, describe_configs, describe_folder, register
from app.models import GUIDANCE_KINDS, Family, Guidance
from app.settings import Settings
from worker.jobs import worker_name

if TYPE_CHECKING:
    from tuneqdm_core.base import BaseModel

log = logging.getLogger(__name__)


def folder_info(settings: Settings) -> BaseInfo | None:
    source = settings.model or (
        str(settings.default_model_dir)
        if (settings.default_model_dir / "model_index.json").is_file()
        else None
    )
    if source is None:
        # The random tiny model is built on first load; registered then.
        return None
    return describe_folder(source, name=settings.base_model, bits=settings.bits)


def loaded_info(settings: Settings, base: BaseModel) -> BaseInfo:
    """The description of the model as loaded (also right for a hub id): the same rules as a
    folder's (app.bases.describe_configs), read from the loaded denoiser's config (a UNet's,
    or a transformer family's) instead of its JSON file. The guidance kind is the one the core
    generates with (``base.guidance``), so what the API accepts is what the worker runs."""
    family: Family = base.family.name
    if base.guidance not in GUIDANCE_KINDS:
        raise ValueError(f"the core's guidance kind {base.guidance!r} is not one the service knows")
    guidance: Guidance = base.guidance  # narrowed by the check above
    denoiser = dict(base.unet.config)
    if isinstance(denoiser.get("sample_size"), tuple):
        denoiser["sample_size"] = list(denoiser["sample_size"])
    return describe_configs(
        name=settings.base_model,
        source=base.source,
        bits=settings.bits,
        family=family,
        guidance=guidance,
        denoiser=denoiser,
        vae_scale_factor=base.vae_scale_factor,
        scheduler=dict(base.scheduler_config),
        index=dict(base.extra.get("index", {})),
    )


def register_worker(
    sessions: sessionmaker[Session],
    info: BaseInfo,
    *,
    device: str | None = None,
    fingerprint: str | None = None,
    storage_mode: str | None = None,
) -> None:
    with sessions() as session:
        register(
            session,
            info,
            worker=worker_name(),
            fingerprint=fingerprint,
            device=device,
            storage_mode=storage_mode,
        )
        session.commit()


class Registrar:
    """Registers at start, on model load, and refreshes last_seen_at on a timer."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.info: BaseInfo | None = None
        self.loaded: dict[str, str] = {}
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def beat(self) -> bool:
        """Register (or refresh) this worker; whether the registry has it now."""
        with self._lock:
            info = self.info or folder_info(self.settings)
            if info is None:
                return False
            self.info = info
            try:
                register_worker(self.sessions, info, device=self.settings.device, **self.loaded)
            except Exception:
                log.exception("could not register base %s; retrying later", info.name)
                return False
            return True

    def run(self) -> None:
        ready = self.settings.worker_ready_file
        if ready is not None:
            self._preload(ready)
        while True:
            self.beat()
            if self.stop.wait(self.settings.base_seen_every_s):
                return

    def _preload(self, ready: Path) -> None:
        """Load the base now and say so in the ready file once it is registered with what the
        loaded model knows (docker-compose's health check: a worker still downloading a
        checkpoint is not healthy)."""
        from worker.runtime import get_runtime

        try:
            _ = get_runtime(self.settings).base  # calls on_load, which registers
        except Exception:
            log.exception("the base model could not be loaded; this worker is not ready")
            return
        while not self.loaded or not self.beat():
            if self.stop.wait(min(5.0, self.settings.base_seen_every_s)):
                return
        ready.parent.mkdir(parents=True, exist_ok=True)
        ready.write_text(f"{self.settings.base_model}\n")
        log.info("base %s loaded and registered; ready (%s)", self.settings.base_model, ready)

    def on_load(self, base: BaseModel) -> None:
        self.info = loaded_info(self.settings, base)
        self.loaded = {"fingerprint": base.fingerprint, "storage_mode": base.storage_mode}
        self.beat()
