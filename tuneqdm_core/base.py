"""Loading a Stable Diffusion model as a quantized base, with a disk cache of the quantized UNet.

Any folder or hub id that diffusers' ``from_pretrained`` reads (SD 1.x / 2.x layout: ``unet``,
``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``; SDXL adds ``text_encoder_2`` and
``tokenizer_2``) works, and so does one checkpoint file (``.safetensors`` / ``.ckpt`` in the
original layout) through diffusers' ``from_single_file``.
A single file holds weights only: the tokenizer, the scheduler and the component configs come
from ``config`` (a diffusers folder or hub id of the same architecture), or, without it, from
the hub repository diffusers infers from the checkpoint's keys. The UNet is quantized once;
the result (packed codes, per-channel parameters, the remaining float tensors, the fingerprint)
is cached so that a restart skips both the float load and the range search.

What differs between model families (loading, text conditioning, the training target,
generation) is the family module's (:mod:`tuneqdm_core.families`): :func:`load_base` finds the
family of ``source`` and loads through it, and ``BaseModel.family`` is that family.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from tuneqdm_core.model import (
    QuantConfig,
    StorageMode,
    quant_state,
    quantize_,
)

if TYPE_CHECKING:
    from tuneqdm_core.families.base import Family

CACHE_FORMAT = 1
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# "org/name" as the Hugging Face hub spells repository ids; anything else must be a folder.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompts, one row per prompt: the text states the UNet cross-attends to
    ``[N, 77, D]`` and, for SDXL, the pooled embedding of its second encoder ``[N, P]``."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, index: torch.Tensor | slice) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled[index]
        return Conditioning(self.states[index], pooled)

    def zeroed(self, rows: torch.Tensor) -> Conditioning:
        """A copy with the rows where the bool mask ``rows`` [N] is true set to zero."""
        keep = (~rows).to(self.states.device)
        pooled = None if self.pooled is None else self.pooled * keep.view(-1, 1)
        return Conditioning(self.states * keep.view(-1, 1, 1), pooled)


def time_ids(
    original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
) -> list[int]:
    """SDXL's micro-conditioning of one image: original (h, w), crop top-left (top, left),
    target (h, w), in pixels, in the order its UNet was trained with."""
    return [*original, *crop, *target]


@dataclass
class BaseModel:
    """One shared quantized base: what a worker loads once and serves every adapter from."""

    source: str
    unet: Any  # UNet2DConditionModel, quantized in place
    vae: Any  # AutoencoderKL, float
    text_encoder: Any  # CLIPTextModel, float
    tokenizer: Any  # CLIPTokenizer
    scheduler_config: dict[str, Any]
    quant: QuantConfig
    device: torch.device
    load_seconds: float = 0.0
    from_cache: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # SDXL only: the second text encoder (CLIPTextModelWithProjection) and its tokenizer.
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    # SDXL: an empty negative prompt is all-zero conditioning, not the encoded "" (the
    # pipeline's force_zeros_for_empty_prompt, true for SDXL base).
    zero_empty_negative: bool = False
    # SD3 only: the third text encoder (T5) and its tokenizer.
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    # The family (a tuneqdm_core.families.base.Family: SD, SDXL, SD3 or FLUX; typed Any as
    # the family-specific callers use their own family's methods). Left out, the UNet's config
    # says SD or SDXL. For a transformer family, ``unet`` holds the quantized transformer (the
    # denoiser every family-blind part works on).
    family: Any = None
    # How generation guides the denoiser: "cfg" (classifier-free, against a negative prompt),
    # "embedded" (FLUX.1 [dev]'s distilled guidance embedding) or "none" (FLUX.1 [schnell]).
    guidance: str = "cfg"

    def __post_init__(self) -> None:
        if self.family is None:
            from tuneqdm_core.families import SD, SDXL

            self.family = SDXL if self.is_xl else SD

    @property
    def is_xl(self) -> bool:
        """Whether the UNet takes SDXL's added conditioning (pooled text and time ids)."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def text_encoders(self) -> list[Any]:
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return [e for e in encoders if e is not None]

    @property
    def fingerprint(self) -> str:
        return quant_state(self.unet).fingerprint

    @property
    def num_train_timesteps(self) -> int:
        """How many timesteps the model was trained over (its scheduler's count): what an
        adapter's timestep intervals split."""
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def storage_mode(self) -> StorageMode:
        """How the UNet holds its frozen weights (tuneqdm_core.model.set_storage_mode)."""
        return quant_state(self.unet).storage_mode

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The text states ``[N, 77, D]`` the UNet cross-attends to."""
        return self.encode(prompts).states

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning, as the family's denoiser takes it."""
        return self.family.encode(self, prompts)

    def unet_inputs(
        self, conditioning: Conditioning, time_ids: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """A UNet family's conditioning keyword arguments for a batch: the text states, plus
        for SDXL ``added_cond_kwargs`` (pooled text and ``time_ids`` ``[N, 6]``, see
        :func:`time_ids`)."""
        return self.family.unet_inputs(self, conditioning, time_ids)

    def prompt_token_count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt).input_ids)


