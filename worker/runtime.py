"""What a worker process holds: the ONE shared quantized base, recently used adapters, a bank.

Everything here loads lazily on first use (the base from the on-disk quantized cache), so
importing the worker touches neither torch nor CUDA, and a process that only delivers webhooks
never loads a model. Tasks run one at a time per process (prefetch 1, one process per GPU), so
a lock is enough to make the first load happen once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from app.settings import Settings
from worker import metrics

if TYPE_CHECKING:
    from tuneqdm_core.adapter import Adapter
    from tuneqdm_core.base import BaseModel
    from tuneqdm_core.routing import ScaleBank

log = logging.getLogger(__name__)


def ensure_default_model(settings: Settings) -> str:
    """The model to load: the setting, else the shipped built-in model, else a random tiny model
    built into <data_dir>/models/tiny-sd the first time it is needed (atomically: another
    process may be building it too)."""
    if settings.model:
        return settings.model
    target = settings.default_model_dir
    if (target / "model_index.json").is_file():
        return str(target)
    from tuneqdm_core.builtin.tiny import save_tiny_pipeline

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-sd-"))
    try:
        save_tiny_pipeline(tmp)
        try:
            os.rename(tmp, target)
            log.info("built the tiny model in %s", target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._base: BaseModel | None = None
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()
        self._bank: ScaleBank | None = None
        self._lock = threading.Lock()
        # Called once with the loaded base (worker/bases.py registers its fingerprint).
        self.on_load: Callable[[BaseModel], None] | None = None

    @property
    def loaded(self) -> bool:
        return self._base is not None

    @property
    def base(self) -> BaseModel:
        with self._lock:
            if self._base is None:
                self._base = self._load_base()
                if self.on_load is not None:
                    try:
                        self.on_load(self._base)
                    except Exception:
                        # Bookkeeping only: a registry hiccup must not fail the job.
                        log.exception("the on_load hook of the base failed")
            return self._base

    def _load_base(self) -> BaseModel:
        import torch

        from tuneqdm_core.base import load_base
        from tuneqdm_core.model import QuantConfig

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        start = time.perf_counter()
        source = ensure_default_model(self.settings)
        cache_dir = self.settings.resolved_quant_cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)
        base = load_base(
            source,
            quant=QuantConfig(bits=4 if self.settings.bits == 4 else 8),
            cache_dir=cache_dir,
            device=self.settings.device,
            config=self.settings.single_file_config,
            storage_mode=self.settings.storage_mode,
            text_encoder_bits=self.settings.text_encoder_bits,
        )
        seconds = time.perf_counter() - start
        metrics.base_loaded(self.settings.base_model, seconds)
        log.info(
            "base %s (%d-bit, %s, %s) loaded in %.2f s (%s)",
            source,
            self.settings.bits,
            self.settings.device,
            base.storage_mode,
            seconds,
            "from the quantized cache" if base.from_cache else "quantized now, cached",
        )
        return base

    def adapter(self, adapter_id: str, path: Path | Callable[[], Path]) -> Adapter:
        """An adapter checked against the base, from memory when it was used recently; `path`
        may be a callable, called only when the file is needed (it may download it)."""
        from tuneqdm_core.serialization import load_adapter

        cached = self._adapters.get(adapter_id)
        if cached is not None:
            self._adapters.move_to_end(adapter_id)
            return cached
        base = self.base
        adapter = load_adapter(path() if callable(path) else path, base.unet, device=base.device)
        self._adapters[adapter_id] = adapter
        while len(self._adapters) > self.settings.adapter_cache_size:
            self._adapters.popitem(last=False)
        return adapter

    def forget_adapter(self, adapter_id: str) -> None:
        self._adapters.pop(adapter_id, None)

    def bank(self, adapters: int, intervals: int) -> ScaleBank:
        """The one serving bank, grown only when a batch needs more slots or intervals."""
        from tuneqdm_core.routing import ScaleBank

        bank = self._bank
        if bank is None or bank.slots < adapters + 1 or bank.max_intervals < intervals:
            slots = max(adapters, self.settings.generation_batch_size) + 1
            max_intervals = max(intervals, 2, bank.max_intervals if bank is not None else 1)
            bank = self._bank = ScaleBank(
                self.base.unet,
                slots=slots,
                max_intervals=max_intervals,
                num_train_timesteps=self.base.num_train_timesteps,
            )
        return bank


_runtime: Runtime | None = None


def get_runtime(settings: Settings | None = None) -> Runtime:
    """The process-wide runtime (one base per worker process)."""
    global _runtime
    if _runtime is None:
        from app.settings import get_settings

        _runtime = Runtime(settings or get_settings())
    return _runtime
