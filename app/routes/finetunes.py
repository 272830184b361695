"""/v1/finetunes: submit, inspect, list, cancel and delete fine-tune jobs; their progress
images, kept checkpoints and events."""

from __future__ import annotations

import io
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Path, Query, Response, UploadFile, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import archives, openapi
from app import image_urls as url_photos
from app.deps import (
    CurrentTenant,
    ImagePoolDep,
    SenderDep,
    SessionDep,
    SettingsDep,
    StorageDep,
)
from app.downloads import stream_response
from app.forms import StrictFormRoute
from app.models import FinetuneJob
from app.schemas import (
    AdapterPublic,
    CheckpointPublic,
    CheckpointsPublic,
    EventPublic,
    EventsPublic,
    FinetuneParams,
    FinetunePublic,
    FinetunesPublic,
    SamplePublic,
    SamplesPublic,
    Status,
    sample_url,
)
from app.services import adapters, progress
from app.services import bases as bases_svc
from app.services import finetunes as svc

router = APIRouter(prefix="/v1/finetunes", tags=["finetunes"], route_class=StrictFormRoute)

ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing or invalid API key."},
    404: {"description": "No such job for this tenant."},
    429: {"description": "A per-tenant limit is reached; see Retry-After and the detail."},
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=FinetunePublic,
    responses={
        **ERRORS,
        409: {"description": "The Idempotency-Key was used for a different request."},
        413: {"description": "A file or the request is above the byte limit."},
        422: {"description": "Invalid images, prompts or params; the detail says which."},
        503: {"description": "The task queue is unreachable; nothing was stored."},
    },
)
async def create_finetune(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    sender: SenderDep,
    pool: ImagePoolDep,
    tenant: CurrentTenant,
    instance_prompt: Annotated[
        str, Form(description="Describes the subject with its token, e.g. 'a photo of sks dog'.")
    ],
    images: Annotated[
        list[UploadFile],
        File(description="Photos of the subject (PNG, JPEG or WebP), one part each."),
    ] = [],  # noqa: B006 - FastAPI copies defaults per request
    images_zip: Annotated[
        UploadFile | None,
        File(
            description="Photos of the subject as one .zip archive (besides or instead of "
            "`images`); every entry must be a .png, .jpg, .jpeg or .webp photo."
        ),
    ] = None,
    image_urls: Annotated[
        list[str],
        Form(
            description="Photos of the subject as https URLs, one part each (besides or "
            "instead of `images`), fetched when the request is made; they count towards the "
            "same photo limit and pass the same checks as uploaded photos."
        ),
    ] = [],  # noqa: B006 - FastAPI copies defaults per request
    class_prompt: Annotated[
        str | None, Form(description="Enables prior preservation, e.g. 'a photo of a dog'.")
    ] = None,
    name: Annotated[str | None, Form()] = None,
    params: Annotated[
        str | None,
        Form(
            description="Training parameters: a JSON object (FinetuneParams), sent as a part "
            "of type application/json.",
            json_schema_extra=openapi.json_part(FinetuneParams),
        ),
    ] = None,
    webhook_url: Annotated[str | None, Form()] = None,
    webhook_events: Annotated[
        list[str],
        Form(
            description="Events that get a webhook, one part each: running, progress, samples, "
            "succeeded, failed, canceled (docs/api.md, Webhooks); default: the final states "
            "(succeeded, failed, canceled)."
        ),
    ] = [],  # noqa: B006 - FastAPI copies defaults per request
    token: Annotated[str, Form(description="Identifier token of the subject.")] = "sks",
    base: Annotated[
        str | None,
        Form(
            max_length=255,
            description="Base model to fine-tune (GET /v1/bases); default: the deployment's "
            "default base. The adapter works only with this base.",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Repeating a request with the same key returns the same job; the same "
            "key with another request (fields or photos) answers 409."
        ),
    ] = None,
) -> FinetunePublic:
    form = svc.FinetuneForm(
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
        name=name,
        params=params,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        token=token,
        idempotency_key=idempotency_key,
        base=base,
    )
    uploads = [svc.Upload(filename=f.filename, stream=f.file) for f in images]
    if images_zip is not None:
        entries = await run_in_threadpool(
            archives.unpack,
            images_zip.file,
            max_images=settings.max_images,
            max_image_bytes=settings.max_image_bytes,
            already=len(uploads),
        )
        uploads += [
            svc.Upload(filename=None, stream=e.stream, label=f"images_zip entry {e.name}")
            for e in entries
        ]
    urls = [
        url_photos.check_url(u, i, ports=settings.webhook_ports) for i, u in enumerate(image_urls)
    ]
    max_side = await run_in_threadpool(
        svc.precheck,
        session=session,
        settings=settings,
        tenant=tenant,
        form=form,
        uploads=uploads,
        urls=len(urls),
    )
    if urls:
        fetched = await run_in_threadpool(
            url_photos.fetch_all,
            urls,
            limit=settings.max_image_bytes,
            timeout_s=settings.image_url_timeout_s,
            allow_private=settings.allow_private_webhooks,
            ports=settings.webhook_ports,
        )
        uploads += [
            svc.Upload(filename=None, stream=io.BytesIO(data), label=url_photos.named(i, url))
            for i, (url, data) in enumerate(zip(urls, fetched, strict=True))
        ]
    # Async on purpose: waiting for a slot of the image pool holds no thread and no database
    # connection (the authentication committed); only the database work below takes a thread.
    checked = [
        await pool.run(tenant.id, svc.check_upload, up, i, settings, max_side)
        for i, up in enumerate(uploads)
    ]
    job = await run_in_threadpool(
        svc.create_finetune,
        session=session,
        storage=storage,
        sender=sender,
        settings=settings,
        tenant=tenant,
        form=form,
        checked=checked,
    )
    return await run_in_threadpool(_public, session, settings, job)


