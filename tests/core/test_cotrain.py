"""Co-batched fine-tuning: each step of a job trained in a group is the step of the same job
trained alone, up to the summation order of batched kernels.

Error measure: ‖grouped − solo‖ / ‖solo‖ per tensor. float64 ≤ 1e-10 over these short runs (3–5
steps); over many steps Adam amplifies the rounding (2.98e-7 after 20 steps at high learning
rates, 1.9e-13 at the defaults), so no longer run is held to that bound. float32: one step's
gradients ≤ 2e-5, the bound of the batched-kernel tests (test_layers.py); losses after a few
steps differ by up to 8.7e-5 in general (these seeds stay within 2e-5); the adapter after a few
steps only ≤ 5e-3, because Adam divides each gradient element by its own magnitude, so float32
rounding of elements near zero becomes a step of up to lr (measured 8.5e-4 on s_out after 4
steps at lr_s_out 1e-3, about a tenth of s_out).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import subject_photos
from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.cotrain import CoJob, CoTrainer, cotrain
from tuneqdm_core.finetune import (
    CHECKPOINT_NAME,
    FinetuneCanceled,
    FinetuneConfig,
    Progress,
    Subject,
    finetune,
)
from tuneqdm_core.model import quant_state
from tuneqdm_core.training_step import draw_batch

# As in test_finetune.py: rates for a random tiny model whose quantization steps are ~1e-2.
FAST: dict[str, Any] = {"resolution": 32, "lr_s_out": 1e-3, "lr_s_in": 3e-2}
F64 = 1e-10
F32 = 2e-5
F32_ADAPTER = 5e-3

DOG = Subject("a photo of sks dog", subject_photos(), class_prompt="a photo of a dog")
CAT = Subject("a photo of zwx cat", subject_photos(2, size=(30, 30)))
TOY = Subject("a photo of qpv toy", subject_photos(3, size=(36, 36)))


@pytest.fixture(scope="module")
def base64(tiny_model_dir: Path, quant_cache: Path) -> BaseModel:
    """The tiny base in float64 (its own copy: the session's float32 base stays as it is)."""
    base = load_base(tiny_model_dir, cache_dir=quant_cache)
    for model in (base.unet, base.vae, base.text_encoder):
        model.double()
    # Photos arrive as float32 pixels; the float64 VAE needs float64 input.
    base.vae.encoder.register_forward_pre_hook(lambda _m, args: (args[0].double(), *args[1:]))
    return base


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def assert_same_tensors(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert relative_error(g, w) <= rtol, relative_error(g, w)


def params_of(result: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in result.adapter.parameters()]


def checkpoint_params(folder: Path) -> tuple[int, list[torch.Tensor]]:
    state = torch.load(folder / CHECKPOINT_NAME, weights_only=True)
    return int(state["step"]), list(state["params"])


def cancel_after(step: int) -> tuple[Any, Any]:
    """(progress, should_cancel): cancel requested once ``step`` steps are done."""
    done = {"flag": False}

    def progress(p: Progress) -> None:
        done["flag"] = done["flag"] or p.step >= step

    return progress, lambda: done["flag"]


def test_three_jobs_in_a_group_end_as_they_would_alone(base64: BaseModel, tmp_path: Path) -> None:
    """Different step counts, prior preservation, a job canceled inside a UNet call half-way,
    and a job joining after two steps: after these few steps every one ends where its solo run
    ends, within the float64 per-step bound."""
    cache = tmp_path / "cache"
    dog = FinetuneConfig(
        steps=5, batch_size=2, num_class_images=3, class_image_steps=2, seed=1, **FAST
    )
    cat = FinetuneConfig(steps=3, intervals=2, seed=2, **FAST)
    toy = FinetuneConfig(steps=4, seed=3, checkpoint_every=1, **FAST)
    late = FinetuneConfig(steps=4, seed=4, **FAST)

    solo_dog = finetune(base64, [DOG], dog, cache_dir=cache)
    solo_cat = finetune(base64, [CAT], cat)
    solo_late = finetune(base64, [CAT], late)

    # The toy job is canceled from inside the UNet half-way: its check is asked 6 times a step
    # (once between steps, once per block of the tiny UNet's 5) and turns true on call 15,
    # in step 3's forward pass; that step is undone for the whole group and repeated.
    calls = itertools.count()
    seen: dict[str, list[int]] = {"dog": [], "cat": [], "toy": [], "late": []}

    def log(key: str) -> Any:
        return lambda p: seen[key].append(p.step)

    trainer = CoTrainer(base64)
    trainer.add(CoJob("dog", [DOG], dog, cache_dir=cache, progress=log("dog")))
    trainer.add(CoJob("cat", [CAT], cat, progress=log("cat")))
    trainer.add(
        CoJob(
            "toy",
            [TOY],
            toy,
            checkpoint_dir=tmp_path / "toy",
            progress=log("toy"),
            should_cancel=lambda: next(calls) >= 15,
        )
    )
    outcomes = trainer.step() + trainer.step()
    trainer.add(CoJob("late", [CAT], late, progress=log("late")))
    outcomes += trainer.run()
    by_key = {o.key: o for o in outcomes}
    assert [o.key for o in outcomes][:2] == ["toy", "cat"]  # left first, in that order
    assert set(by_key) == {"dog", "cat", "toy", "late"} and len(trainer) == 0

    canceled = by_key["toy"].error
    assert isinstance(canceled, FinetuneCanceled) and canceled.step == 2
    assert seen["toy"] == list(range(1, canceled.step + 1))
    for key, config in (("dog", dog), ("cat", cat), ("late", late)):
        assert by_key[key].error is None
        assert seen[key] == list(range(1, config.steps + 1))
    for key, solo in (("dog", solo_dog), ("cat", solo_cat), ("late", solo_late)):
        result = by_key[key].result
        assert result is not None
        assert_same_tensors(params_of(result), params_of(solo), F64)
        assert result.losses == pytest.approx(solo.losses, rel=F64)

    # The canceled job's checkpoint is the one its solo run, canceled after the same step, left.
    progress, should_cancel = cancel_after(canceled.step)
    (tmp_path / "toy-solo").mkdir()
    with pytest.raises(FinetuneCanceled):
        finetune(
            base64,
            [TOY],
            toy,
            checkpoint_dir=tmp_path / "toy-solo",
            progress=progress,
            should_cancel=should_cancel,
        )
    step, grouped = checkpoint_params(tmp_path / "toy")
    solo_step, alone = checkpoint_params(tmp_path / "toy-solo")
    assert step == solo_step == canceled.step
    assert_same_tensors(grouped, alone, F64)
    # The shared base is left as it was: no route, eval mode, no cancel hooks.
    assert quant_state(base64.unet).route is None and not base64.unet.training


def test_a_job_resumes_alone_from_its_group_checkpoint(base64: BaseModel, tmp_path: Path) -> None:
    """A group member whose worker gave it up resumes alone, from its own checkpoint, and ends
    with the adapter it would have had."""
    config = FinetuneConfig(steps=5, seed=7, checkpoint_every=2, **FAST)
    other = FinetuneConfig(steps=8, batch_size=2, seed=8, **FAST)
    straight = finetune(base64, [TOY], config)

    trainer = CoTrainer(base64)
    trainer.add(CoJob("toy", [TOY], config, checkpoint_dir=tmp_path))
    trainer.add(CoJob("cat", [CAT], other))
    for _ in range(3):
        assert trainer.step() == []
    assert trainer.remove("toy") == 3
    trainer.close()

    resumed = finetune(base64, [TOY], config, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2
    assert_same_tensors(params_of(resumed), params_of(straight), F64)
    assert resumed.losses == pytest.approx(straight.losses, rel=F64)


def test_a_paused_job_resumes_from_the_step_it_paused_at(base64: BaseModel, tmp_path: Path) -> None:
    """pause() (a worker asked to stop) saves the step the job is at, between two scheduled
    checkpoints, so its next run repeats nothing and ends with the same adapter."""
    config = FinetuneConfig(steps=5, seed=7, checkpoint_every=2, **FAST)
    straight = finetune(base64, [TOY], config)

    trainer = CoTrainer(base64)
    trainer.add(CoJob("toy", [TOY], config, checkpoint_dir=tmp_path))
    trainer.add(CoJob("cat", [CAT], FinetuneConfig(steps=8, seed=8, **FAST)))
    for _ in range(3):
        assert trainer.step() == []
    assert trainer.pause("toy") == 3 and trainer.keys == ["cat"]
    trainer.close()

    resumed = finetune(base64, [TOY], config, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 3
    assert_same_tensors(params_of(resumed), params_of(straight), F64)
    assert resumed.losses == pytest.approx(straight.losses, rel=F64)


def _grads_of_first(base: BaseModel, jobs: list[CoJob]) -> list[list[torch.Tensor]]:
    """Every member's scale gradients after one shared forward and backward."""
    trainer = CoTrainer(base)
    for job in jobs:
        trainer.add(job)
    members = trainer._members
    batches = [draw_batch(m.data, m.config, m.run.generator, 1000) for m in members]
    trainer._forward_backward(members, batches)
    grads = [[p.grad.clone() for p in m.run.params if p.grad is not None] for m in members]
    trainer.close()
    return grads


@pytest.mark.parametrize(("base_name", "rtol"), [("base64", F64), ("tiny_base", F32)])
def test_a_jobs_gradient_does_not_depend_on_the_other_jobs_samples(
    base_name: str, rtol: float, request: pytest.FixtureRequest
) -> None:
    """Alone, the route is the solo loop's; in a group the job's scales get the same gradient
    whatever the other jobs' samples are."""
    base64: BaseModel = request.getfixturevalue(base_name)
    config = FinetuneConfig(steps=2, batch_size=2, seed=11, **FAST)
    alone = _grads_of_first(base64, [CoJob("x", [TOY], config)])[0]
    with_cat = _grads_of_first(
        base64,
        [CoJob("x", [TOY], config), CoJob("y", [CAT], FinetuneConfig(steps=2, seed=1, **FAST))],
    )
    with_dog = _grads_of_first(
        base64,
        [
            CoJob(
                "y",
                [DOG],
                FinetuneConfig(
                    steps=2, batch_size=3, seed=2, num_class_images=2, class_image_steps=2, **FAST
                ),
            ),
            CoJob("x", [TOY], config),
        ],
    )
    assert alone and all(g.abs().sum() > 0 for g in alone)
    assert_same_tensors(with_cat[0], alone, rtol)
    assert_same_tensors(with_dog[1], alone, rtol)
    # The other job did train on its own, different samples.
    assert relative_error(with_cat[1][0], with_dog[0][0]) > 1e-3


def test_float32_group_matches_solo_within_the_batched_kernel_bound(
    tiny_base: BaseModel,
) -> None:
    """Every step's loss within the kernel bound for these seeds (float32 losses can differ by
    up to 8.7e-5 after 3 steps in general); the adapter within F32_ADAPTER."""
    a = FinetuneConfig(steps=4, batch_size=2, seed=1, **FAST)
    b = FinetuneConfig(steps=3, intervals=2, seed=2, **FAST)
    solo = [finetune(tiny_base, [TOY], a), finetune(tiny_base, [CAT], b)]
    grouped = cotrain(tiny_base, [CoJob("a", [TOY], a), CoJob("b", [CAT], b)])
    for key, want in zip("ab", solo, strict=True):
        result = grouped[key].result
        assert result is not None
        assert result.losses == pytest.approx(want.losses, rel=F32)
        assert_same_tensors(params_of(result), params_of(want), F32_ADAPTER)


def test_jobs_that_cannot_share_a_forward_pass_are_refused(tiny_base: BaseModel) -> None:
    trainer = CoTrainer(tiny_base)
    trainer.add(CoJob("a", [CAT], FinetuneConfig(steps=1, **FAST)))
    assert not trainer.accepts(FinetuneConfig(steps=1, **{**FAST, "resolution": 64}))
    with pytest.raises(ValueError, match="another group"):
        trainer.add(CoJob("b", [CAT], FinetuneConfig(steps=1, **{**FAST, "resolution": 64})))
    with pytest.raises(ValueError, match="alone"):
        trainer.add(CoJob("c", [CAT], FinetuneConfig(method="full", steps=1, **FAST)))
    with pytest.raises(ValueError, match="already"):
        trainer.add(CoJob("a", [CAT], FinetuneConfig(steps=1, **FAST)))
    assert trainer.keys == ["a"]
    outcomes = trainer.run()
    assert [o.key for o in outcomes] == ["a"] and outcomes[0].result is not None


def test_a_failing_job_leaves_without_disturbing_the_others(base64: BaseModel) -> None:
    """A member whose own part of a step fails (here its progress callback) leaves with its
    error after that step; the others end as they would alone."""
    config = FinetuneConfig(steps=4, seed=5, **FAST)
    alone = finetune(base64, [TOY], config)

    def broken(p: Progress) -> None:
        if p.step == 2:
            raise OSError("disk full")

    outcomes = cotrain(
        base64,
        [
            CoJob("broken", [CAT], FinetuneConfig(steps=6, seed=6, **FAST), progress=broken),
            CoJob("toy", [TOY], config),
        ],
    )
    assert isinstance(outcomes["broken"].error, OSError) and outcomes["broken"].result is None
    result = outcomes["toy"].result
    assert result is not None
    assert_same_tensors(params_of(result), params_of(alone), F64)