def is_single_file(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` is one checkpoint file rather than a model folder or hub id."""
    path = Path(source)
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()


def _cache_key(
    source: str, config: QuantConfig, model_config: str | None = None, subfolder: str = "unet"
) -> str:
    """Identifies a float UNet and a quantization recipe without hashing gigabytes: a local
    folder by its resolved path and its weight files' sizes and mtimes, a single file by its
    resolved path, size and mtime (and the configs it is read with), a hub id by name."""
    parts: list[Any] = [source, asdict(config), CACHE_FORMAT]
    unet_dir = Path(source) / subfolder
    if is_single_file(source):
        stat = Path(source).stat()
        parts[0] = str(Path(source).resolve())
        parts += [stat.st_size, stat.st_mtime_ns, model_config]
    elif unet_dir.is_dir():
        parts[0] = str(unet_dir.resolve())
        parts += sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in unet_dir.iterdir()
            if f.is_file()
        )
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _write_atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_quantized_unet(unet: Any, directory: Path, source: str) -> None:
    """Write a quantized UNet (state dict, config, fingerprint) for :func:`load_quantized_unet`."""
    directory.mkdir(parents=True, exist_ok=True)
    state = quant_state(unet)
    tensors = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    meta = {
        "format": CACHE_FORMAT,
        "source": source,
        "unet_config": dict(unet.config),
        "quant": asdict(state.config),
        "fingerprint": state.fingerprint,
    }
    if not isinstance(unet, UNet2DConditionModel):  # a transformer family's denoiser
        meta["class"] = type(unet).__name__
    _write_atomic(directory / "unet.safetensors", lambda tmp: save_file(tensors, tmp))
    # meta.json last: its presence marks a complete entry.
    _write_atomic(directory / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))


def load_quantized_unet(directory: Path, device: torch.device | str = "cpu") -> Any:
    """Rebuild a quantized UNet from :func:`save_quantized_unet`'s files without any float
    weights: the architecture is made on the meta device and the tensors are assigned."""
    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{directory}: cache format {meta.get('format')}, expected {CACHE_FORMAT}")
    config = QuantConfig(**meta["quant"])
    unet_config = {k: v for k, v in meta["unet_config"].items() if not k.startswith("_")}
    import diffusers

    model_class = getattr(diffusers, meta.get("class", "UNet2DConditionModel"))
    with torch.device("meta"):
        unet = model_class.from_config(unet_config)
        # Shapes only: min-max on meta tensors builds the layer structure for free.
        quantize_(unet, QuantConfig(bits=config.bits, range="minmax"))
    unet.load_state_dict(load_file(directory / "unet.safetensors", device=str(device)), assign=True)
    left = [name for name, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{directory}: cached UNet lacks {left[:5]}; delete the folder to rebuild")
    state = quant_state(unet)
    state.config = config
    state.restore_fingerprint(meta["fingerprint"])
    return unet.to(device)


# A key only SDXL checkpoints have: the second text encoder (OpenCLIP bigG) in the original layout.
XL_CHECKPOINT_KEY = "conditioner.embedders.1."


def _checkpoint_is_xl(source: str) -> bool:
    """Whether a single checkpoint file holds an SDXL model (by its keys, without its tensors
    where the format allows)."""
    if source.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(source, framework="pt") as f:
            keys = list(f.keys())
    else:
        state = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
        keys = list(state.get("state_dict", state))
    return any(k.startswith(XL_CHECKPOINT_KEY) for k in keys)


def pipeline_index(source: str) -> dict[str, Any]:
    """A diffusers folder's or hub id's ``model_index.json`` (which parts the pipeline has)."""
    index = Path(source) / "model_index.json"
    if index.is_file():
        return dict(json.loads(index.read_text()))
    if Path(source).is_dir():
        return {}
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(source))


def _index_is_xl(index: dict[str, Any]) -> bool:
    part = index.get("text_encoder_2")
    return isinstance(part, list) and part[0] is not None


def _unet_is_xl(source: str) -> bool:
    """Whether a folder's or hub id's UNet takes SDXL's added conditioning."""
    config = UNet2DConditionModel.load_config(source, subfolder="unet")
    return dict(config).get("addition_embed_type") == "text_time"


def family_of_source(source: str, config: str | None = None) -> Family:
    """The family of a folder, hub id or single checkpoint file (``config``: its configs'
    folder or hub id): SDXL when ``config`` is an SDXL folder or hub id, or, without one,
    when the file holds SDXL keys."""
    from tuneqdm_core.families import SD, SDXL, family_of_index
    from tuneqdm_core.families.single_file import family_of_file

    if is_single_file(source):
        transformer = family_of_file(source, config)  # a FLUX or SD3 transformer file
        if transformer is not None:
            return transformer
        xl = _index_is_xl(pipeline_index(config)) if config else _checkpoint_is_xl(source)
        return SDXL if xl else SD
    family = family_of_index(pipeline_index(source))
    if family is not None:
        return family
    return SDXL if _unet_is_xl(source) else SD


def load_base(
    source: str | os.PathLike[str],
    *,
    quant: QuantConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    config: str | os.PathLike[str] | None = None,
    storage_mode: StorageMode = "packed",
    text_encoder_bits: int | None = None,
) -> BaseModel:
    """Load a pipeline's parts, quantize its UNet (or take it from ``cache_dir``).

    ``source``: a diffusers folder, a hub id, or one ``.safetensors``/``.ckpt`` checkpoint;
    ``config``: for a single file, the diffusers folder or hub id whose configs, tokenizer and
    scheduler it is read with (ignored otherwise; see the module docstring);
    ``storage_mode``: ``packed`` (codes only, least memory) or ``resident`` (plus a dequantized
    copy of the UNet's frozen weights on ``device``, fastest; :func:`set_storage_mode`);
    ``text_encoder_bits``: 8 stores a FLUX or SD3 base's T5 encoder as 8-bit codes
    (:func:`tuneqdm_core.families.flow.quantize_text_encoder`; None: float).
    """
    source = str(source)
    model_config = str(config) if config else None  # "": unset, as an empty env var gives
    quant = quant or QuantConfig()
    device = torch.device(device)
    single = is_single_file(source)
    if not single and not Path(source).is_dir() and not HUB_ID.fullmatch(source):
        raise FileNotFoundError(
            f"model {source!r} is neither a local model folder nor a hub id like 'org/name' "
            "nor a .safetensors/.ckpt checkpoint file"
        )
    family = family_of_source(source, model_config)
    folder = family.denoiser
    file_config = model_config if single else None  # only a single file reads a config
    key = _cache_key(source, quant, file_config, subfolder=folder)
    entry = Path(cache_dir) / f"{folder}-{key}" if cache_dir else None
    return family.load(source, quant, device, storage_mode, entry, file_config, text_encoder_bits)
