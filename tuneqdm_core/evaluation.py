"""Personalization metrics as DreamBooth (Ruiz et al. 2023, §4.1) and TuneQDM report them.

- DINO: subject fidelity, the mean cosine similarity between the DINO ViT CLS embeddings of
  every generated image and every real photo of the subject. DINO is trained
  self-supervised to tell images apart, so it rewards the subject's own features rather than
  its class (two different dogs score lower than under CLIP).
- CLIP-I: the same mean pairwise cosine with CLIP image embeddings.
- CLIP-T: prompt fidelity, the mean cosine between the CLIP image embedding of a generated
  image and the CLIP text embedding of its prompt with the identifier token removed
  ("a sks dog on the beach" → "a dog on the beach"): the encoder has never seen "sks".

The extractors load from local folders only (transformers layout), so an evaluation never
reaches the network. Features are L2-normalised; the metrics are pure functions of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

# DreamBooth's 25 object re-contextualisation, property-modification and accessorization
# prompts (google/dreambooth, docs/benchmarks.md); "{}" stands for "TOKEN CLASS", e.g. "sks dog".
DREAMBOOTH_PROMPTS: tuple[str, ...] = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)


@dataclass(frozen=True)
class Clip:
    """A CLIP model with its tokenizer and image processor, in eval mode on ``device``."""

    model: Any  # transformers CLIPModel
    tokenizer: Any
    image_processor: Any
    device: torch.device


@dataclass(frozen=True)
class Dino:
    """A self-supervised ViT (DINO, DINOv2, ...) whose CLS token is the image embedding."""

    model: Any  # transformers ViTModel / Dinov2Model
    image_processor: Any
    device: torch.device


@dataclass(frozen=True)
class SubjectScores:
    """One row of an evaluation: a subject, the adapter that generated its images, the scores."""

    subject: str
    adapter: str  # file name, or "base" for the plain quantized model
    prompts: int
    images: int  # generated images scored
    dino: float
    clip_i: float
    clip_t: float


def _model_folder(path: str | os.PathLike[str], what: str, example: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} weights: {folder} is not a model folder (no config.json); give a local "
            f"folder in transformers layout (config.json, weights, preprocessor_config.json), "
            f"e.g. a download of {example}"
        )
    return folder


def load_clip(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> Clip:
    """CLIPModel, tokenizer and image processor from one local folder."""
    folder = _model_folder(path, "CLIP", "openai/clip-vit-large-patch14")
    device = torch.device(device)
    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return Clip(model, tokenizer, processor, device)


def load_dino(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> Dino:
    """A DINO ViT and its image processor from one local folder."""
    folder = _model_folder(path, "DINO", "facebook/dino-vits16")
    device = torch.device(device)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    # DINO checkpoints have no pooler and the CLS token is used as is: don't build one.
    extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}
    model = AutoModel.from_pretrained(folder, local_files_only=True, **extra).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return Dino(model, processor, device)


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is the projected
    embedding; 4.x returned the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _batches(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [image.convert("RGB") for image in images]


@torch.no_grad()
def clip_image_features(
    clip: Clip, images: Sequence[Image.Image], batch_size: int = 32
) -> torch.Tensor:
    """``[N, D]`` L2-normalised CLIP image embeddings."""
    features = []
    for batch in _batches(images, batch_size):
        pixels = clip.image_processor(images=_rgb(batch), return_tensors="pt").pixel_values
        features.append(_pooled(clip.model.get_image_features(pixel_values=pixels.to(clip.device))))
    return F.normalize(torch.cat(features).float(), dim=-1).cpu()


@torch.no_grad()
def clip_text_features(clip: Clip, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``[N, D]`` L2-normalised CLIP text embeddings (prompts truncated to 77 tokens)."""
    features = []
    for batch in _batches(prompts, batch_size):
        tokens = clip.tokenizer(
            list(batch),
            padding=True,
            truncation=True,
            max_length=clip.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(clip.device)
        output = clip.model.get_text_features(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        )
        features.append(_pooled(output))
    return F.normalize(torch.cat(features).float(), dim=-1).cpu()


@torch.no_grad()
def dino_features(dino: Dino, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """``[N, D]`` L2-normalised CLS tokens of the last layer."""
    features = []
    for batch in _batches(images, batch_size):
        pixels = dino.image_processor(images=_rgb(batch), return_tensors="pt").pixel_values
        output = dino.model(pixel_values=pixels.to(dino.device))
        features.append(output.last_hidden_state[:, 0])
    return F.normalize(torch.cat(features).float(), dim=-1).cpu()


def _check_features(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features must be [N, D] and [M, D], got {list(a.shape)}, {list(b.shape)}"
        )
    if not len(a) or not len(b):
        raise ValueError("no features to compare: both sets need at least one image")


def subject_similarity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO or CLIP-I: mean cosine over all (generated, real) pairs. ``[N, D]``, ``[M, D]``."""
    _check_features(generated, real)
    return float((F.normalize(generated, dim=-1) @ F.normalize(real, dim=-1).T).mean())


def prompt_similarity(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T: mean cosine of row i of ``images`` with row i of ``texts`` (its prompt)."""
    _check_features(images, texts)
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} image features but {len(texts)} prompt features")
    return float((F.normalize(images, dim=-1) * F.normalize(texts, dim=-1)).sum(-1).mean())


def strip_identifier(prompt: str, token: str) -> str:
    """The prompt without the identifier word: ("a sks dog on the beach", "sks") →
    "a dog on the beach"."""
    stripped = re.sub(rf"(?<!\S){re.escape(token)}(?!\S)", " ", prompt)
    return " ".join(stripped.split())


def mean_scores(rows: Sequence[SubjectScores]) -> SubjectScores:
    """The mean over subjects (each subject weighs the same, as in the papers' tables)."""
    if not rows:
        raise ValueError("no subjects to average")
    count = len(rows)
    return SubjectScores(
        subject="mean",
        adapter="",
        prompts=sum(r.prompts for r in rows),
        images=sum(r.images for r in rows),
        dino=sum(r.dino for r in rows) / count,
        clip_i=sum(r.clip_i for r in rows) / count,
        clip_t=sum(r.clip_t for r in rows) / count,
    )


def score_subject(
    *,
    clip: Clip,
    dino: Dino,
    subject: str,
    adapter: str,
    real: Sequence[Image.Image],
    generated: Sequence[Image.Image],
    prompts: Sequence[str],
    prompt_count: int,
) -> SubjectScores:
    """Scores of one subject. ``prompts[i]`` is the identifier-free prompt of ``generated[i]``."""
    if not real:
        raise ValueError(f"subject {subject!r}: no real photos to compare with")
    if len(generated) != len(prompts):
        raise ValueError(f"{len(generated)} generated images but {len(prompts)} prompts")
    generated_clip = clip_image_features(clip, generated)
    return SubjectScores(
        subject=subject,
        adapter=adapter,
        prompts=prompt_count,
        images=len(generated),
        dino=subject_similarity(dino_features(dino, generated), dino_features(dino, real)),
        clip_i=subject_similarity(generated_clip, clip_image_features(clip, real)),
        clip_t=prompt_similarity(generated_clip, clip_text_features(clip, prompts)),
    )
