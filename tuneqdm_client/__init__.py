"""A small Python client of the tuneqdm REST API (needs only httpx).

    from tuneqdm_client import Client

    with Client("http://127.0.0.1:8000", api_key) as client:
        job = client.create_finetune("photos/", "a photo of sks bag", steps=200, resolution=32)
        job = client.wait_finetune(job["id"])            # progress bar on stderr
        gen = client.generate(job["adapter_id"], "a photo of sks bag on the beach")
        client.download_images(gen, "out/")

docs/client.md describes every method.
"""

from tuneqdm_client.aio import AsyncClient
from tuneqdm_client.client import ApiError, Client, JobFailed
from tuneqdm_client.types import (
    Adapter,
    AdapterPage,
    Base,
    BasePage,
    Checkpoint,
    CheckpointPage,
    Event,
    EventPage,
    Export,
    ExportPage,
    FieldError,
    Finetune,
    FinetunePage,
    GeneratedImage,
    Generation,
    GenerationPage,
    Problem,
    Progress,
    Sample,
    SamplePage,
)

__all__ = [
    "Adapter",
    "AdapterPage",
    "ApiError",
    "AsyncClient",
    "Base",
    "BasePage",
    "Checkpoint",
    "CheckpointPage",
    "Client",
    "Event",
    "EventPage",
    "Export",
    "ExportPage",
    "FieldError",
    "Finetune",
    "FinetunePage",
    "GeneratedImage",
    "Generation",
    "GenerationPage",
    "JobFailed",
    "Problem",
    "Progress",
    "Sample",
    "SamplePage",
]
