"""Pydantic schemas of the public API: XCreate (input), XPublic (output), XsPublic (a page).

One module per resource; every name is importable from here. No FastAPI imports: the worker
validates stored params with the same `FinetuneParams`.
"""

# The literal types of stored values are the registry's (one list each), named here too.
from app.models import EventType, ExportFormat, ExportStatus, Method, Status
from app.schemas.adapters import AdapterLinks, AdapterPublic, AdaptersPublic
from app.schemas.bases import (
    BasePublic,
    BasesPublic,
    BaseWorkerPublic,
    FinetuneDefaultsPublic,
    GenerationDefaultsPublic,
    QueuedPublic,
    SizeRangePublic,
)
from app.schemas.common import SEED_MAX, HealthPublic, Scheduler, WebhookPublic
from app.schemas.exports import (
    ExportCreate,
    ExportLinks,
    ExportPublic,
    ExportQuery,
    ExportsPublic,
    ExportVariant,
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
from app.schemas.progress import (
    CheckpointPublic,
    CheckpointsPublic,
    EventPublic,
    EventsPublic,
    SamplePublic,
    SamplesPublic,
    sample_url,
)

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
    "CheckpointPublic",
    "CheckpointsPublic",
    "EventPublic",
    "EventType",
    "EventsPublic",
    "ExportCreate",
    "ExportFormat",
    "ExportLinks",
    "ExportPublic",
    "ExportQuery",
    "ExportStatus",
    "ExportVariant",
    "ExportsPublic",
    "FinetuneDefaultsPublic",
    "FinetuneLinks",
    "FinetuneParams",
    "FinetunePublic",
    "FinetunesPublic",
    "GeneratedImagePublic",
    "GenerationCreate",
    "GenerationDefaultsPublic",
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
    "sample_url",
]
