"""/v1/generations: request images from an adapter (or the base model), list and fetch them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response, status
from fastapi.responses import StreamingResponse

from app.deps import CurrentTenant, SenderDep, SessionDep, SettingsDep, StorageDep
from app.downloads import REDIRECT_DOC, file_response
from app.models import GenerationJob
from app.schemas import GenerationCreate, GenerationPublic, GenerationsPublic, Status
from app.services import bases as bases_svc
from app.services import generations as svc

router = APIRouter(prefix="/v1/generations", tags=["generations"])

ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing or invalid API key."},
    404: {"description": "No such generation (or image) for this tenant."},
    429: {"description": "A per-tenant limit is reached; see Retry-After and the detail."},
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=GenerationPublic,
    responses={
        401: ERRORS[401],
        429: ERRORS[429],
        409: {
            "description": "The adapter's fine-tune has not succeeded, or another base; or the "
            "Idempotency-Key was used for a different request."
        },
        422: {"description": "Invalid request; the detail says which field."},
        503: {"description": "The task queue is unreachable; nothing was stored."},
    },
)
def create_generation(
    session: SessionDep,
    settings: SettingsDep,
    sender: SenderDep,
    tenant: CurrentTenant,
    data: GenerationCreate,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Repeating a request with the same key returns the same generation; "
            "the same key with another request answers 409."
        ),
    ] = None,
) -> GenerationPublic:
    gen = svc.create_generation(
        session=session,
        sender=sender,
        settings=settings,
        tenant=tenant,
        data=data,
        idempotency_key=idempotency_key,
    )
    return _public(session, settings, gen)


def _public(session: SessionDep, settings: SettingsDep, gen: GenerationJob) -> GenerationPublic:
    """The generation as the API shows it, with why it waits while queued."""
    waiting = bases_svc.waiting_of(session=session, settings=settings, jobs=[gen])
    return GenerationPublic.from_row(gen, waiting)


@router.get("", response_model=GenerationsPublic, responses={401: ERRORS[401]})
def list_generations(
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> GenerationsPublic:
    rows, count = svc.list_generations(
        session=session,
        tenant=tenant,
        status=status,
        limit=min(limit, settings.max_page_size),
        offset=offset,
    )
    waiting = bases_svc.waiting_of(session=session, settings=settings, jobs=rows)
    data = [GenerationPublic.from_row(r, waiting) for r in rows]
    return GenerationsPublic(data=data, count=count)


@router.get("/{generation_id}", response_model=GenerationPublic, responses=ERRORS)
def get_generation(
    session: SessionDep, settings: SettingsDep, tenant: CurrentTenant, generation_id: str
) -> GenerationPublic:
    gen = svc.get_generation(session=session, tenant=tenant, generation_id=generation_id)
    return _public(session, settings, gen)


@router.post(
    "/{generation_id}/cancel",
    response_model=GenerationPublic,
    responses={**ERRORS, 409: {"description": "The generation has already finished."}},
)
def cancel_generation(
    session: SessionDep, tenant: CurrentTenant, generation_id: str
) -> GenerationPublic:
    gen = svc.cancel_generation(session=session, tenant=tenant, generation_id=generation_id)
    return GenerationPublic.from_row(gen)


@router.get(
    "/{generation_id}/images/{n}",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {"description": "The PNG image.", "content": {"image/png": {}}},
        307: REDIRECT_DOC,
    },
)
def get_generated_image(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    generation_id: str,
    n: Annotated[int, Path(ge=0, le=10_000)],
) -> Response:
    img = svc.get_generated_image(
        session=session, tenant=tenant, generation_id=generation_id, index=n
    )
    return file_response(
        storage,
        settings,
        img.storage_key,
        media_type="image/png",
        filename=None,
        missing=f"image {n} of generation {generation_id} is missing from storage",
    )


@router.delete("/{generation_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
def delete_generation(
    session: SessionDep, storage: StorageDep, tenant: CurrentTenant, generation_id: str
) -> Response:
    """Delete the generation, its prompt and its images (a queued or running one is canceled
    first)."""
    svc.delete_generation(
        session=session, storage=storage, tenant=tenant, generation_id=generation_id
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
