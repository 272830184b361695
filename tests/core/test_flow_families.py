"""FLUX and SD3 (flow-matching transformers) end to end on their tiny offline pipelines, against
independent references: diffusers' own ``encode_prompt`` and pipelines, the materialising
oracle (tests/core/oracle.py) in float64, ⌊σ·n⌋ over every step of every scheduler, and
diffusers' ``load_lora_weights`` for exports."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from tests.conftest import subject_photos
from tests.core.helpers import assert_close_all, perturbed_adapter, run_both
from tuneqdm_core.adapter import Adapter, AdapterConfig
from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.cli import main
from tuneqdm_core.cotrain import CoJob, cotrain
from tuneqdm_core.export import export_lora, merge_adapter, save_lora, save_merged_unet
from tuneqdm_core.families.flow import SCHEDULERS
from tuneqdm_core.finetune import (
    FinetuneCanceled,
    FinetuneConfig,
    Sampling,
    Subject,
    finetune,
)
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.model import quant_state
from tuneqdm_core.routing import route_adapters, routed
from tuneqdm_core.training_data import prepare_data
from tuneqdm_core.training_step import draw_batch, flow_inputs, training_schedule

ARCHS = ("tiny-flux", "tiny-sd3")
FAST: dict[str, Any] = {"resolution": 32, "lr_s_out": 1e-3, "lr_s_in": 3e-2}
DOG = Subject("a photo of sks dog", subject_photos(), class_prompt="a photo of a dog")
CAT = Subject("a photo of zwx cat", subject_photos(2, size=(30, 44)))
SIZE: dict[str, Any] = {"width": 32, "height": 32}


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def folder(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny folder as the CLI writes it."""
    path = tmp_path_factory.mktemp(arch) / "model"
    assert main(["build-tiny", "--arch", arch, str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def base(folder: Path) -> BaseModel:
    return load_base(folder)


@pytest.fixture(scope="module")
def base64(folder: Path) -> BaseModel:
    """The tiny base in float64 (its own copy)."""
    base = load_base(folder)
    for model in (base.unet, base.vae, *base.text_encoders):
        model.double()
    base.vae.encoder.register_forward_pre_hook(lambda _m, args: (args[0].double(), *args[1:]))
    return base


def _pixels(result: list) -> list[np.ndarray]:
    return [np.asarray(g.image, dtype=np.int16) for images in result for g in images]


def _float_pipeline(folder: Path) -> Any:
    return DiffusionPipeline.from_pretrained(folder, local_files_only=True)


def test_the_folder_loads_in_diffusers_and_quantizes_every_linear(
    folder: Path, base: BaseModel, arch: str
) -> None:
    pipeline = _float_pipeline(folder)
    expected = {"tiny-flux": "FluxPipeline", "tiny-sd3": "StableDiffusion3Pipeline"}[arch]
    assert type(pipeline).__name__ == expected
    linears = [n for n, m in pipeline.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    names = {spec.name for spec in quant_state(base.unet).layout.layers}
    assert set(linears) <= names and len(linears) > 10
    # AdaLN modulation and attention projections of both streams are among them.
    assert any(".norm1.linear" in n for n in names) and any("add_k_proj" in n for n in names)
    assert not any(p.requires_grad for e in base.text_encoders for p in e.parameters())


def test_conditioning_is_what_the_pipeline_encodes(folder: Path, base: BaseModel) -> None:
    pipeline = _float_pipeline(folder)
    prompts = ["a photo of sks dog", "a red bag on the beach"]
    ours = base.encode(prompts)
    with torch.no_grad():  # as the pipeline's __call__ runs it
        if base.family.name == "flux":
            states, pooled, _ids = pipeline.encode_prompt(prompts, None, max_sequence_length=512)
        else:
            states, _, pooled, _ = pipeline.encode_prompt(
                prompts, None, None, do_classifier_free_guidance=False
            )
    assert ours.pooled is not None
    assert torch.equal(ours.states, states) and torch.equal(ours.pooled, pooled)


def _direct(folder: Path, base: BaseModel, request: GenerationRequest) -> np.ndarray:
    """The family's diffusers pipeline called directly around the same quantized transformer
    (no route: the plain quantized base)."""
    float_pipeline = _float_pipeline(folder)
    pipeline = type(float_pipeline)(**{**float_pipeline.components, "transformer": base.unet})
    options: dict[str, Any] = {}
    if base.family.name == "sd3":
        options["negative_prompt"] = request.negative_prompt
    image = pipeline(
        request.prompt,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=[torch.Generator().manual_seed(request.seed)],
        output_type="pil",
        **SIZE,
        **options,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_generation_is_the_pipeline_called_directly(folder: Path, base: BaseModel) -> None:
    """No adapter and an identity adapter (s_out = s0, s_in = 1) both give what the pipeline
    gives on the quantized transformer alone."""
    identity = Adapter.create(base.unet, AdapterConfig(intervals=2))
    theirs = _direct(folder, base, GenerationRequest("a photo of sks dog", steps=3, seed=4, **SIZE))
    for adapter in (None, identity):
        request = GenerationRequest("a photo of sks dog", adapter, steps=3, seed=4, **SIZE)
        ours = _pixels(generate(base, [request]))[0]
        assert int(np.abs(ours - theirs).max()) <= 1


def test_mixed_adapter_batch_equals_requests_one_by_one(base: BaseModel) -> None:
    two = perturbed_adapter(base.unet, AdapterConfig(intervals=2), spread=0.3)
    peqa = perturbed_adapter(base.unet, AdapterConfig(method="peqa", intervals=1), spread=0.3)
    common: dict[str, Any] = {"steps": 3, **SIZE}
    negative = "blue" if base.family.name == "sd3" else ""
    requests = [
        GenerationRequest("a photo of sks dog", two, num_images=2, seed=1, **common),
        GenerationRequest("a red bag", None, seed=5, **common),
        GenerationRequest("a photo of sks cat", peqa, seed=7, negative_prompt=negative, **common),
    ]
    batched = _pixels(generate(base, requests))
    alone = _pixels([generate(base, [r])[0] for r in requests])
    assert max(int(np.abs(a - b).max()) for a, b in zip(batched, alone, strict=True)) <= 1
    plain = GenerationRequest("a photo of sks dog", None, seed=1, **common)
    assert int(np.abs(batched[0] - _pixels(generate(base, [plain]))[0]).max()) > 10


def _intervals_read(base: BaseModel, adapter: Adapter, scheduler: str) -> list[tuple[float, int]]:
    """(sigma, interval) of every transformer call of a 7-step generation with ``adapter``:
    the sigma of its timestep argument and the interval of the route its layers read."""
    n = adapter.config.intervals
    sigmas: list[float] = []
    seen: list[tuple[float, int]] = []
    state = quant_state(base.unet)

    def called(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        sigmas.append(float(base.family.sigma_of(kwargs["timestep"].reshape(-1)[:1])))

    def read(_m: Any, _args: Any) -> None:  # inside the call: the route it runs with
        route = state.route
        assert route is not None and route.rows is None  # one adapter: a uniform route
        seen.append((sigmas[-1], route.row % n))  # the bank's row: slot · intervals + k

    handles = [
        base.unet.register_forward_pre_hook(called, with_kwargs=True),
        base.unet.transformer_blocks[0].register_forward_pre_hook(read),
    ]
    try:
        request = GenerationRequest("a dog", adapter, steps=7, scheduler=scheduler, **SIZE)
        generate(base, [request])
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_step_reads_the_interval_training_assigns_its_sigma(
    base: BaseModel, scheduler: str
) -> None:
    """Each transformer call of a generation reads interval ⌊σ·n⌋ of the sigma it is called
    at (n = 2, 3, 4; the schedulers shift sigmas: SD3 by 3.0, FLUX by the token count), and
    training routes that same sigma to the same interval."""
    if scheduler not in base.family.schedulers:
        with pytest.raises(ValueError, match="unknown for"):
            generate(base, [GenerationRequest("a dog", steps=2, scheduler=scheduler, **SIZE)])
        return
    for n in (2, 3, 4):
        adapter = Adapter.create(base.unet, AdapterConfig(intervals=n))
        seen = _intervals_read(base, adapter, scheduler)
        assert len(seen) >= 7 and len({k for _, k in seen}) > 1
        sigmas = torch.tensor([s for s, _ in seen], dtype=torch.float64)
        trained = route_adapters([adapter], base.family.tas_timesteps(sigmas))
        assert trained.rows is not None
        for i, (sigma, k) in enumerate(seen):
            assert k == min(int(sigma * n + 1e-6), n - 1), (sigma, k)
            # The training route's row i holds interval k's scales.
            row = trained.out_parts[0][int(trained.rows[i])]
            assert torch.equal(row, adapter.s_out[k][: row.shape[0]])


def test_finetune_lowers_the_loss(base: BaseModel) -> None:
    """On the same held draws (photos, noise, sigmas), the trained adapter's flow-matching
    loss is below the untrained one's (per-step losses are too noisy across sigmas)."""
    config = FinetuneConfig(steps=30, batch_size=2, num_class_images=0, **FAST)
    result = finetune(base, [DOG], config)
    assert result.adapter is not None and quant_state(base.unet).route is None
    data = prepare_data(base, [DOG], config, None)
    _, total, schedule = training_schedule(base)
    held = FinetuneConfig(steps=1, batch_size=8, num_class_images=0, **FAST)
    batch = draw_batch(data, held, torch.Generator().manual_seed(9), total, schedule)
    noisy, target, conditioning = flow_inputs(base, data, batch)

    def held_loss(adapter: Adapter) -> float:
        route = route_adapters([adapter], base.family.tas_timesteps(batch.timesteps))
        with torch.no_grad(), routed(base.unet, route):
            prediction = base.family.predict(base, base.unet, noisy, batch.timesteps, conditioning)
        return float((prediction - target).pow(2).mean())

    before = held_loss(Adapter.create(base.unet, config.adapter_config()))
    after = held_loss(result.adapter)
    assert after < 0.95 * before, (before, after)


def test_a_training_step_matches_the_oracle_in_float64(base64: BaseModel) -> None:
    """The flow-matching step's forward and scale gradients — through joint attention,
    single-stream blocks (FLUX), AdaLN modulation linears and the patch embedding — equal the
    materialising oracle's, for a batch of two subjects at their own sigmas."""
    config = FinetuneConfig(steps=1, batch_size=3, num_class_images=0, intervals=3, **FAST)
    data = prepare_data(base64, [DOG, CAT], config, None)
    _, total, schedule = training_schedule(base64)
    batch = draw_batch(data, config, torch.Generator().manual_seed(0), total, schedule)
    noisy, _, conditioning = flow_inputs(base64, data, batch)
    assert noisy.dtype == torch.float64
    adapter = perturbed_adapter(base64.unet, AdapterConfig(intervals=3))
    adapter.requires_grad_(True)
    model = base64.unet

    def call() -> torch.Tensor:
        return base64.family.predict(base64, model, noisy, batch.timesteps, conditioning)

    timesteps = base64.family.tas_timesteps(batch.timesteps)
    (y, g), (y_ref, g_ref) = run_both(model, call, [adapter], timesteps, [0] * len(timesteps))
    assert_close_all([y], [y_ref], rtol=1e-12)
    assert_close_all(g, g_ref, rtol=1e-10)


def test_resume_and_prior_preservation_give_the_same_adapter(
    base: BaseModel, tmp_path: Path
) -> None:
    config = FinetuneConfig(
        steps=4, batch_size=2, checkpoint_every=2, num_class_images=2, class_image_steps=2, **FAST
    )
    cache = tmp_path / "cache"
    straight = finetune(base, [DOG, CAT], config, cache_dir=cache)
    assert len(list(cache.rglob("*.png"))) == 2  # the dog's class images, made by the base
    done: list[int] = []
    with pytest.raises(FinetuneCanceled, match="after step 3"):
        finetune(
            base,
            [DOG, CAT],
            config,
            checkpoint_dir=tmp_path,
            cache_dir=cache,
            progress=lambda p: done.append(p.step),
            should_cancel=lambda: len(done) >= 3,
        )
    resumed = finetune(base, [DOG, CAT], config, checkpoint_dir=tmp_path, cache_dir=cache)
    assert resumed.resumed_from == 2
    assert straight.adapter is not None and resumed.adapter is not None
    for a, b in zip(straight.adapter.parameters(), resumed.adapter.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.losses == straight.losses


def test_cancel_stops_inside_a_transformer_call(base: BaseModel) -> None:
    calls: list[int] = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 2  # between steps, then the first block of the step

    with pytest.raises(FinetuneCanceled, match="after step 0"):
        finetune(
            base,
            [DOG],
            FinetuneConfig(steps=3, num_class_images=0, **FAST),
            should_cancel=should_cancel,
        )


def _lora_layers(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if hasattr(m, "lora_A")}


def test_lora_and_merged_exports_draw_what_the_adapter_draws(
    folder: Path, base: BaseModel, tmp_path: Path
) -> None:
    """A full-rank LoRA loaded by the family's own ``load_lora_weights`` into the float
    pipeline (every key lands on a layer), and the merged transformer in its place, give
    the adapter's image on the quantized base."""
    family = base.family
    adapter = perturbed_adapter(base.unet, AdapterConfig(intervals=1), spread=0.3)
    export = export_lora(
        base.unet, family.load_float(str(folder)), adapter, rank=64, prefix=family.lora_prefix
    )
    assert export.error < 1e-6
    request = GenerationRequest("a photo of sks dog", adapter, steps=3, seed=2, **SIZE)
    ours = _pixels(generate(base, [request]))[0]
    with_lora = _float_pipeline(folder)
    with_lora.load_lora_weights(save_lora(export, tmp_path / "lora.safetensors"))
    names = {spec.name for spec in quant_state(base.unet).layout.layers}
    assert _lora_layers(with_lora.transformer) == names
    merged = merge_adapter(base.unet, family.load_float(str(folder)), adapter)
    save_merged_unet(merged, tmp_path / "merged")
    plain = _float_pipeline(folder)
    with_merged = type(plain)(
        **{
            **plain.components,
            "transformer": family.transformer_class().from_pretrained(tmp_path / "merged"),
        }
    )
    options: dict[str, Any] = {"negative_prompt": ""} if family.name == "sd3" else {}
    for pipeline in (with_lora, with_merged):
        image = pipeline(
            request.prompt,
            num_inference_steps=3,
            guidance_scale=request.guidance_scale,
            generator=[torch.Generator().manual_seed(2)],
            **SIZE,
            **options,
        ).images[0]
        assert int(np.abs(ours - np.asarray(image, dtype=np.int16)).max()) <= 1


def test_mean_interval_weights_are_the_training_draws_shares(base: BaseModel) -> None:
    """FLUX draws sigmas uniformly (equal shares); SD3's logit-normal draws over sigmas
    shifted by 3.0 put most draws at high noise. Checked against a million draws."""
    family, scheduler = training_schedule(base)[2]
    sigmas = family.draw_sigmas(1 << 20, torch.Generator().manual_seed(0), scheduler)
    for n in (2, 3):
        shares = family.interval_shares(base, n)
        counted = torch.bincount((sigmas * n).long().clamp(max=n - 1), minlength=n) / sigmas.numel()
        assert max(abs(a - float(b)) for a, b in zip(shares, counted, strict=True)) < 3e-3
    if family.name == "flux":
        assert abs(family.interval_shares(base, 2)[0] - 0.5) < 2e-3
    else:
        assert family.interval_shares(base, 2)[1] > 0.8


def test_cli_finetunes_generates_and_exports_a_lora_diffusers_loads(
    folder: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, photo in enumerate(subject_photos(2)):
        photo.save(photos / f"{i}.png")
    adapter, lora, out = tmp_path / "a.safetensors", tmp_path / "lora.safetensors", tmp_path / "o"
    model = str(folder)
    steps = ["--steps", "2", "--resolution", "32", "--num-class-images", "0"]
    assert main(["finetune", model, "--images", str(photos), "--prompt", "a photo of sks dog",
                 "--out", str(adapter), *steps]) == 0  # fmt: skip
    size = ["--width", "32", "--height", "32", "--steps", "2"]
    assert main(["generate", model, "--adapter", str(adapter), "--prompt", "a photo of sks dog",
                 "--scheduler", "euler", *size, "--out", str(out)]) == 0  # fmt: skip
    assert len(list(out.glob("*.png"))) == 1
    assert main(["export", model, "--adapter", str(adapter), "--format", "lora", "--rank", "4",
                 "--out", str(lora)]) == 0  # fmt: skip
    pipeline = _float_pipeline(folder)
    pipeline.load_lora_weights(lora)
    assert len(_lora_layers(pipeline.transformer)) == len(
        quant_state(load_base(folder).unet).layout.layers
    )


def test_cotrained_jobs_end_as_they_would_alone(base64: BaseModel) -> None:
    """Two jobs in one batch (one with prior preservation and 2 intervals) end with the
    adapters they get alone, in float64 within 1e-10 relative."""
    dog = FinetuneConfig(steps=2, seed=1, num_class_images=0, **FAST)
    cat = FinetuneConfig(steps=3, intervals=3, seed=2, **FAST)
    solo = {"dog": finetune(base64, [DOG], dog), "cat": finetune(base64, [CAT], cat)}
    grouped = cotrain(base64, [CoJob("dog", [DOG], dog), CoJob("cat", [CAT], cat)])
    for key, alone in solo.items():
        result = grouped[key].result
        assert result is not None and result.adapter is not None and alone.adapter is not None
        got: list[torch.Tensor | None] = list(result.adapter.parameters())
        want: list[torch.Tensor | None] = list(alone.adapter.parameters())
        assert_close_all(got, want, rtol=1e-10)


def test_the_quantized_transformer_is_cached(folder: Path, base: BaseModel, tmp_path: Path) -> None:
    """A second start reads the quantized transformer from the cache: same fingerprint and
    the same image, without quantizing again."""
    first = load_base(folder, cache_dir=tmp_path)
    again = load_base(folder, cache_dir=tmp_path)
    assert not first.from_cache and again.from_cache
    assert again.fingerprint == first.fingerprint == base.fingerprint
    assert quant_state(again.unet).compute_fingerprint() == base.fingerprint
    request = GenerationRequest("a photo of sks dog", steps=2, **SIZE)
    assert np.array_equal(
        _pixels(generate(again, [request]))[0], _pixels(generate(base, [request]))[0]
    )


def test_gradient_checkpointing_and_progress_images_change_nothing(base64: BaseModel) -> None:
    """Recomputing the transformer's blocks in backward (routes read again there) gives the
    adapter trained without it; sampling progress images draws nothing from training."""
    config = FinetuneConfig(steps=2, batch_size=2, num_class_images=0, intervals=2, **FAST)
    plain = finetune(base64, [DOG], config)
    images: list[int] = []
    sampling = Sampling(prompts=["a photo of sks dog"], every=1, size=32, steps=2)
    checkpointed = finetune(
        base64,
        [DOG],
        replace(config, gradient_checkpointing=True),
        sampling=sampling,
        on_sample=lambda step, made, adapter: images.append(len(made)),
    )
    assert images == [1, 1]
    assert plain.adapter is not None and checkpointed.adapter is not None
    got: list[torch.Tensor | None] = list(checkpointed.adapter.parameters())
    want: list[torch.Tensor | None] = list(plain.adapter.parameters())
    assert_close_all(got, want, rtol=1e-10)
    assert not base64.unet.is_gradient_checkpointing


def test_an_8_bit_t5_encodes_as_the_float_one_does_and_leaves_the_transformer_alone(
    folder: Path, base: BaseModel
) -> None:
    from tuneqdm_core.layers import QuantLinear

    small = load_base(folder, text_encoder_bits=8)
    t5 = getattr(small, base.family.t5_part)
    assert any(isinstance(m, QuantLinear) for m in t5.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in t5.modules())
    # A quarter of the float linear weights' bytes (codes), plus per-channel scales.
    float_bytes = sum(
        m.weight.numel() * 4
        for m in getattr(base, base.family.t5_part).modules()
        if isinstance(m, torch.nn.Linear)
    )
    code_bytes = sum(m.codes.numel() for m in t5.modules() if isinstance(m, QuantLinear))
    assert code_bytes * 4 == float_bytes
    prompts = ["a photo of sks dog", "a red bag on the beach"]
    ours, reference = small.encode(prompts), base.encode(prompts)
    error = (ours.states - reference.states).norm() / reference.states.norm()
    assert 0 < error < 2e-2, error
    assert ours.pooled is not None and reference.pooled is not None
    assert torch.equal(ours.pooled, reference.pooled)  # CLIP's
    # The transformer, and so every adapter's fit, is the same.
    assert quant_state(small.unet).fingerprint == quant_state(base.unet).fingerprint
    [[image]] = generate(small, [GenerationRequest("a photo of a dog", steps=2, **SIZE)])
    assert image.image.size == (32, 32)


def test_text_encoder_bits_is_refused_for_a_unet_base() -> None:
    with pytest.raises(ValueError, match="T5 encoder of a FLUX or SD3 base"):
        load_base(Path(__file__).parents[2] / "models" / "fashion-sd", text_encoder_bits=8)
