"""What a fine-tune takes from its surroundings: a checkpoint directory that does not exist yet
is made at the first checkpoint (alone and in a group), and the adapter's timestep intervals
split the scheduler's own number of training timesteps."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from tests.conftest import subject_photos
from tuneqdm_core.base import BaseModel
from tuneqdm_core.cotrain import CoJob, CoTrainer
from tuneqdm_core.finetune import CHECKPOINT_NAME, FinetuneConfig, Subject, finetune
from tuneqdm_core.model import quant_state

# As in test_finetune.py: rates for a random tiny model whose quantization steps are ~1e-2.
FAST: dict[str, Any] = {"resolution": 32, "lr_s_out": 1e-3, "lr_s_in": 3e-2}
TOY = Subject("a photo of qpv toy", subject_photos(2, size=(32, 32)))


def test_finetune_makes_a_missing_checkpoint_dir(tiny_base: BaseModel, tmp_path: Path) -> None:
    directory = tmp_path / "not" / "there"
    config = FinetuneConfig(steps=3, checkpoint_every=1, **FAST)
    result = finetune(tiny_base, [TOY], config, checkpoint_dir=directory)
    assert len(result.losses) == 3
    assert (directory / CHECKPOINT_NAME).is_file()


def test_a_group_member_gets_its_missing_checkpoint_dir(
    tiny_base: BaseModel, tmp_path: Path
) -> None:
    directory = tmp_path / "new" / "job"
    trainer = CoTrainer(tiny_base)
    config = FinetuneConfig(steps=3, checkpoint_every=1, **FAST)
    trainer.add(CoJob("toy", [TOY], config, checkpoint_dir=directory))
    trainer.add(CoJob("other", [TOY], dataclasses.replace(config, seed=5)))
    outcomes = trainer.run()
    assert {o.key: o.error for o in outcomes} == {"toy": None, "other": None}
    assert (directory / CHECKPOINT_NAME).is_file()


def test_intervals_split_the_schedulers_timesteps(tiny_base: BaseModel) -> None:
    """A scheduler of 500 training timesteps: the adapter says 500 and both of its intervals
    train (with 1000 assumed, every t < 500 fell in interval 0 and interval 1 never moved)."""
    short = dataclasses.replace(
        tiny_base, scheduler_config={**tiny_base.scheduler_config, "num_train_timesteps": 500}
    )
    assert short.num_train_timesteps == 500
    result = finetune(short, [TOY], FinetuneConfig(steps=4, batch_size=2, intervals=2, **FAST))
    adapter = result.adapter
    assert adapter is not None
    assert adapter.config.num_train_timesteps == 500
    s0 = quant_state(tiny_base.unet).base_scales()
    for k in range(2):
        assert not torch.equal(adapter.s_out[k].detach(), s0), f"interval {k} did not train"
    # The scheduler's usual 1000 gives the adapter it always gave.
    assert tiny_base.num_train_timesteps == 1000
    same = finetune(tiny_base, [TOY], FinetuneConfig(steps=2, **FAST)).adapter
    assert same is not None and same.config.num_train_timesteps == 1000
