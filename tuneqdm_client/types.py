"""The API's JSON objects as TypedDicts: plain dicts at run time, typed for editors and mypy.

They mirror the response schemas of the OpenAPI document (/openapi.json) field for field.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Progress(TypedDict):
    step: int
    total: int


class Finetune(TypedDict):
    id: str
    name: str | None
    status: str  # queued | running | succeeded | failed | canceled
    base_model: str  # the base it trains on
    instance_prompt: str
    class_prompt: str | None
    token: str
    params: dict[str, Any]
    webhook_url: str | None
    webhook_events: list[str]  # events that get a webhook
    webhook: dict[str, Any] | None  # delivery state of the final webhook
    num_images: int
    photos_deleted_at: str | None
    progress: Progress
    loss: float | None
    eta_seconds: float | None
    group_size: int | None  # while running: fine-tunes trained in one loop with it, itself too
    phase: str | None  # what it is doing (docs/api.md "Phases"); null once final
    waiting_reason: str | None  # while queued: why it waits
    error: str | None
    adapter_id: str | None
    time_limit_s: float | None
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    links: dict[str, str | None]


class Adapter(TypedDict):
    id: str
    name: str | None
    finetune_id: str | None
    method: str
    bits: int
    intervals: int
    tokens: list[str]
    size_bytes: int
    base_model: str
    base_fingerprint: str
    created_at: str
    links: dict[str, str | None]


class GeneratedImage(TypedDict):
    index: int
    seed: int
    base: bool  # the plain base's image with this seed (compare_base)
    url: str


class Generation(TypedDict):
    id: str
    adapter_id: str | None
    base_model: str
    status: str
    prompt: str
    negative_prompt: str | None
    num_images: int
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    scheduler: str
    compare_base: bool  # also the base's images with the same seeds (marked `base`)
    webhook_url: str | None
    webhook_events: list[str]
    webhook: dict[str, Any] | None  # delivery state of the final webhook
    time_limit_s: float | None
    error: str | None
    phase: str | None  # what it is doing (docs/api.md "Phases"); null once final
    waiting_reason: str | None  # while queued: why it waits
    images: list[GeneratedImage]
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    links: dict[str, str | None]


class Sample(TypedDict):
    """A progress image of a fine-tune: `prompt_index` of params.validation_prompts at `step`."""

    step: int
    prompt_index: int
    prompt: str
    seed: int
    url: str
    created_at: str


class SamplePage(TypedDict):
    data: list[Sample]
    count: int


class Checkpoint(TypedDict):
    """The adapter as it was at `step` (params.keep_checkpoints), with the URLs of the progress
    images it made and the URL that promotes it to an adapter."""

    step: int
    size_bytes: int
    created_at: str
    samples: list[str]
    promote: str


class CheckpointPage(TypedDict):
    data: list[Checkpoint]
    count: int


class Event(TypedDict):
    # queued | running | released | progress | samples | succeeded | failed | canceled | webhook
    type: str
    data: dict[str, Any]
    created_at: str


class EventPage(TypedDict):
    """Events oldest first; pass `next_cursor` to get the ones after them (now or later)."""

    data: list[Event]
    next_cursor: str
    has_more: bool


class SizeRange(TypedDict):
    default: int  # the native resolution
    min: int
    max: int


class BaseWorker(TypedDict):
    worker: str
    device: str | None
    last_seen_at: str
    up: bool


class QueuedJobs(TypedDict):
    finetune: int
    generation: int


class GenerationDefaults(TypedDict):
    steps: int
    guidance_scale: float  # 0: the base takes none
    guidance: str  # "cfg", "embedded" (FLUX.1 [dev]) or "none" (FLUX.1 [schnell])
    guidance_meaning: str
    scheduler: str
    schedulers: list[str]
    negative_prompt: bool  # whether the base accepts one


class FinetuneDefaults(TypedDict):
    steps: int
    lr_s_in: float
    lr_s_out: float | None  # None: relative to the base's quantization step
    batch_size: int
    resolution: int


class Base(TypedDict):
    name: str
    source: str
    family: str  # "sd", "sdxl", "sd3" or "flux"
    native_resolution: int
    sizes: SizeRange
    size_multiple: int
    generation: GenerationDefaults
    finetune: FinetuneDefaults
    bits: int
    prediction_type: str
    fingerprint: str | None
    device: str | None
    storage_mode: str | None
    default: bool  # the base of requests that name none
    workers_up: int
    queued: QueuedJobs
    workers: list[BaseWorker]
    created_at: str
    updated_at: str


class BasePage(TypedDict):
    data: list[Base]
    count: int


# One page of a list endpoint; `count` is the number of matches across all pages. (Three
# classes rather than one generic TypedDict, which Python 3.10 does not support.)
class FinetunePage(TypedDict):
    data: list[Finetune]
    count: int


class AdapterPage(TypedDict):
    data: list[Adapter]
    count: int


class GenerationPage(TypedDict):
    data: list[Generation]
    count: int


class FieldError(TypedDict):
    field: str  # e.g. "width" or "params.steps"
    message: str  # the rule it breaks


class _ProblemBase(TypedDict):
    type: str  # urn:tuneqdm:problem:not-found, ...
    title: str
    status: int
    detail: str


class Problem(_ProblemBase, total=False):
    """Every error body (RFC 9457, application/problem+json)."""

    errors: list[FieldError]  # for invalid input: one per field at fault


class ExportLinks(TypedDict):
    file: str


class _ExportBase(TypedDict):
    id: str
    adapter_id: str
    format: str  # lora | merged
    rank: int | None
    interval: str  # "all" or one interval's index
    status: str  # queued | running | succeeded | failed | canceled
    size_bytes: int | None
    relative_error: float | None
    attempts: int
    error: str | None
    created_at: str
    finished_at: str | None
    links: dict[str, str]


class Export(_ExportBase, total=False):
    """A file made from an adapter by a worker (POST /v1/adapters/{id}/exports)."""

    max_relative_error: float | None  # the LoRA's error bound, when asked by error
    warnings: list[str]  # e.g. a fixed-rank LoRA far from the adapter
    webhook_url: str | None  # set by the request that queued it
    webhook_events: list[str]  # events that get a webhook


class ExportPage(TypedDict):
    data: list[Export]
    count: int