def _public(session: SessionDep, settings: SettingsDep, job: FinetuneJob) -> FinetunePublic:
    """The job as the API shows it, with why it waits while queued."""
    waiting = bases_svc.waiting_of(session=session, settings=settings, jobs=[job])
    return FinetunePublic.from_row(job, waiting)


@router.get("", response_model=FinetunesPublic, responses={401: ERRORS[401]})
def list_finetunes(
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> FinetunesPublic:
    rows, count = svc.list_finetunes(
        session=session,
        tenant=tenant,
        status=status,
        limit=min(limit, settings.max_page_size),
        offset=offset,
    )
    waiting = bases_svc.waiting_of(session=session, settings=settings, jobs=rows)
    return FinetunesPublic(data=[FinetunePublic.from_row(r, waiting) for r in rows], count=count)


@router.get("/{finetune_id}", response_model=FinetunePublic, responses=ERRORS)
def get_finetune(
    session: SessionDep, settings: SettingsDep, tenant: CurrentTenant, finetune_id: str
) -> FinetunePublic:
    job = svc.get_finetune(session=session, tenant=tenant, finetune_id=finetune_id)
    return _public(session, settings, job)


@router.get("/{finetune_id}/samples", response_model=SamplesPublic, responses=ERRORS)
def list_samples(session: SessionDep, tenant: CurrentTenant, finetune_id: str) -> SamplesPublic:
    """Progress images made so far (params.validation_prompts), by step then prompt."""
    rows = progress.list_samples(session=session, tenant=tenant, finetune_id=finetune_id)
    return SamplesPublic(data=[SamplePublic.from_row(r) for r in rows], count=len(rows))


@router.get(
    "/{finetune_id}/samples/{step}/{prompt_index}",
    response_class=StreamingResponse,
    responses={**ERRORS, 200: {"description": "The PNG image.", "content": {"image/png": {}}}},
)
def get_sample(
    session: SessionDep,
    storage: StorageDep,
    tenant: CurrentTenant,
    finetune_id: str,
    step: Annotated[int, Path(ge=0, le=1_000_000)],
    prompt_index: Annotated[int, Path(ge=0, le=100)],
) -> StreamingResponse:
    row = progress.get_sample(
        session=session,
        tenant=tenant,
        finetune_id=finetune_id,
        step=step,
        prompt_index=prompt_index,
    )
    return stream_response(
        storage,
        row.storage_key,
        media_type="image/png",
        missing=f"progress image {step}/{prompt_index} is missing from storage",
    )


@router.get("/{finetune_id}/checkpoints", response_model=CheckpointsPublic, responses=ERRORS)
def list_checkpoints(
    session: SessionDep, tenant: CurrentTenant, finetune_id: str
) -> CheckpointsPublic:
    """The adapter as it was at each progress-image step (params.keep_checkpoints), by step,
    with the progress images of that step."""
    rows = progress.list_checkpoints(session=session, tenant=tenant, finetune_id=finetune_id)
    return CheckpointsPublic(
        data=[CheckpointPublic.from_row(row, [sample_url(s) for s in made]) for row, made in rows],
        count=len(rows),
    )


@router.post(
    "/{finetune_id}/checkpoints/{step}/promote",
    status_code=status.HTTP_201_CREATED,
    response_model=AdapterPublic,
    responses={
        **ERRORS,
        404: {"description": "No such job for this tenant, or no checkpoint kept at this step."},
        409: {"description": "The job is queued or running; promote once it has finished."},
    },
)
def promote_checkpoint(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: CurrentTenant,
    finetune_id: str,
    step: Annotated[int, Path(ge=0, le=1_000_000)],
) -> AdapterPublic:
    """Make the checkpoint kept at `step` a registry adapter of its own (a copy of the file,
    counted in the stored bytes): usable in generations and exports, and kept when the
    fine-tune is deleted."""
    adapter = adapters.promote_checkpoint(
        session=session,
        storage=storage,
        settings=settings,
        tenant=tenant,
        finetune_id=finetune_id,
        step=step,
    )
    return AdapterPublic.from_row(adapter)


@router.get(
    "/{finetune_id}/events",
    response_model=EventsPublic,
    responses={
        **ERRORS,
        422: {"description": "The cursor is not one this API gave out for this fine-tune."},
    },
)
def list_events(
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    finetune_id: str,
    cursor: Annotated[
        str | None,
        Query(max_length=200, description="next_cursor of the previous page; omit to start."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventsPublic:
    """The job's event log, oldest first: state changes, progress, progress images, webhook
    attempts. Poll with the last next_cursor to get only what happened since."""
    rows, next_cursor, more = progress.list_events(
        session=session,
        tenant=tenant,
        finetune_id=finetune_id,
        cursor=cursor,
        limit=min(limit, settings.max_page_size),
        secret_key=settings.resolved_secret_key,
    )
    return EventsPublic(
        data=[EventPublic.from_row(r) for r in rows], next_cursor=next_cursor, has_more=more
    )


@router.post(
    "/{finetune_id}/cancel",
    response_model=FinetunePublic,
    responses={**ERRORS, 409: {"description": "The job has already finished."}},
)
def cancel_finetune(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: CurrentTenant,
    finetune_id: str,
) -> FinetunePublic:
    job = svc.cancel_finetune(
        session=session,
        tenant=tenant,
        finetune_id=finetune_id,
        storage=storage,
        settings=settings,
    )
    return FinetunePublic.from_row(job)


@router.delete("/{finetune_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
def delete_finetune(
    session: SessionDep,
    storage: StorageDep,
    tenant: CurrentTenant,
    finetune_id: str,
    delete_adapter: Annotated[
        bool,
        Query(description="Also delete the adapter trained by this job (kept by default)."),
    ] = False,
) -> Response:
    """Delete the job, its photos, checkpoints (kept ones too), progress images and events (a
    queued or running job is canceled first); its adapter only with delete_adapter=true."""
    svc.delete_finetune(
        session=session,
        storage=storage,
        tenant=tenant,
        finetune_id=finetune_id,
        delete_adapter=delete_adapter,
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
