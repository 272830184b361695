"""What requests may ask of each model family, and what they get when they ask nothing.

The one table of per-family request rules and defaults (docs/api.md "Families"), shared by the
API (validation at submit, GET /v1/bases) and the worker (the family it registers); no torch.
A base's family and guidance kind come from its own config files (app/bases.py):

- ``sd`` (SD 1.x/2.x) and ``sdxl``: UNets, classifier-free guidance, negative prompts, the
  UNet schedulers of ``tuneqdm_core.generate``;
- ``sd3`` (SD3/SD3.5): a flow-matching MMDiT with classifier-free guidance and negative prompts;
- ``flux`` (FLUX.1): a flow-matching transformer; [dev] takes the guidance scale as an
  embedding it was distilled with (``guidance_embeds`` in its transformer config), [schnell]
  takes none, neither a negative prompt. A FLUX model trained for classifier-free guidance (the
  built-in models/fashion-flux) says so in its model_index.json (``GUIDANCE_KEY``); it takes a
  negative prompt, and its guidance scale is FluxPipeline's ``true_cfg_scale``.

Generation defaults are the ones of each family's diffusers pipeline (``FluxPipeline``,
``StableDiffusion3Pipeline``: 28 steps; guidance 3.5 and 7.0), except [schnell], which its
model card runs at 4 steps without guidance, and FLUX with CFG (its rule says why). The
scheduler names and ``GUIDANCE_KEY`` repeat the core's (``tuneqdm_core.generate.SCHEDULERS``,
``FlowFamily.schedulers``, ``tuneqdm_core.families.flux.GUIDANCE_KEY``), which the API cannot
import without torch; tests/worker/test_families.py checks they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, get_args

from app.models import ExportFormat, Family, Guidance

# model_index.json's _class_name of the transformer families (tuneqdm_core.families'
# pipeline_names); any other pipeline is a UNet one.
PIPELINES: dict[str, Family] = {
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
}
UNET_SCHEDULERS = ("ddim", "dpmsolver++", "euler")
# The model_index.json key whose value "cfg" marks a FLUX model guided classifier-free.
GUIDANCE_KEY = "_guidance"


@dataclass(frozen=True)
class GenerationRules:
    """What a generation of a base of this family and guidance kind may send, and its
    defaults where it sends nothing."""

    steps: int
    guidance_scale: float  # stored for every job; 0 where the base takes no guidance
    guidance: Guidance
    schedulers: tuple[str, ...]
    scheduler: str  # the default
    negative_prompt: bool

    def describe_guidance(self) -> str:
        return {
            "cfg": "classifier-free guidance scale",
            "embedded": "distilled guidance strength, given to the model as an embedding "
            "(no second, unconditioned pass)",
            "none": "not used: the model was distilled to run without guidance",
        }[self.guidance]


UNET_RULES = GenerationRules(
    steps=30,
    guidance_scale=7.5,
    guidance="cfg",
    schedulers=UNET_SCHEDULERS,
    scheduler="ddim",
    negative_prompt=True,
)
GENERATION_RULES: dict[tuple[Family, Guidance], GenerationRules] = {
    ("sd", "cfg"): UNET_RULES,
    ("sdxl", "cfg"): UNET_RULES,
    ("sd3", "cfg"): GenerationRules(
        steps=28,
        guidance_scale=7.0,
        guidance="cfg",
        schedulers=("euler", "heun", "dpmsolver++"),
        scheduler="euler",
        negative_prompt=True,
    ),
    # FluxPipeline sets custom sigmas and a shift per call, which only the flow-matching
    # Euler scheduler takes (tuneqdm_core.families.flux.Flux.schedulers).
    ("flux", "embedded"): GenerationRules(
        steps=28,
        guidance_scale=3.5,
        guidance="embedded",
        schedulers=("euler",),
        scheduler="euler",
        negative_prompt=False,
    ),
    # FluxPipeline's default true_cfg_scale is 1 (no CFG), so there is no pipeline default to
    # take: 4.0 is the scale the built-in models/fashion-flux was checked to draw the asked-for
    # background with (its sample grid, tests/core/builtin/test_pretrain_flux.py), and 28 steps
    # FluxPipeline's default, as for [dev]. The unconditioned pass doubles each step's cost.
    ("flux", "cfg"): GenerationRules(
        steps=28,
        guidance_scale=4.0,
        guidance="cfg",
        schedulers=("euler",),
        scheduler="euler",
        negative_prompt=True,
    ),
    ("flux", "none"): GenerationRules(
        steps=4,
        guidance_scale=0.0,
        guidance="none",
        schedulers=("euler",),
        scheduler="euler",
        negative_prompt=False,
    ),
}


@dataclass(frozen=True)
class FinetuneDefaults:
    """What a fine-tune of this family trains with where its params omit a value. Only the
    values that differ from FinetuneParams' own defaults (those of the UNet families) are
    here; `as_dict` gives the whole set GET /v1/bases shows."""

    overrides: dict[str, Any] = field(default_factory=dict)
    # The default training side: the base's native side, or this where that is larger
    # (rounded down to the base's size multiple, kept within its size range).
    max_resolution: int | None = None


# FLUX and SD3 train at 512 px by default, as diffusers' DreamBooth scripts for both
# (train_dreambooth_flux.py, train_dreambooth_sd3.py) do for their 1024 px models; a smaller
# model (the built-in 32 px models/fashion-flux) at its own side. Steps and lr_s_out stay the
# method's own (lr_s_out is already relative to each base's quantization step). FLUX trains
# s_in ten times faster: on the built-in FLUX model, lr_s_in 1e-2 put TuneQDM ahead of PEQA by
# +0.019 ± 0.004 subject fidelity (24 pairs, 4.7 standard errors, confirmed on seeds it was
# not chosen on) at 1.01 × the base's prompt fidelity, where the UNet families' 1e-3 stayed
# level with PEQA (+0.002 ± 0.001; docs/benchmarks.md "A FLUX-family model"). On the SD
# built-in model the same rate gained nothing and cost prompt fidelity (0.64 × the base's), so
# the UNet families keep 1e-3. SD3: unmeasured.
FINETUNE_DEFAULTS: dict[Family, FinetuneDefaults] = {
    "sd": FinetuneDefaults(),
    "sdxl": FinetuneDefaults(),
    "sd3": FinetuneDefaults(max_resolution=512),
    "flux": FinetuneDefaults(overrides={"lr_s_in": 1e-2}, max_resolution=512),
}


# The params GET /v1/bases shows the defaults of (lr_s_out: null means relative to the base's
# quantization step, FinetuneParams' description).
FINETUNE_FIELDS = ("steps", "lr_s_in", "lr_s_out", "batch_size")


# Export formats per family: kohya keys and the original single-file layout exist for the
# UNet families only (tuneqdm_core.export; the transformer families export diffusers-keyed
# LoRAs, which their pipelines' load_lora_weights read, and merged transformers).
TRANSFORMER_EXPORTS = ("lora", "merged")
EXPORT_FORMATS: dict[Family, tuple[str, ...]] = {
    "sd": get_args(ExportFormat),
    "sdxl": get_args(ExportFormat),
    "sd3": TRANSFORMER_EXPORTS,
    "flux": TRANSFORMER_EXPORTS,
}


def generation_rules(family: str, guidance: str) -> GenerationRules:
    """The rules of a registered base; an unknown pair (a registry row written by a newer
    worker) is refused rather than guessed."""
    rules = GENERATION_RULES.get((family, guidance))  # type: ignore[arg-type]
    if rules is None:
        raise ValueError(f"no generation rules for family {family!r} with guidance {guidance!r}")
    return rules


def family_of(index: dict[str, Any], denoiser: dict[str, Any]) -> Family:
    """The family of a diffusers folder from its model_index.json and its UNet's or
    transformer's config (SDXL's UNet takes added "text_time" conditioning)."""
    family = PIPELINES.get(str(index.get("_class_name", "")))
    if family is not None:
        return family
    return "sdxl" if denoiser.get("addition_embed_type") == "text_time" else "sd"


def guidance_of(family: str, index: dict[str, Any], denoiser: dict[str, Any]) -> Guidance:
    """How a base is guided, from its model_index.json and its denoiser's config (as
    ``tuneqdm_core.families.flux.guidance_of`` decides for FLUX): every family but FLUX, and
    a FLUX model whose index says so, classifier-free."""
    if family != "flux" or index.get(GUIDANCE_KEY) == "cfg":
        return "cfg"
    return "embedded" if denoiser.get("guidance_embeds") else "none"


def finetune_overrides(family: str) -> dict[str, Any]:
    """The family's own defaults of FinetuneParams fields (those that differ from the schema's);
    the resolution's is given by `finetune_defaults`, which knows the base's sizes."""
    return dict(FINETUNE_DEFAULTS[family].overrides)  # type: ignore[index]


def finetune_defaults(
    family: str, *, native: int, low: int, high: int, multiple: int
) -> dict[str, Any]:
    """The values a fine-tune of a base of `family` trains with where its params omit them:
    FinetuneParams' defaults, the family's overrides, and the default resolution (`native`, or
    the family's maximum where smaller, rounded down to `multiple`, kept within [low, high])."""
    from app.schemas.finetunes import FinetuneParams

    defaults = FINETUNE_DEFAULTS[family]  # type: ignore[index]
    values: dict[str, Any] = {
        name: FinetuneParams.model_fields[name].default for name in FINETUNE_FIELDS
    }
    values.update(defaults.overrides)
    side = min(native, defaults.max_resolution or native)
    side = multiple * (side // multiple)
    values["resolution"] = min(max(side, low), high)
    return values
