"""/v1/adapters: list, inspect, download, delete and upload adapters."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from fastapi.responses import StreamingResponse

from app.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep
from app.downloads import REDIRECT_DOC, file_response
from app.forms import StrictFormRoute
from app.schemas import AdapterPublic, AdaptersPublic
from app.services import adapters as svc

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], route_class=StrictFormRoute)

ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing or invalid API key."},
    404: {"description": "No such adapter for this tenant."},
}


@router.get("", response_model=AdaptersPublic, responses={401: ERRORS[401]})
def list_adapters(
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> AdaptersPublic:
    rows, count = svc.list_adapters(
        session=session, tenant=tenant, limit=min(limit, settings.max_page_size), offset=offset
    )
    return AdaptersPublic(data=[AdapterPublic.from_row(r) for r in rows], count=count)


@router.get("/{adapter_id}", response_model=AdapterPublic, responses=ERRORS)
def get_adapter(session: SessionDep, tenant: CurrentTenant, adapter_id: str) -> AdapterPublic:
    return AdapterPublic.from_row(
        svc.get_adapter(session=session, tenant=tenant, adapter_id=adapter_id)
    )


@router.get(
    "/{adapter_id}/file",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {
            "description": "The adapter's safetensors file.",
            "content": {"application/octet-stream": {}},
        },
        307: REDIRECT_DOC,
    },
)
def download_adapter(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    adapter_id: str,
) -> Response:
    adapter = svc.get_adapter(session=session, tenant=tenant, adapter_id=adapter_id)
    return file_response(
        storage,
        settings,
        adapter.storage_key,
        media_type="application/octet-stream",
        filename=f"{adapter.id}.safetensors",
        missing=f"the file of adapter {adapter_id} is missing from storage",
    )


@router.delete("/{adapter_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
def delete_adapter(
    session: SessionDep, storage: StorageDep, tenant: CurrentTenant, adapter_id: str
) -> Response:
    svc.delete_adapter(session=session, storage=storage, tenant=tenant, adapter_id=adapter_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=AdapterPublic,
    responses={
        401: ERRORS[401],
        413: {"description": "The file is above TUNEQDM_MAX_ADAPTER_BYTES."},
        422: {"description": "Not an adapter file, or made for a base not served here."},
        429: {"description": "A per-tenant limit (stored bytes) is reached."},
    },
)
def upload_adapter(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    file: Annotated[
        UploadFile,
        File(description="An adapter file written by `tuneqdm finetune` (.safetensors)."),
    ],
    name: Annotated[str | None, Form(max_length=100)] = None,
    base: Annotated[
        str | None,
        Form(
            max_length=255,
            description="The registered base it was made for; default: the base whose "
            "fingerprint the file names.",
        ),
    ] = None,
) -> AdapterPublic:
    adapter = svc.upload_adapter(
        session=session,
        storage=storage,
        settings=settings,
        tenant=tenant,
        file=file.file,
        name=name,
        base=base,
    )
    return AdapterPublic.from_row(adapter)
