"""Pydantic schemas of the public API: XCreate (input), XPublic (output), XsPublic (a page).

One module per resource; every name is importable from here. No FastAPI imports: the worker
validates stored params with the same `FinetuneParams`.
"""

from app.schemas.adapters import AdapterLinks, AdapterPublic, AdaptersPublic
from app.schemas.bases import (
    BasePublic,
    BasesPublic,
    BaseWorkerPublic,
    QueuedPublic,
    SizeRangePublic,
)
from app.schemas.common import SEED_MAX, HealthPublic, Method, Scheduler, Status, WebhookPublic
from app.schemas.exports import (
    ExportCreate,
    ExportFormat,
    ExportLinks,
    ExportPublic,
    ExportsPublic,
    ExportStatus,
)
from app.schemas.finetunes import (
    DEFAULT_SAMPLE_POINTS,
    MAX_SAMPLE_POINTS,
    MAX_VALIDATION_PROMPTS,
    FinetuneLinks,
    FinetuneParams,
    FinetunePublic,
    FinetunesPublic,
    Progress,
    sample_points,
)
from app.schemas.generations import (
    GeneratedImagePublic,
    GenerationCreate,
    GenerationLinks,
    GenerationPublic,
    GenerationsPublic,
)
from app.schemas.progress import EventPublic, EventsPublic, EventType, SamplePublic, SamplesPublic

__all__ = [
    "DEFAULT_SAMPLE_POINTS",
    "MAX_SAMPLE_POINTS",
    "MAX_VALIDATION_PROMPTS",
    "SEED_MAX",
    "AdapterLinks",
    "AdapterPublic",
    "AdaptersPublic",
    "BasePublic",
    "BaseWorkerPublic",
    "BasesPublic",
    "EventPublic",
    "EventType",
    "EventsPublic",
    "ExportCreate",
    "ExportFormat",
    "ExportLinks",
    "ExportPublic",
    "ExportStatus",
    "ExportsPublic",
    "FinetuneLinks",
    "FinetuneParams",
    "FinetunePublic",
    "FinetunesPublic",
    "GeneratedImagePublic",
    "GenerationCreate",
    "GenerationLinks",
    "GenerationPublic",
    "GenerationsPublic",
    "HealthPublic",
    "Method",
    "Progress",
    "QueuedPublic",
    "SamplePublic",
    "SamplesPublic",
    "Scheduler",
    "SizeRangePublic",
    "Status",
    "WebhookPublic",
    "sample_points",
]
