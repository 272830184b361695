"""``tuneqdm evaluate`` and its metrics, with tiny random CLIP and DINO models from config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from tests.conftest import subject_photos
from tests.core.helpers import perturbed_adapter
from tuneqdm_core import AdapterConfig, save_adapter
from tuneqdm_core.base import BaseModel
from tuneqdm_core.builtin.tiny import SPECIAL, tokenizer_files
from tuneqdm_core.cli import main
from tuneqdm_core.cli.evaluate import parse_subject, read_prompts
from tuneqdm_core.evaluation import (
    DREAMBOOTH_PROMPTS,
    Clip,
    Dino,
    clip_image_features,
    clip_text_features,
    dino_features,
    load_clip,
    load_dino,
    prompt_similarity,
    strip_identifier,
    subject_similarity,
)

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
VISION = {**TINY, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIPModel with the tiny project tokenizer, saved like openai/clip-vit-*."""
    folder = tmp_path_factory.mktemp("clip")
    vocab, merges = tokenizer_files()
    start, end = (vocab[t] for t in SPECIAL)
    text = {**TINY, "num_attention_heads": 2, "vocab_size": len(vocab)}
    text |= {"max_position_embeddings": 77, "bos_token_id": start, "eos_token_id": end}
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)
    ).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ViT without pooler, saved like facebook/dino-vits16."""
    folder = tmp_path_factory.mktemp("dino")
    torch.manual_seed(1)
    ViTModel(ViTConfig(**VISION), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> Clip:
    return load_clip(clip_dir)


@pytest.fixture(scope="module")
def dino(dino_dir: Path) -> Dino:
    return load_dino(dino_dir)


def _noise_images(count: int, seed: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    arrays = torch.randint(0, 256, (count, 40, 40, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(a.numpy()) for a in arrays]


def test_features_are_normalised_and_batching_does_not_change_them(clip: Clip, dino: Dino) -> None:
    images = subject_photos(3) + _noise_images(2, seed=0)
    for extract in (
        lambda size: clip_image_features(clip, images, batch_size=size),
        lambda size: dino_features(dino, images, batch_size=size),
    ):
        whole, batched = extract(32), extract(2)
        assert whole.shape[0] == 5
        torch.testing.assert_close(whole.norm(dim=-1), torch.ones(5))
        torch.testing.assert_close(whole, batched, atol=1e-5, rtol=1e-4)


def test_identical_images_score_one_and_different_images_less(clip: Clip, dino: Dino) -> None:
    photos, noise = subject_photos(1) * 3, _noise_images(3, seed=1)
    for features in (
        lambda images: clip_image_features(clip, images),
        lambda images: dino_features(dino, images),
    ):
        same = subject_similarity(features(photos), features(photos))
        assert same == pytest.approx(1.0, abs=1e-5)
        assert subject_similarity(features(noise), features(photos)) < 1 - 1e-3


def test_metrics_are_mean_cosines() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0]])
    assert subject_similarity(a, b) == pytest.approx(0.5)  # cos 0 and cos 90°
    assert prompt_similarity(a, torch.tensor([[1.0, 0.0], [0.0, -1.0]])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 image features but 1"):
        prompt_similarity(a, b)
    with pytest.raises(ValueError, match="at least one image"):
        subject_similarity(a[:0], b)


def test_clip_t_reads_the_prompt_without_the_identifier(clip: Clip) -> None:
    assert strip_identifier("a sks dog on the beach", "sks") == "a dog on the beach"
    assert strip_identifier("a red sks dog", "sks") == "a red dog"
    assert strip_identifier("a sksx dog", "sks") == "a sksx dog"  # whole words only
    texts = clip_text_features(clip, ["a dog on the beach", "a sks dog on the beach"])
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(2))
    assert float(texts[0] @ texts[1]) < 1 - 1e-4  # the token changes the embedding
    stripped = clip_text_features(clip, [strip_identifier("a sks dog on the beach", "sks")])
    torch.testing.assert_close(stripped[0], texts[0])


def test_subject_specs_and_prompt_files(tmp_path: Path) -> None:
    spec = parse_subject("dog2=a/dog.safetensors:dog:zwx")
    assert (spec.name, spec.adapter, spec.class_word, spec.token) == (
        "dog2",
        Path("a/dog.safetensors"),
        "dog",
        "zwx",
    )
    assert spec.subject_prompt("a {} on the beach") == "a zwx dog on the beach"
    base = parse_subject("rc_car2")
    assert (base.adapter, base.class_word, base.token) == (None, "rc car", "sks")
    assert len(DREAMBOOTH_PROMPTS) == 25 and read_prompts(None) == list(DREAMBOOTH_PROMPTS)
    file = tmp_path / "prompts.txt"
    file.write_text("# mine\na {} in the snow\n\na red {}\n")
    assert read_prompts(str(file)) == ["a {} in the snow", "a red {}"]
    file.write_text("a dog in the snow\n")
    with pytest.raises(ValueError, match=r"prompts.txt:1: a template needs exactly one"):
        read_prompts(str(file))


def _dataset(root: Path) -> Path:
    for name, photos in (("dog", subject_photos(3)), ("cat2", _noise_images(2, seed=3))):
        (root / name).mkdir(parents=True)
        for i, photo in enumerate(photos):
            photo.save(root / name / f"{i:02d}.png")
    return root


def test_evaluate_end_to_end_then_rescores_the_saved_images(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_base: BaseModel,
    quant_cache: Path,
    clip_dir: Path,
    dino_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    adapter = save_adapter(
        perturbed_adapter(tiny_base.unet, AdapterConfig()), tmp_path / "dog.safetensors"
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on the beach\na red {}\n")
    common = ["--clip", str(clip_dir), "--dino", str(dino_dir), "--prompts", str(prompts)]
    common += ["--dataset", str(_dataset(tmp_path / "dataset"))]
    subjects = ["--subject", f"dog={adapter}:dog", "--subject", "cat2"]
    out = tmp_path / "out"
    generation = ["--images-per-prompt", "2", "--steps", "2", "--size", "32", "--seed", "7"]
    args = ["evaluate", str(tiny_model_dir), "--cache-dir", str(quant_cache), *common]
    assert main([*args, *subjects, *generation, "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "DINO" in shown and "CLIP-T" in shown and "mean" in shown
    assert sorted(p.name for p in (out / "dog" / "prompt-01").iterdir()) == ["7.png", "8.png"]

    report = json.loads((out / "results.json").read_text())
    rows = report["subjects"]
    assert [(r["subject"], r["adapter"]) for r in rows] == [("dog", adapter.name), ("cat2", "base")]
    assert all(r["prompts"] == 2 and r["images"] == 4 for r in rows)
    scores = [r[k] for r in [*rows, report["mean"]] for k in ("dino", "clip_i", "clip_t")]
    assert all(math.isfinite(s) and -1 <= s <= 1 for s in scores)
    assert report["mean"]["dino"] == pytest.approx((rows[0]["dino"] + rows[1]["dino"]) / 2)

    # The same images read back from disk give the same scores, without the SD model.
    rescored = tmp_path / "rescored"
    assert (
        main(["evaluate", *common, *subjects, "--generated", str(out), "--out", str(rescored)]) == 0
    )
    again = json.loads((rescored / "results.json").read_text())["subjects"]
    for first, second in zip(rows, again, strict=True):
        for key in ("images", "prompts", "dino", "clip_i", "clip_t"):
            assert second[key] == pytest.approx(first[key], abs=1e-5)


def test_evaluate_errors_say_what_to_fix(
    tmp_path: Path, clip_dir: Path, dino_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = str(_dataset(tmp_path / "dataset"))
    generated = tmp_path / "generated"
    generated.mkdir()
    common = ["evaluate", "--dino", str(dino_dir), "--dataset", dataset]
    scored = [*common, "--clip", str(clip_dir), "--generated", str(generated)]

    no_clip = [*common, "--clip", str(tmp_path / "no-clip"), "--generated", str(generated)]
    assert main([*no_clip, "--subject", "dog"]) == 2
    error = capsys.readouterr().err
    assert "CLIP weights" in error and "no-clip" in error and "config.json" in error
    assert main([*scored, "--subject", "dog=a.safetensors:dog:x:y"]) == 2
    assert "expected NAME=[ADAPTER][:CLASS[:TOKEN]]" in capsys.readouterr().err
    assert main([*scored, "--subject", "horse"]) == 2
    assert "no subject folder 'horse'" in capsys.readouterr().err
    assert main([*scored, "--subject", "dog"]) == 2
    assert "prompt-00" in capsys.readouterr().err
    generating = [*common, "--clip", str(clip_dir)]
    assert main([*generating, "--subject", "dog"]) == 2
    assert "--generated DIR" in capsys.readouterr().err
    assert main([*generating, "model", "--subject", "dog=missing.safetensors"]) == 2
    assert "adapter file missing.safetensors not found" in capsys.readouterr().err
