"""Fine-tuning checkpoints: the whole state of a :class:`~tuneqdm_core.training_step.TrainingRun`
(parameters, optimizer, random generator, loss scaler, losses), written atomically and read
back only by the same configuration and base."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tuneqdm_core.base import BaseModel
from tuneqdm_core.finetune_config import FinetuneConfig
from tuneqdm_core.training_step import TrainingRun

CHECKPOINT_NAME = "checkpoint.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # Through a Python file object, so a full disk raises OSError(ENOSPC) (as the
        # exception's context) instead of only torch's "unexpected pos" RuntimeError.
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fingerprint_config(config: FinetuneConfig) -> dict[str, Any]:
    # checkpoint_every does not change the result; everything else must match to resume.
    return {k: v for k, v in asdict(config).items() if k != "checkpoint_every"}


def save_checkpoint(run: TrainingRun, path: Path, config: FinetuneConfig, base: BaseModel) -> None:
    # The directory is made when the run starts (finetune(), CoTrainer.add), not here: one
    # removed while the run trains (its job deleted) is not made again, so the save fails
    # instead of leaving a checkpoint that nobody owns.
    _atomic_save(
        {
            "step": run.step,
            "params": [p.detach().cpu() for p in run.params],
            "optimizer": run.optimizer.state_dict(),
            "generator": run.generator.get_state(),
            "scaler": run.scaler.state_dict(),
            "losses": run.losses,
            "config": _fingerprint_config(config),
            "base": base.fingerprint,
        },
        path,
    )


def restore_checkpoint(
    run: TrainingRun, path: Path, config: FinetuneConfig, base: BaseModel
) -> None:
    state = torch.load(path, weights_only=True)
    if state["config"] != _fingerprint_config(config) or state["base"] != base.fingerprint:
        raise ValueError(f"{path}: made by another configuration or base; delete it")
    with torch.no_grad():
        for p, saved in zip(run.params, state["params"], strict=True):
            p.copy_(saved)
    run.optimizer.load_state_dict(state["optimizer"])
    run.generator.set_state(state["generator"])
    run.scaler.load_state_dict(state["scaler"])
    run.losses, run.step = list(state["losses"]), int(state["step"])


def checkpoint_due(config: FinetuneConfig, step: int) -> bool:
    # The last step saves nothing: the caller writes the adapter itself.
    every = config.checkpoint_every
    return every > 0 and step % every == 0 and step < config.steps
